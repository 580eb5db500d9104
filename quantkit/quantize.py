"""One quantization run end to end: load, calibrate, walk the layers, export atomically."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.calibration import circular_shifts, load_text, random_windows, tokenize
from quantkit.errors import QuantkitError
from quantkit.export import Exporter, manifest
from quantkit.checkpoint import WeightSource
from quantkit.distributed import World, init_world
from quantkit.export.writer import finalize_output, prepare_output, temporary_dir
from quantkit.model import Adapter, compute_device, load_model, load_model_lazy
from quantkit.pipeline import quantize_layers
from quantkit.progress import log, warn
from quantkit.recipe import Recipe


@dataclass
class Run:
    """What a finished run produced: the in-memory model holds the dequantized weights."""

    model: nn.Module
    output: Path | None
    seconds: float


def calibration_tokens(tokenizer, source: str | None, recipe: Recipe) -> torch.Tensor:
    """[nsamples, seqlen] random windows of the calibration text."""
    if source is None:
        raise QuantkitError("this recipe needs calibration text: pass --calibration FILE (.txt, .jsonl, .parquet) or a set name")
    ids = tokenize(tokenizer, load_text(source, "calibration"))
    if ids.numel() < recipe.nsamples * recipe.seqlen:
        warn(
            f"calibration text has {ids.numel()} tokens, fewer than --nsamples × --seqlen = "
            f"{recipe.nsamples * recipe.seqlen}: the random windows overlap"
        )
    return circular_shifts(random_windows(ids, recipe.nsamples, recipe.seqlen, recipe.seed), recipe.expand)


def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    recipe: Recipe,
    tokens: torch.Tensor | None,
    device: torch.device,
    exporter: Exporter | None = None,
    show_progress: bool = True,
    offload: bool | None = None,
    weights: WeightSource | None = None,
    resume: ResumeState | None = None,
    world: World = World(),
) -> None:
    """Quantize ``model`` in place (dequantized weights), streaming each finished layer to ``exporter``
    and recording progress in ``resume``."""
    layers = adapter.layers(model)
    prefix = adapter.layers_path
    start = resume.layers_done if resume is not None else 0

    def restore(i: int, layer: nn.Module) -> None:
        exporter.restore_layer(i, f"{prefix}.{i}", layer)

    walk = quantize_layers(model, adapter, tokens, recipe, device, show_progress, offload=offload,
                           weights=weights, restore=restore, start=start, world=world)
    for i, results in walk:
        if exporter is not None:
            exporter.add_layer(i, f"{prefix}.{i}", layers[i], results)
        if resume is not None:
            resume.layers_done = i + 1
            resume.save()


@dataclass
class ResumeState:
    """What an interrupted run had finished, kept in its temporary folder as resume.json."""

    folder: Path
    recipe: dict
    source: str
    tokens_sha256: str
    layers_done: int = 0

    @classmethod
    def load(cls, folder: Path) -> "ResumeState | None":
        path = folder / "resume.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(folder, data["recipe"], data["source"], data["tokens_sha256"], data["layers_done"])

    def save(self) -> None:
        data = {"recipe": self.recipe, "source": self.source, "tokens_sha256": self.tokens_sha256, "layers_done": self.layers_done}
        tmp = self.folder / "resume.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.folder / "resume.json")

    def check(self, recipe: Recipe, source: str, tokens_sha256: str) -> None:
        if self.recipe != recipe.to_dict():
            changed = sorted(k for k, v in recipe.to_dict().items() if self.recipe.get(k) != v)
            raise QuantkitError(
                f"--resume with a different recipe ({', '.join(changed)} changed): rerun with the interrupted run's "
                "flags, or drop --resume to start over"
            )
        if self.source != source or self.tokens_sha256 != tokens_sha256:
            raise QuantkitError("--resume with a different model or calibration text: use the interrupted run's, or drop --resume")


def _sha256(tokens: torch.Tensor | None) -> str:
    return "" if tokens is None else hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def run(
    source: str,
    output: str | Path | None,
    recipe: Recipe,
    calibration: str | None = None,
    device: str | None = None,
    offload: bool | None = None,
    force: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    max_shard_bytes: int = 4 * 2**30,
    show_progress: bool = True,
    keep_model: bool = True,
) -> Run:
    """Quantize ``source`` with ``recipe``; export to ``output`` (None = in memory only).

    ``keep_model`` False streams: each decoder layer is read from the checkpoint when reached and
    released after export, so host memory holds one layer (``Run.model`` then has no layer weights)."""
    started = time.perf_counter()
    out = Path(output) if output is not None else None
    dev = compute_device(device)
    world, dev = init_world(dev)
    if world.size > 1 and recipe.export_format == "gguf":
        raise QuantkitError("--format gguf runs in a single process: rerun the same command without torchrun")
    if world.size > 1 and resume:
        raise QuantkitError("--resume runs in a single process: rerun the same command without torchrun "
                            "(the result is the same as a data-parallel run's)")
    writes = out is not None and world.is_main
    if writes and out.exists() and not force:
        raise QuantkitError(f"output folder '{out}' exists: choose another path or pass --force to replace it")
    if writes and resume and ResumeState.load(temporary_dir(out)) is None:
        raise QuantkitError(f"nothing to resume: {temporary_dir(out)} holds no interrupted run of '{out}'")
    if keep_model or out is None:
        model, tokenizer, adapter = load_model(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        weights = None
    else:
        model, tokenizer, adapter, weights = load_model_lazy(source, trust_remote_code, allow_pickle)
    if recipe.export_format == "gguf" and writes:
        from quantkit.export.gguf import preflight

        preflight(model.config, source)
    tokens = calibration_tokens(tokenizer, calibration, recipe) if recipe.needs_calibration else None
    if world.is_main:
        parallel = f", {world.size} data-parallel processes" if world.size > 1 else ""
        log(f"quantizing {source} → {out or '(memory)'}: {recipe.bits}-bit, group {recipe.group_size}, "
            f"{'sym' if recipe.sym else 'asym'}, {recipe.method}, format {recipe.export_format}, device {dev}{parallel}")
    if recipe.format == "auto" and world.is_main:
        why = ("symmetric 4/8-bit GPTQ loads in transformers, GPTQModel and vLLM" if recipe.export_format == "gptq" else
               "GPTQ v1 cannot carry this grid everywhere (asymmetric zero points, 2/3-bit kernels); "
               "transformers + compressed-tensors load it exactly")
        log(f"--format auto chose {recipe.export_format}: {why}")
    if not writes:
        quantize_model(model, adapter, recipe, tokens, dev, None, show_progress, offload, weights, world=world)
        return Run(model, None, time.perf_counter() - started)
    tmp = prepare_output(out, force, resume)
    state = ResumeState.load(tmp) if resume else None
    if state is not None:
        state.check(recipe, source, _sha256(tokens))
        log(f"resuming after {state.layers_done} finished layers")
    else:
        state = ResumeState(tmp, recipe.to_dict(), source, _sha256(tokens))
        state.save()
    try:
        exporter = Exporter(tmp, recipe, max_shard_bytes)
        quantize_model(model, adapter, recipe, tokens, dev, exporter, show_progress, offload, weights, state, world)
        seconds = time.perf_counter() - started
        extra = {"source_bytes": _folder_bytes(Path(source))}
        exporter.finish(model, adapter, source, tokenizer, manifest(recipe, source, seconds, extra))
        (tmp / "resume.json").unlink()
        finalize_output(tmp, out)
    except KeyboardInterrupt:
        raise QuantkitError(
            f"interrupted after {state.layers_done} layers: the finished work is kept in {tmp}; "
            "rerun the same command with --resume to continue"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Run(model, out, time.perf_counter() - started)


def _folder_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
