"""The AWQ transforms (quantkit.algos.awq): per-channel scales searched for each group of Linears
sharing an input and folded into the op before them, and the per-group range clip. Both run on
the layer before its solves, from the input statistics the walk collects for them."""

from __future__ import annotations

from torch import nn

from quantkit.algos.awq import apply_clip, awq_clip_search, awq_scale_search
from quantkit.fuse import scale_readers
from quantkit.walk.layer import LayerContext


def awq_scales(ctx: LayerContext, _state=None) -> list[str]:
    """Search and fold AWQ scales for each of the adapter's AWQ groups (previous op → Linears reading
    its output). Returns one note per group: the chosen α, or why it was skipped."""
    notes = []
    for previous_name, reader_names in ctx.adapter.awq_groups:
        previous = ctx.layer.get_submodule(previous_name)
        readers = {name: ctx.layer.get_submodule(name) for name in reader_names}
        first = next(iter(readers.values()))
        if isinstance(previous, nn.Linear) and previous.out_features != first.in_features:
            notes.append(f"{previous_name}→{reader_names[0]}: skipped (grouped-query attention)")
            continue
        stats = ctx.statistics({reader_names[0]: first})[reader_names[0]]
        found = awq_scale_search(stats.hessian.value, stats.absmean, [m.weight for m in readers.values()], ctx.grid,
                                 ctx.recipe.awq_duo)
        scale_readers(previous, list(readers.values()), found.scales)
        notes.append(f"{'/'.join(n.split('.')[-1] for n in reader_names)} α={found.alpha:.2f}")
    return notes


def awq_clip(ctx: LayerContext, _state=None) -> list[str]:
    """Shrink each (row, group) range of the Linears whose errors do not pass through q·k
    (``Adapter.clip_skip``) to minimise that group's output error."""
    clipped = {n: ctx.layer.get_submodule(n) for n in ctx.adapter.linear_names() if n not in ctx.adapter.clip_skip}
    for name, stats in ctx.statistics(clipped, ctx.adapter.input_owners(clipped)).items():
        w = clipped[name].weight
        shrink = awq_clip_search(stats.hessian.value, w.data, ctx.grid)
        w.data = apply_clip(w.data.float(), shrink, ctx.grid).to(w.dtype)
    return []
