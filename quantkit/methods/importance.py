"""Token-importance strategies (quantkit.algos.importance): raw scores [b, L] for one calibration
batch, from what the walk offers (``ImportanceBatch``); ``token_weights`` maps them onto the
recipe's range, giving the r_t that weight the Hessians."""

from __future__ import annotations

import torch

from quantkit.algos import importance as scores
from quantkit.recipe import Recipe
from quantkit.walk.layer import ImportanceBatch


def attention_concentration(batch: ImportanceBatch) -> torch.Tensor:
    q, k, mask, scaling = batch.qk
    return scores.attention_concentration(q, k, scaling, mask)


def activation_norm(batch: ImportanceBatch) -> torch.Tensor:
    return scores.activation_norm(batch.x)


def first_last(batch: ImportanceBatch) -> torch.Tensor:
    return scores.first_last(batch.x.shape[1]).expand(batch.x.shape[0], -1)


def token_weights(raw: list[torch.Tensor], recipe: Recipe, device: torch.device) -> list[torch.Tensor]:
    """Raw scores [b, L] per batch → importance weights [b, L] (mean 1 per sample) on ``device``."""
    reference = scores.REFERENCE_LENGTH if recipe.importance_map == "length-invariant" else None
    return [scores.map_importance(r, recipe.importance_min, recipe.importance_max, reference).to(device) for r in raw]
