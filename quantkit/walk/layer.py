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
from quantkit.walk.capture import BlockReuse, InputStats, LayerInputs, input_statistics


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

    def statistics(self, modules: dict[str, nn.Module], owners: dict[str, str] | None = None,
                   reuse: BlockReuse | None = None) -> dict[str, InputStats]:
        """Mean |x| and importance-weighted Hessian of each of ``modules``' inputs over every
        calibration batch, from forwards of the layer as it is now (``input_statistics``)."""
        return input_statistics(self.layer, modules, self.inputs, self.importance, owners, reuse)


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
