"""The layer walk: owns the model, the devices, the hooks and the order; runs the recipe's methods
(quantkit.methods) and offers them what their table entries ask for. It knows no method by name.

model-level transforms (rotation) → capture the first decoder layer's inputs → for each layer:
  onload/check → transforms that need no statistics (rotate) → [FP outputs] → importance →
  transforms on statistics (AWQ scales, clip) → solve (per true-sequential group: statistics, then
  each stack of Linears sharing an input; or the whole layer for a block-wise solver) → MoE block →
  propagate (the next layer's inputs, from the quantized layer) → offload.
Peak device memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import nn

from quantkit import methods
from quantkit.algos.quantizer import QuantizedWeight
from quantkit.checkpoint import WeightSource
from quantkit.distributed import World
from quantkit.errors import QuantkitError
from quantkit.formats import check_packable
from quantkit.methods.importance import token_weights
from quantkit.model import Adapter
from quantkit.moe import ExpertBank
from quantkit.progress import LayerProgress
from quantkit.recipe import Recipe
from quantkit.walk.capture import (
    BlockReuse,
    LayerInputs,
    activation_storage,
    capture_inputs,
    capture_qk,
    check_finite,
    layer_outputs,
)
from quantkit.walk.layer import ImportanceBatch, LayerContext, compact
from quantkit.walk.moe import restored_moe_outputs, solve_moe_block


@torch.no_grad()
def walk_layers(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor | None,
    recipe: Recipe,
    device: torch.device,
    show_progress: bool = True,
    batch_tokens: int = 4096,
    offload: bool | None = None,
    weights: WeightSource | None = None,
    restore: Callable[[int, nn.Module], None] | None = None,
    start: int = 0,
    world: World = World(),
    verbose: bool = False,
    experts_sink=None,
) -> Iterator[tuple[int, dict[str, QuantizedWeight]]]:
    """Solve every decoder layer in order; yields (layer index, {module name: quantized weight}).

    The model's Linear weights are replaced in place by their dequantized values (in their dtype);
    model-level transforms (``recipe.rotate``) run first (the FP function is unchanged).
    ``weights``: layers live on meta and are read from it when reached, then released.
    ``start``/``restore``: layers before ``start`` are already done (resume) — ``restore(i, layer)``
    puts back their quantized tensors, and they are only run to recompute the next inputs.
    ``world``: data-parallel processes sharing the calibration batches (see quantkit.distributed).
    ``verbose``: a progress line per module, not only per layer.
    MoE layers: the routed experts are not in the yielded results; each is handed to
    ``experts_sink.add_experts(i, e, {checkpoint name: quantized weight})`` as soon as it is solved,
    and the layer's calibration coverage to ``experts_sink.add_coverage(i, summary)``."""
    plan = methods.plan(recipe)
    layers = adapter.layers(model)
    states = {m.name: m.load("prepare")(model, adapter, recipe) for m in plan.model_transforms}
    inputs = calibration_inputs(model, adapter, tokens, device, batch_tokens, offload, world) if tokens is not None else None
    with LayerProgress(len(layers), enabled=show_progress and world.is_main, verbose=verbose) as progress:
        for i, layer in enumerate(layers):
            dtype = onload(layer, adapter, f"{adapter.layers_path}.{i}", weights)
            if i < start:
                restore(i, layer)
                if inputs is not None:
                    inputs.hidden = restored_outputs(layer, adapter, inputs, f"{adapter.layers_path}.{i}", device)
                release(layer, dtype, weights)
                progress.layer_done()
                continue
            if adapter.moe_block(layer) is not None:
                check_moe_plan(plan, i)
            ctx = check_layer(i, layer, adapter, recipe, dtype, inputs, world, device, weights)
            transform(ctx, [m for m in plan.transforms if not m.needs], states, progress)
            if inputs is not None and plan.needs(methods.FP_OUTPUTS):
                progress.stage(i, "FP outputs")
                ctx.fp_outputs = layer_outputs(layer, inputs)
            if inputs is not None:
                progress.stage(i, "importance")
                ctx.importance = token_importance(ctx, plan.importance)
            transform(ctx, [m for m in plan.transforms if m.needs], states, progress)
            _round_unquantized(layer, ctx.adapter, dtype)
            reuse = BlockReuse(layer, ctx.adapter, inputs.storage) if inputs is not None else None
            results = solve(ctx, plan.solver, reuse, progress)
            if ctx.bank is not None:
                results.update(solve_moe_block(ctx, plan.solver, reuse, progress, len(layers), device, experts_sink))
            if inputs is not None:
                progress.stage(i, "outputs")
                inputs.hidden = layer_outputs(layer, inputs, reuse)
                check_finite(inputs.hidden, f"the outputs of layer {i}")
            layer.to("cpu", dtype)
            if ctx.bank is not None:
                ctx.bank.give_back(ctx.block)
            progress.layer_done(i)
            yield i, results
            release(layer, dtype, weights)


# --- stages ------------------------------------------------------------------------------------------


def calibration_inputs(model: nn.Module, adapter: Adapter, tokens: torch.Tensor, device: torch.device, batch_tokens: int,
                       offload: bool | None, world: World) -> LayerInputs:
    """What enters decoder layer 0 for calibration tokens [S, L], in batches of about ``batch_tokens``."""
    batch = max(1, batch_tokens // tokens.shape[1])
    batches = -(-tokens.shape[0] // batch)
    if batches < world.size:
        raise QuantkitError(
            f"{tokens.shape[0]} calibration windows make {batches} batches of {batch}, fewer than the "
            f"{world.size} data-parallel processes: raise --nsamples or use fewer processes"
        )
    storage = activation_storage(device, tokens, model.config, offload)
    inputs = capture_inputs(model, adapter, tokens, device, batch, storage, world)
    check_finite(inputs.hidden, "the embeddings' output")
    return inputs


def onload(layer: nn.Module, adapter: Adapter, prefix: str, weights: WeightSource | None) -> torch.dtype:
    """Read a streamed layer's tensors (its routed experts stay on disk); returns the layer's dtype."""
    dtype = next(layer.parameters()).dtype
    if weights is not None:
        block = adapter.moe_block(layer)
        weights.load_into(layer, prefix, dtype, None if block is None else adapter.dense_names(layer))
    return dtype


def check_layer(i: int, layer: nn.Module, adapter: Adapter, recipe: Recipe, dtype: torch.dtype, inputs: LayerInputs | None,
                world: World, device: torch.device, weights: WeightSource | None) -> LayerContext:
    """Refuse shapes the recipe cannot group or pack, take an MoE layer's routed experts out (they
    go to the device one at a time), move the rest to ``device`` in float32, refuse non-finite weights."""
    layer_adapter, block = adapter.for_layer(layer), adapter.moe_block(layer)
    check_shapes(layer, i, layer_adapter, recipe)
    prefix = f"{adapter.layers_path}.{i}"
    bank = ExpertBank.take(block, adapter.moe, prefix, weights) if block is not None else None
    layer.to(device, torch.float32)
    for name, p in layer.named_parameters():
        if not torch.isfinite(p).all():
            raise QuantkitError(f"NaN or Inf in the weights of layer {i} ({name}): the checkpoint is damaged")
    return LayerContext(i, prefix, layer, layer_adapter, adapter, recipe, recipe.grid, dtype, inputs, world, block, bank)


def check_moe_plan(plan: methods.Plan, i: int) -> None:
    """An MoE layer's experts are solved one at a time by a stack solver, and the layer never runs
    whole before its experts are solved: refuse methods needing the whole FP layer."""
    whole = [m for m in plan.methods if m.scope == "layer" and m.kind == "solver" or methods.FP_OUTPUTS in m.needs]
    if whole:
        names = ", ".join(f"{m.kind} {m.name}" for m in whole)
        raise QuantkitError(f"layer {i} is a mixture of experts: {names} needs the whole FP layer, which the walk "
                            "does not run for MoE layers; choose another method")


def transform(ctx: LayerContext, transforms: list[methods.Method], states: dict, progress: LayerProgress) -> None:
    """Run layer transforms in order, each with its model-level state (if it has one)."""
    for method in transforms:
        progress.stage(ctx.index, method.name)
        notes = method.load()(ctx, states.get(method.name))
        if notes:
            progress.note(ctx.index, progress.total, f"{method.name} " + ", ".join(notes))


def token_importance(ctx: LayerContext, method: methods.Method) -> list[torch.Tensor] | None:
    """Importance weights [b, L] per batch (mean 1 per sample), from this layer's view of its
    inputs; None when the strategy weighs every token by 1."""
    if method.entry is None:
        return None
    score, inputs, raw = method.load(), ctx.inputs, []
    for b, x in enumerate(inputs.batches()):
        batch = ImportanceBatch(x)
        if methods.QK in method.needs:
            batch.qk = capture_qk(ctx.layer, ctx.adapter, x, inputs.kwargs)
        if methods.FP_OUTPUTS in method.needs:
            batch.fp_output = ctx.fp_outputs[b].to(inputs.device)
        raw.append(score(batch))
    return token_weights(raw, ctx.recipe, inputs.device)


def solve(ctx: LayerContext, solver: methods.Method, reuse: BlockReuse | None, progress: LayerProgress) -> dict[str, QuantizedWeight]:
    """Solve the layer's dense Linears: a block-wise solver on the whole layer at once (with autograd
    when it asks for gradients); a stack solver group by group in true-sequential order, each group
    on statistics of inputs that already carry the earlier groups' quantization."""
    n = progress.total
    if solver.scope == "layer":
        started = time.perf_counter()
        with torch.enable_grad() if methods.GRADIENTS in solver.needs else nullcontext():
            solved = solver.load()(ctx)
        results = {}
        for name, q in solved.items():
            _install(ctx, [name], q, results)
        progress.module(ctx.index, n, "layer", time.perf_counter() - started, None)
        return results
    solve_stack, results = solver.load(), {}
    for group in ctx.adapter.sequential:
        modules = {name: ctx.layer.get_submodule(name) for name in group}
        owners = ctx.adapter.input_owners(modules)
        hessians = {}
        if methods.HESSIAN in solver.needs:
            progress.stage(ctx.index, "hessians " + "/".join(n.split(".")[-1] for n in group))
            hessians = {name: s.hessian for name, s in ctx.statistics(modules, owners, reuse).items()}
        for j, names in enumerate(_stacks(owners)):
            started = time.perf_counter()
            label = names[0] + "".join("/" + n.rsplit(".", 1)[-1] for n in names[1:])
            rows = [modules[name].weight.data for name in names]
            weight = torch.cat(rows) if len(rows) > 1 else rows[0]  # a lone Linear: no copy
            q, loss = None, None
            if ctx.world.owns(j):
                q, loss = solve_stack(weight, hessians.get(names[0]), ctx.recipe, ctx.grid, f"layer {ctx.index} {label}")
            q, loss = ctx.world.share(j % ctx.world.size, q, loss, weight)
            _install(ctx, names, q, results)
            progress.module(ctx.index, n, label, time.perf_counter() - started, loss)
    return results


def _install(ctx: LayerContext, names: list[str], q: QuantizedWeight, results: dict[str, QuantizedWeight]) -> None:
    """Put the solved weights of Linears ``names`` (stacked by rows in ``q``) into the layer as the
    exported (dtype-rounded) values, so that the next inputs are the exported model's, and record them."""
    modules = [ctx.layer.get_submodule(name) for name in names]
    for name, module, part in zip(names, modules, q.split_rows([m.weight.shape[0] for m in modules])):
        module.weight.data = part.dequantize().to(ctx.dtype).to(module.weight.dtype)
        results[name] = compact(part)


def _stacks(owners: dict[str, str]) -> list[list[str]]:
    """Linears that read one input (q/k/v; gate/up) as one stack: they share H and act-order's
    column order, and GPTQ treats rows independently, so one solve over the stacked rows gives each
    Linear exactly its own result while running the per-column loop once."""
    stacks: dict[str, list[str]] = {}
    for name, owner in owners.items():
        stacks.setdefault(owner, []).append(name)
    return list(stacks.values())


def _round_unquantized(layer: nn.Module, adapter: Adapter, dtype: torch.dtype) -> None:
    """Round the parameters exported as they are (norms with folded AWQ scales, biases) to the
    checkpoint's ``dtype``: the walk then computes the next layer's inputs with exactly the
    exported model's values, as a resumed walk (which reads them back) does."""
    quantized = {f"{name}.weight" for name in adapter.linear_names()}
    for name, p in layer.named_parameters():
        if name not in quantized:
            p.data = p.data.to(dtype).to(p.dtype)


def restored_outputs(layer: nn.Module, adapter: Adapter, inputs: LayerInputs, prefix: str,
                     device: torch.device) -> list[torch.Tensor]:
    """The next layer's inputs from a layer restored from the export (--resume)."""
    block = adapter.moe_block(layer)
    if block is not None:
        return restored_moe_outputs(layer, block, adapter, inputs, prefix, device)
    layer.to(device, torch.float32)
    return layer_outputs(layer, inputs)


def release(layer: nn.Module, dtype: torch.dtype, weights: WeightSource | None) -> None:
    """Offload a finished layer: back to CPU, or (streaming) back to meta, freeing its memory."""
    layer.to("meta" if weights is not None else "cpu", dtype)


def check_shapes(layer: nn.Module, index: int, adapter: Adapter, recipe: Recipe) -> None:
    """Fail before quantizing a layer whose Linears (and routed experts) cannot be grouped or packed
    with this recipe."""
    shapes = {name: layer.get_submodule(name).weight.shape for name in adapter.linear_names()}
    block = adapter.moe_block(layer)
    if block is not None:
        experts = block.get_submodule(adapter.moe.experts)
        _, hidden, inter = experts.down_proj.shape
        shapes.update({f"{adapter.moe.block}.experts gate/up": (2 * inter, hidden), f"{adapter.moe.block}.experts down": (hidden, inter)})
        if adapter.moe.shared is not None:
            shared = f"{adapter.moe.block}.{adapter.moe.shared}"
            shapes.update({f"{shared}.{n}": m.weight.shape for n, m in block.get_submodule(adapter.moe.shared).named_children()
                           if isinstance(m, nn.Linear)})
    for name, (out_f, in_f) in shapes.items():
        where = f"layer {index} {name} (in_features {in_f})"
        if recipe.group_size != -1 and in_f % recipe.group_size:
            valid = [g for g in (32, 64, 128, 256) if in_f % g == 0] + [-1]
            raise QuantkitError(
                f"--group-size {recipe.group_size} does not divide {where}: valid sizes {', '.join(map(str, valid))}"
            )
        check_packable(where, out_f, in_f, recipe.bits)
