"""The rotation transform (RSQ's R): R1 on the residual stream, R2 per attention head, fused into
the weights (quantkit.fuse). Model-level step: build R1/R2 and rotate the embeddings and LM head;
layer step: fold the norms and rotate each decoder layer (and its routed experts) as the walk
reaches it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit import fuse
from quantkit.algos.hadamard import random_orthogonal
from quantkit.model import Adapter
from quantkit.progress import warn
from quantkit.recipe import Recipe
from quantkit.walk.layer import LayerContext


@dataclass
class Rotation:
    """Residual rotation Q [C, C] and per-head value rotation R2 [d, d] (float64)."""

    Q: torch.Tensor
    R2: torch.Tensor
    head_dim: int


def prepare_rotation(model: nn.Module, adapter: Adapter, recipe: Recipe) -> Rotation:
    """Build R1 and R2 and rotate the embeddings and LM head (the layers are rotated as they are reached)."""
    config = model.config
    adapter.check_foldable(model)
    head_dim = adapter.head_dim(config)
    Q, q_is_hadamard = random_orthogonal(config.hidden_size, recipe.rotation_seed)
    R2, r2_is_hadamard = random_orthogonal(head_dim, recipe.rotation_seed + 1)
    for n, ok in ((config.hidden_size, q_is_hadamard), (head_dim, r2_is_hadamard)):
        if not ok:
            warn(f"no Hadamard matrix of order {n} can be built: using a random orthogonal matrix (slower to spread outliers)")
    fuse.rotate_model_ends(model, adapter, Q)
    return Rotation(Q, R2, head_dim)


def rotate_layer(ctx: LayerContext, rotation: Rotation) -> list[str]:
    """Rotate the layer's dense Linears; an MoE layer's routed experts are rotated as each is fetched."""
    fuse.rotate_layer(ctx.layer, ctx.adapter, rotation.Q, rotation.R2, rotation.head_dim)
    if ctx.bank is not None:
        norm = ctx.layer.get_submodule(ctx.full_adapter.moe_input_norm())
        ctx.bank.rotation = fuse.rotate_moe_block(ctx.block, ctx.full_adapter.moe, norm, rotation.Q)
    return []
