"""Stack solvers: quantize W [N, K] (one Linear, or Linears reading one input stacked by rows) on the
recipe's grid. Each returns (QuantizedWeight, loss or None) and turns a solver failure into one
clear error naming ``where``."""

from __future__ import annotations

import torch

from quantkit.algos.gptq import CholeskyError, Hessian, gptq_solve
from quantkit.algos.quantizer import QuantizedWeight, round_to_nearest
from quantkit.errors import QuantkitError
from quantkit.progress import warn
from quantkit.recipe import Recipe


def rtn_stack(weight: torch.Tensor, _hessian: None, recipe: Recipe, grid, _where: str) -> tuple[QuantizedWeight, None]:
    """Round to nearest: needs no statistics."""
    return round_to_nearest(weight, grid, recipe.clip_search), None


def gptq_stack(weight: torch.Tensor, hessian: Hessian, recipe: Recipe, grid, where: str) -> tuple[QuantizedWeight, float]:
    """GPTQ on the stack's input Hessian, with the recipe's damping, block size and act-order."""
    H = hessian.value
    if not torch.isfinite(H).all():
        raise QuantkitError(f"NaN or Inf in the activations entering {where}")
    try:
        result = gptq_solve(
            weight, H, grid, block_size=recipe.block_size, damp=recipe.damp, act_order=recipe.act_order,
            clip_search=recipe.clip_search,
        )
    except CholeskyError as e:
        raise QuantkitError(f"GPTQ failed on {where}: {e}; retry with a larger --damp (e.g. 0.1)") from None
    if result.damp != recipe.damp:
        warn(f"{where}: Hessian needed damping {result.damp:g} (asked {recipe.damp:g}) to be positive definite")
    return result.weight, result.loss
