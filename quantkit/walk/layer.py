"""What the walk offers the methods (quantkit.methods) for one decoder layer: the layer on the
compute device in float32, its calibration inputs, and the statistics the methods ask for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.algos.quantizer import QuantizedWeight
from quantkit.distributed import World
from quantkit.model import Adapter
from quantkit.moe import ExpertBank
from quantkit.recipe import Recipe
from quantkit.algos.rotation import fold_norm
from quantkit.walk.capture import BlockReuse, InputStats, LayerInputs


@dataclass
class ImportanceBatch:
    """What an importance strategy scores for one calibration batch; only what its entry's ``needs``
    ask for is set. x: the layer's inputs [b, L, C]; qk: (q [b, Hq, L, D], k [b, Hkv, L, D]
    post-RoPE, attention mask or None, softmax scaling); fp_output: the FP layer's output [b, L, C]."""

    x: torch.Tensor
    qk: tuple | None = None
    fp_output: torch.Tensor | None = None


@dataclass
class LayerContext:
    """One decoder layer as the walk hands it to a layer-scope method.

    ``adapter``: as the dense walk sees this layer (``Adapter.for_layer``: an MoE layer's experts
    are the MoE stage's); ``full_adapter``: the model's. ``inputs``: None when the recipe needs no
    calibration. ``importance``: r_t [b, L] per batch (None: every token weighs 1), set once the
    importance stage ran; ``fp_outputs``: the layer's outputs before any solve, [b, L, C] per batch,
    set when a method needs them. ``dtype``: the checkpoint's dtype of the layer; ``world``: the
    data-parallel processes."""

    index: int
    prefix: str
    layer: nn.Module
    adapter: Adapter
    full_adapter: Adapter
    recipe: Recipe
    grid: object
    dtype: torch.dtype
    inputs: LayerInputs | None
    world: World
    block: nn.Module | None = None
    bank: ExpertBank | None = None
    importance: list[torch.Tensor] | None = None
    fp_outputs: list[torch.Tensor] | None = None


@dataclass
class GroupContext:
    """One true-sequential group as the walk hands it to a group-scope transform (AWQ), between its
    statistics pass and its solves. ``stats``: {Linear: InputStats of its input} (Linears reading one
    input share one); ``solved``: the layer's Linears solved so far, as exported."""

    layer: LayerContext
    names: tuple[str, ...]
    stats: dict[str, InputStats]
    solved: dict[str, QuantizedWeight]
    reuse: BlockReuse | None

    def fold(self, previous: str, readers: tuple[str, ...], s: torch.Tensor) -> torch.Tensor:
        """Scale the readers' input channels by s [C] (W diag(s)) and divide the output of ``previous``
        (the op writing their input) by s, leaving the layer's function unchanged: a norm's weight or
        an unsolved Linear's rows and bias directly; a solved Linear through its stored per-row scales
        (``rescale_rows``). Unquantized parameters are rounded to the checkpoint dtype at once (as
        exported). Returns d [C], the readers' inputs now being x diag(d) (1/s up to that rounding)."""
        ctx = self.layer
        op = ctx.layer.get_submodule(previous)
        s64 = s.double()
        if isinstance(op, nn.Linear):
            if op.out_features != s.numel():
                raise ValueError(f"{op.out_features} outputs of {previous} cannot absorb {s.numel()} scales")
            if previous in self.solved:
                self.solved[previous] = rescale_rows(self.solved[previous], s)
                op.weight.data = self.solved[previous].dequantize().to(op.weight.device, ctx.dtype).to(op.weight.dtype)
                if self.reuse is not None:
                    for name in readers:
                        self.reuse.forget(name)
            else:
                op.weight.data = (op.weight.double() / s64[:, None]).to(op.weight.dtype)
            if op.bias is not None:
                op.bias.data = (op.bias.double() / s64).to(ctx.dtype).to(op.bias.dtype)
            d = 1 / s64
        else:
            old = op.weight.double()
            op.weight.data = (old / s64).to(ctx.dtype).to(op.weight.dtype)
            d = torch.where(old != 0, op.weight.double() / old.where(old != 0, 1), 1 / s64)
        for name in readers:
            linear = ctx.layer.get_submodule(name)
            linear.weight.data = fold_norm(linear.weight.data, s)
        return d


def rescale_rows(q: QuantizedWeight, s: torch.Tensor) -> QuantizedWeight:
    """Row o of the stored weight divided by s_o [N]: every group scale of the row (and, with offset
    zeros, its mins) divided by s_o and rounded to fp16 as checkpoints store them; the codes and the
    integer zero points (code units, also GPTQ v1's zero − 1) are unchanged. Exact up to that
    rounding (≤ 2⁻¹¹ relative per group). Grids whose scales are an fp16 factor times integer
    sub-block scales (llama.cpp's k-quants) cannot take it: see ``rescalable``."""
    inv = 1 / s.double().to(q.scales.device)[:, None]
    scales = (q.scales.double() * inv).to(torch.float16).to(q.scales.dtype)
    zeros = (q.zeros.double() * inv).to(torch.float16).to(q.zeros.dtype) if q.offset else q.zeros
    return QuantizedWeight(q.codes, scales, zeros, q.g_idx, q.bits, q.group_size, q.offset)


def rescalable(grid, in_features: int) -> bool:
    """Whether ``rescale_rows`` keeps a weight on ``grid`` representable: one fp16 scale per group."""
    grid = grid.for_columns(in_features)
    return grid.span(in_features) == grid.width(in_features)


def compact(q: QuantizedWeight) -> QuantizedWeight:
    """Move to CPU with integer codes/zeros as uint8 (what export packs; offset zeros stay float)."""
    return QuantizedWeight(
        q.codes.to("cpu", torch.uint8),
        q.scales.to("cpu", torch.float32),
        q.zeros.to("cpu", torch.float32 if q.offset else torch.uint8),
        q.g_idx.to("cpu"),
        q.bits,
        q.group_size,
        q.offset,
    )
