"""The `quantkit quantize` job: one run end to end (load, calibrate, walk the layers, export atomically)."""

from __future__ import annotations

import hashlib
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from quantkit import formats
from quantkit.algos.quantizer import QuantizedWeight
from quantkit.calibration import circular_shifts, load_text, random_windows, read_chats, render_chats, tokenize
from quantkit.errors import QuantkitError
from quantkit.export import Exporter, manifest
from quantkit.export.card import add_metrics, recipe_label, recipe_steps
from quantkit.checkpoint import WeightSource, layer_state
from quantkit.distributed import World, init_world
from quantkit.export.writer import ExportFolder, ResumeState
from quantkit.model import Adapter, compute_device, load_model, load_model_lazy, outer_names
from quantkit.walk import walk_layers
from quantkit.preflight import SMALL_CALIBRATION
from quantkit.progress import log, warn
from quantkit.recipe import Recipe


@dataclass
class Run:
    """What a finished run produced: the in-memory model holds the dequantized weights."""

    model: nn.Module
    output: Path | None
    seconds: float
    manifest: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """Perplexity to measure on the finished export (and on the FP model): text source, first
    ``max_tokens`` tokens (None = all), windows of ``seqlen``."""

    dataset: str
    max_tokens: int | None = None
    seqlen: int = 2048


def calibration_tokens(tokenizer, source: str | None, recipe: Recipe, chat_template: bool = False) -> tuple[torch.Tensor, dict]:
    """([nsamples·expand, seqlen] random windows of the calibration text, what the manifest records
    of it: source, text tokens, window tokens, SHA-256 of the windows)."""
    if source is None:
        raise QuantkitError("this recipe needs calibration text: pass --calibration FILE (.txt, .jsonl, .parquet) or a set name")
    text = render_chats(read_chats(Path(source)), tokenizer) if chat_template else load_text(source, "calibration")
    ids = tokenize(tokenizer, text)
    if ids.numel() < recipe.nsamples * recipe.seqlen:
        warn(
            f"calibration text has {ids.numel()} tokens, fewer than --nsamples × --seqlen = "
            f"{recipe.nsamples * recipe.seqlen}: the random windows overlap"
        )
    if ids.numel() < SMALL_CALIBRATION:
        warn(f"calibration text has only {ids.numel()} tokens (under {SMALL_CALIBRATION}): GPTQ and AWQ fitted to so "
             "little text can do worse than RTN; calibrate on more, e.g. --calibration c4")
    windows = circular_shifts(random_windows(ids, recipe.nsamples, recipe.seqlen, recipe.seed), recipe.expand)
    info = {"source": source, "chat_template": chat_template, "text_tokens": ids.numel(),
            "tokens": windows.numel(), "sha256": _sha256(windows)}
    return windows, info


def stream_layers(
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
    verbose: bool = False,
) -> None:
    """Run the layer walk over ``model`` (left holding the dequantized weights), streaming each finished layer to ``exporter``
    and recording progress in ``resume``."""
    layers = adapter.layers(model)
    start = resume.layers_done if resume is not None else 0

    def restore(i: int, layer: nn.Module) -> None:
        """Put written layer ``i`` back into ``layer`` (quantized Linears as their dequantized weights)."""
        state = layer.state_dict()
        tensors = layer_state(exporter.read_layer(i), adapter, layer)
        layer.load_state_dict({k: v.to(state[k].dtype) if v.is_floating_point() else v for k, v in tensors.items()}, assign=True)

    walk = walk_layers(model, adapter, tokens, recipe, device, show_progress, offload=offload,
                       weights=weights, restore=restore, start=start, world=world, verbose=verbose,
                       experts_sink=exporter)
    for i, results in walk:
        if exporter is not None:
            written = exporter.add_layer(i, *checkpoint_tensors(layers[i], adapter, results))
            if resume is not None:
                for path in written:
                    resume.record(path)
        if resume is not None:
            resume.layers_done = i + 1
            resume.save()


def checkpoint_tensors(layer: nn.Module, adapter: Adapter, results: dict[str, QuantizedWeight]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """A finished decoder layer as the exporter takes it, by checkpoint names (layer-relative): its
    tensors outside the routed experts except the quantized Linears' weights, and the quantized weights."""
    state = layer.state_dict()
    tensors = {}
    for name, stored in adapter.dense_names(layer).items():
        module, _, leaf = name.rpartition(".")
        if not (leaf == "weight" and module in results):
            tensors[stored] = state[name]
    return tensors, {adapter.checkpoint_name(name): q for name, q in results.items()}


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
    restart: bool = False,
    chat_template: bool = False,
    evaluation: Evaluation | None = None,
    base_model: str | None = None,
    verbose: bool = False,
) -> Run:
    """Quantize ``source`` with ``recipe``; export to ``output`` (None = in memory only).

    ``keep_model`` False streams: each decoder layer is read from the checkpoint when reached and
    released after export, so host memory holds one layer (``Run.model`` then has no layer weights).
    A saved partial run of ``output`` is continued with ``resume``, discarded with ``restart``, and
    otherwise refused. ``evaluation`` measures the export's (and the FP model's) perplexity into its
    manifest and card; ``base_model`` is the hub id the card names when ``source`` is a local folder."""
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
    folder = ExportFolder(out, Path(source) if Path(source).is_dir() else None) if writes else None
    state = None
    if folder is not None:
        state = folder.open(force, resume, restart)  # before the (slow) model load
    try:
        try:
            if keep_model or out is None:
                model, tokenizer, adapter = load_model(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
                weights = None
            else:
                model, tokenizer, adapter, weights = load_model_lazy(source, trust_remote_code, allow_pickle)
            if recipe.export_format == "gguf" and writes:
                formats.gguf.preflight(model.config, source)
            tokens, calibration_info = None, None
            if recipe.needs_calibration:
                tokens, calibration_info = calibration_tokens(tokenizer, calibration, recipe, chat_template)
        except BaseException:
            if folder is not None and state is None:
                folder.discard()
            raise
        if recipe.format == "auto":
            fmt, why = formats.choose(recipe, moe=adapter.moe is not None)
            if fmt != recipe.export_format:  # the model decided (MoE): the recipe names its format from here on
                recipe = replace(recipe, format=fmt)
            if world.is_main:
                log(f"--format auto chose {fmt}: {why}")
        if world.is_main:
            parallel = f", {world.size} data-parallel processes" if world.size > 1 else ""
            log(f"quantizing {source} → {out or '(memory)'}: {recipe_label(recipe)}, device {dev}{parallel}")
            layers = len(adapter.layers(model))
            log(f"steps per layer ({layers} layers): {' → '.join(recipe_steps(recipe))}")
            if calibration_info:
                log(f"calibration: {calibration} ({calibration_info['text_tokens']} tokens of text), "
                    f"{tokens.shape[0]} windows × {recipe.seqlen} tokens, seed {recipe.seed}")
        if folder is None:
            stream_layers(model, adapter, recipe, tokens, dev, None, show_progress, offload, weights, world=world, verbose=verbose)
            return Run(model, None, time.perf_counter() - started)
        tmp = folder.tmp
        if state is not None:
            state.check(recipe.to_dict(), source, _sha256(tokens))
            log(f"resuming after {state.layers_done} finished layers")
        try:
            if state is None:
                state = ResumeState(tmp, recipe.to_dict(), source, _sha256(tokens))
                state.save()
            exporter = Exporter(tmp, recipe, max_shard_bytes, adapter.layers_path)
            stream_layers(model, adapter, recipe, tokens, dev, exporter, show_progress, offload, weights, state, world, verbose)
            seconds = time.perf_counter() - started
            extra = {"source_bytes": _folder_bytes(Path(source))}
            if base_model:
                extra["base_model"] = base_model
            if calibration_info:
                extra["calibration"] = calibration_info
            info = manifest(recipe, source, seconds, extra)
            info["timings"]["peak_memory_bytes"] = _peak_memory(dev)  # run measurements sit apart from the result
            state_dict = model.state_dict()
            rest = {name: state_dict[name] for name in outer_names(state_dict, adapter, model.config)}
            ignore = adapter.moe.ignore_patterns() if adapter.moe is not None else None
            exporter.finish(model.config, rest, source, tokenizer, info, ignore)
            (tmp / "resume.json").unlink()
            folder.finalize(force)
        except KeyboardInterrupt:
            raise QuantkitError(
                f"interrupted after {state.layers_done} layers: the finished work is kept in {tmp}; "
                "rerun the same command with --resume to continue"
            ) from None
        except BaseException:
            folder.discard()
            raise
    finally:
        if folder is not None:
            folder.close()
    if evaluation is not None:
        model = weights = None  # the FP model is reloaded for its perplexity: one model in memory at a time
        info = add_metrics(out, recipe, measure(source, out, tokenizer, evaluation, dev, show_progress, trust_remote_code, allow_pickle))
    result = Run(model, out, time.perf_counter() - started, info)
    if show_progress:
        log(summary(result))
    return result


def measure(source: str, out: Path, tokenizer, evaluation: Evaluation, device: torch.device, show_progress: bool,
            trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Perplexity (float32 activations) of the export in ``out`` and of the FP model ``source`` on the same tokens."""
    from quantkit.evaluate import perplexity
    from quantkit.runtime import load_quantized

    ids = tokenize(tokenizer, load_text(evaluation.dataset, "evaluation"))[: evaluation.max_tokens]
    quantized, n = perplexity(load_quantized(out, torch.float32, device), ids, evaluation.seqlen, show_progress)
    fp_model = load_model(source, torch.float32, trust_remote_code, allow_pickle)[0].to(device)
    fp, _ = perplexity(fp_model, ids, evaluation.seqlen, show_progress)
    return {"eval_dataset": evaluation.dataset, "eval_tokens": n, "eval_seqlen": evaluation.seqlen,
            "perplexity": round(quantized, 4), "fp_perplexity": round(fp, 4)}


def summary(result: Run) -> str:
    """The final line of a run: time, peak memory, size before/after, where the card is."""
    info = result.manifest
    size = sum(f.stat().st_size for f in result.output.iterdir() if f.suffix in (".safetensors", ".gguf"))
    before = info.get("source_bytes")
    sizes = f"{before / 2**20:.1f} MiB → {size / 2**20:.1f} MiB ({size / before:.1%})" if before else f"{size / 2**20:.1f} MiB"
    peak = info["timings"]["peak_memory_bytes"]
    return (f"done in {result.seconds:.1f}s · peak memory {peak / 2**30:.2f} GiB · size {sizes} · "
            f"model card {result.output / 'README.md'}")


def _peak_memory(device: torch.device) -> int:
    """Peak resident memory of this process in bytes (the CUDA peak when computing on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _folder_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
