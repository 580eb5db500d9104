"""The layer walk: owns the model, the devices and the order; calls the algorithms.

capture the first decoder layer's inputs → for each layer: onload, [importance], Hessians per
true-sequential group, GPTQ/RTN, recompute outputs with the quantized weights → offload.
Peak device memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.algos.gptq import CholeskyError, Hessian, gptq_quantize
from quantkit.algos.quantizer import QuantizedWeight, rtn_quantize
from quantkit.errors import QuantkitError
from quantkit.model import Adapter
from quantkit.progress import LayerProgress, warn
from quantkit.recipe import Recipe


class _Captured(Exception):
    """Raised by a hook once it has recorded what it needs, to cut the forward short."""


@dataclass
class LayerInputs:
    """Calibration activations entering a decoder layer: hidden [b, L, C] per batch, shared kwargs."""

    hidden: list[torch.Tensor]
    kwargs: dict


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def check_shapes(model: nn.Module, adapter: Adapter, recipe: Recipe) -> None:
    """Fail before any work when a Linear cannot be quantized/packed with this recipe."""
    for i, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names():
            out_f, in_f = layer.get_submodule(name).weight.shape
            where = f"layer {i} {name} (in_features {in_f})"
            if recipe.group_size != -1 and in_f % recipe.group_size:
                valid = [g for g in (32, 64, 128, 256) if in_f % g == 0] + [-1]
                raise QuantkitError(
                    f"--group-size {recipe.group_size} does not divide {where}: valid sizes {', '.join(map(str, valid))}"
                )
            if in_f % 32 or (out_f * recipe.bits) % 32:
                raise QuantkitError(f"{where} × out_features {out_f} cannot be packed into int32 words at {recipe.bits} bits")


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, tokens: torch.Tensor, device: torch.device, batch: int) -> LayerInputs:
    """Run the embeddings on ``device`` and record what enters decoder layer 0, for tokens [S, L]."""
    first = adapter.layers(model)[0]
    pre = adapter.pre_layer_modules(model)
    seen: dict = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs.pop("hidden_states")).to(device, torch.float32)
        seen["kwargs"] = {k: _to(v, device) for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    for m in pre:
        m.to(device)
    hidden = []
    try:
        for start in range(0, tokens.shape[0], batch):
            try:
                model.model(input_ids=tokens[start : start + batch].to(device), use_cache=False)
            except _Captured:
                hidden.append(seen["hidden"])
    finally:
        handle.remove()
        for m in pre:
            m.to("cpu")
    return LayerInputs(hidden, seen["kwargs"])


def _forward(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    outputs = []
    for x in inputs.hidden:
        out = layer(x, **inputs.kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _check_finite(tensors: list[torch.Tensor], what: str) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise QuantkitError(f"NaN or Inf in {what}: the checkpoint or calibration produced non-finite values")


@torch.no_grad()
def quantize_layers(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    recipe: Recipe,
    device: torch.device,
    importance_fn=None,
    show_progress: bool = True,
    batch_tokens: int = 4096,
) -> Iterator[tuple[int, dict[str, QuantizedWeight]]]:
    """Quantize every decoder layer in order; yields (layer index, {module name: quantized weight}).

    The model's Linear weights are replaced in place by their dequantized values (in their dtype).
    ``importance_fn(layer, inputs) -> list of [b, L] weights`` scales each token's Hessian term."""
    layers = adapter.layers(model)
    grid = recipe.grid
    check_shapes(model, adapter, recipe)
    inputs = None
    if recipe.method == "gptq":
        batch = max(1, batch_tokens // tokens.shape[1])
        inputs = capture_inputs(model, adapter, tokens, device, batch)
        _check_finite(inputs.hidden, "the embeddings' output")

    with LayerProgress(len(layers), enabled=show_progress) as progress:
        for i, layer in enumerate(layers):
            dtype = next(layer.parameters()).dtype
            layer.to(device, torch.float32)
            for name, p in layer.named_parameters():
                if not torch.isfinite(p).all():
                    raise QuantkitError(f"NaN or Inf in the weights of layer {i} ({name}): the checkpoint is damaged")
            importance = None
            if importance_fn is not None and inputs is not None:
                progress.stage(i, "importance")
                importance = importance_fn(layer, inputs)
            results = {}
            for group in adapter.sequential:
                modules = {name: layer.get_submodule(name) for name in group}
                hessians = {}
                if recipe.method == "gptq":
                    progress.stage(i, "hessians " + "/".join(n.split(".")[-1] for n in group))
                    hessians = _collect_hessians(layer, modules, inputs, importance)
                for name, module in modules.items():
                    started = time.perf_counter()
                    q, loss = _quantize_module(module, hessians.get(name), recipe, grid, f"layer {i} {name}")
                    module.weight.data = q.dequantize().to(module.weight.dtype)
                    results[name] = _compact(q)
                    progress.module(i, len(layers), name, time.perf_counter() - started, loss)
            if inputs is not None:
                progress.stage(i, "outputs")
                inputs.hidden = _forward(layer, inputs)
                _check_finite(inputs.hidden, f"the outputs of layer {i}")
            layer.to("cpu", dtype)
            progress.layer_done()
            yield i, results


def _collect_hessians(layer, modules: dict[str, nn.Module], inputs: LayerInputs, importance) -> dict[str, Hessian]:
    """Accumulate each module's input Hessian over all batches; each forward stops as soon as
    every module of the group has seen its input (the rest of the layer is not needed)."""
    hessians = {name: Hessian(m.in_features, m.weight.device) for name, m in modules.items()}
    seen: set[str] = set()
    current = {}

    def make_hook(name):
        def hook(_module, args):
            hessians[name].add_batch(args[0], current.get("r"))
            seen.add(name)
            if len(seen) == len(modules):
                raise _Captured

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    try:
        for b, x in enumerate(inputs.hidden):
            current["r"] = None if importance is None else importance[b]
            seen.clear()
            try:
                layer(x, **inputs.kwargs)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def _quantize_module(module: nn.Linear, hessian: Hessian | None, recipe: Recipe, grid, where: str):
    if hessian is None:
        return rtn_quantize(module.weight.data, grid), None
    H = hessian.value
    if not torch.isfinite(H).all():
        raise QuantkitError(f"NaN or Inf in the activations entering {where}")
    try:
        result = gptq_quantize(
            module.weight.data, H, grid, block_size=recipe.block_size, damp=recipe.damp, act_order=recipe.act_order
        )
    except CholeskyError as e:
        raise QuantkitError(f"GPTQ failed on {where}: {e}; retry with a larger --damp (e.g. 0.1)") from None
    if result.damp != recipe.damp:
        warn(f"{where}: Hessian needed damping {result.damp:g} (asked {recipe.damp:g}) to be positive definite")
    return result.weight, result.loss


def _compact(q: QuantizedWeight) -> QuantizedWeight:
    """Move to CPU with integer codes/zeros as uint8 (what export packs)."""
    return QuantizedWeight(
        q.codes.to("cpu", torch.uint8),
        q.scales.to("cpu", torch.float32),
        q.zeros.to("cpu", torch.uint8),
        q.g_idx.to("cpu"),
        q.bits,
        q.group_size,
    )
