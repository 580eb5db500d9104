"""The AWQ transforms (quantkit.algos.awq), run inside the true-sequential order: for each group of
Linears sharing an input, right after the walk's statistics pass of their group and before their
solve, so that the search sees the inputs GPTQ sees (the earlier groups already quantized) and
runs on the very Hessian GPTQ will use.

Folding s: the readers become W diag(s) and read x' = x diag(1/s), so their Hessian becomes
H' = Σ r x' x'ᵀ = D⁻¹ (Σ r x xᵀ) D⁻¹ with D = diag(s): derived, not recollected
(``Hessian.scale_inputs``). The previous op absorbs 1/s: a norm's weight, or a Linear already
solved through its stored per-row scales (``rescale_rows``; up_proj's rows for down_proj's scales).
"""

from __future__ import annotations

from torch import nn

from quantkit.algos.awq import apply_clip, awq_clip_search, awq_scale_search
from quantkit.walk.layer import GroupContext, rescalable


def awq_scales(group: GroupContext, _state=None) -> list[str]:
    """Search and fold AWQ scales for the adapter's AWQ groups read by this true-sequential group
    (previous op → Linears reading its output). Returns one note per AWQ group: α, or why skipped."""
    ctx, notes = group.layer, []
    for previous_name, reader_names in ctx.adapter.awq_groups:
        if reader_names[0] not in group.names:
            continue
        previous = ctx.layer.get_submodule(previous_name)
        readers = [ctx.layer.get_submodule(name) for name in reader_names]
        label = '/'.join(n.split('.')[-1] for n in reader_names)
        if isinstance(previous, nn.Linear) and previous.out_features != readers[0].in_features:
            notes.append(f"{previous_name}→{reader_names[0]}: skipped (grouped-query attention)")
            continue
        if previous_name in group.solved and not rescalable(ctx.grid, previous.in_features):
            notes.append(f"{label}: skipped ({previous_name} is solved; its k-quant scales cannot absorb row scales)")
            continue
        stats = group.stats[reader_names[0]]
        found = awq_scale_search(stats.hessian.value, stats.absmean, [m.weight for m in readers], ctx.grid,
                                 ctx.recipe.awq_duo)
        stats.hessian.scale_inputs(group.fold(previous_name, reader_names, found.scales))
        notes.append(f"{label} α={found.alpha:.2f}")
    return notes


def awq_clip(group: GroupContext, _state=None) -> list[str]:
    """Shrink each (row, group) range of this group's Linears whose errors do not pass through q·k
    (``Adapter.clip_skip``) to minimise that range group's output error, on the Hessian GPTQ uses."""
    ctx = group.layer
    for name in group.names:
        if name in ctx.adapter.clip_skip:
            continue
        w = ctx.layer.get_submodule(name).weight
        shrink = awq_clip_search(group.stats[name].hessian.value, w.data, ctx.grid)
        w.data = apply_clip(w.data.float(), shrink, ctx.grid).to(w.dtype)
    return []
