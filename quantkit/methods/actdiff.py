"""ActDiff token importance (RSQ, Sung et al. 2025; ylsung/rsq ``MaxDiffWeighting``): a token
matters as much as the FP layer changes it, r_t = ‖y_t − x_t‖₂ with x the layer's input and y its
output before any of its Linears is solved. Costs one extra forward of the layer per batch."""

from __future__ import annotations

import torch

from quantkit.walk.layer import ImportanceBatch


def activation_difference(batch: ImportanceBatch) -> torch.Tensor:
    """‖y_t − x_t‖₂ for x, y [b, L, C]: float32 [b, L]."""
    return (batch.fp_output.float() - batch.x.float()).norm(dim=-1)
