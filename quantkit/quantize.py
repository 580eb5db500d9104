"""One quantization run end to end: load, calibrate, walk the layers, export atomically."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.calibration import circular_shifts, load_text, random_windows, tokenize
from quantkit.errors import QuantkitError
from quantkit.export import Exporter, manifest
from quantkit.export.writer import finalize_output, prepare_output
from quantkit.model import Adapter, compute_device, load_model
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


def needs_calibration(recipe: Recipe) -> bool:
    return recipe.method == "gptq" or recipe.awq


def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    recipe: Recipe,
    tokens: torch.Tensor | None,
    device: torch.device,
    exporter: Exporter | None = None,
    show_progress: bool = True,
    offload: bool | None = None,
) -> None:
    """Quantize ``model`` in place (dequantized weights), streaming each finished layer to ``exporter``."""
    layers = adapter.layers(model)
    for i, results in quantize_layers(model, adapter, tokens, recipe, device, show_progress, offload=offload):
        if exporter is not None:
            exporter.add_layer(f"{adapter.layers_path}.{i}", layers[i], results)


def run(
    source: str,
    output: str | Path | None,
    recipe: Recipe,
    calibration: str | None = None,
    device: str | None = None,
    offload: bool | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    max_shard_bytes: int = 4 * 2**30,
    show_progress: bool = True,
) -> Run:
    """Quantize ``source`` with ``recipe``; export to ``output`` (None = in memory only)."""
    started = time.perf_counter()
    out = Path(output) if output is not None else None
    if out is not None and out.exists() and not force:
        raise QuantkitError(f"output folder '{out}' exists: choose another path or pass --force to replace it")
    model, tokenizer, adapter = load_model(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    tokens = calibration_tokens(tokenizer, calibration, recipe) if needs_calibration(recipe) else None
    dev = compute_device(device)
    log(f"quantizing {source} → {out or '(memory)'}: {recipe.bits}-bit, group {recipe.group_size}, "
        f"{'sym' if recipe.sym else 'asym'}, {recipe.method}, format {recipe.export_format}, device {dev}")
    if out is None:
        quantize_model(model, adapter, recipe, tokens, dev, None, show_progress, offload)
        return Run(model, None, time.perf_counter() - started)
    tmp = prepare_output(out, force)
    try:
        exporter = Exporter(tmp, recipe, max_shard_bytes)
        quantize_model(model, adapter, recipe, tokens, dev, exporter, show_progress, offload)
        seconds = time.perf_counter() - started
        extra = {"source_bytes": _folder_bytes(Path(source))}
        exporter.finish(model, adapter, source, tokenizer, manifest(recipe, source, seconds, extra))
        finalize_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Run(model, out, time.perf_counter() - started)


def _folder_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
