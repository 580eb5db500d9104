"""AWQ (Lin et al., 2024): protect salient input channels with per-channel scales, and clip ranges.

For Linears W_i [O_i, C] that read the same input x [T, C], scaling input channel c by s_c
(W' = W diag(s), x' = x diag(1/s)) leaves x Wᵀ unchanged but changes what rounding loses:
channels with large mean |x| get finer steps. The search picks s = mean|x|^α (AWQ-duo:
divided by mean|w|^(1−α)) on a grid of α, minimising the importance-weighted output error

    err(s) = Σ_t r_t ‖x_t Wᵀ − (x_t / s) Q(W diag(s))ᵀ‖² / Σ_t r_t

with Q the recipe's own quantization grid. α = 0 (s = 1) is plain quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algos.quantizer import Grid, rtn_quantize

CLIP_SHRINKS = tuple(1 - i / 20 for i in range(10))  # 1.0, 0.95, …, 0.55


@dataclass
class ScaleSearch:
    """s [C] (the chosen scales), alpha, and the error of every α tried (index 0 is α = 0)."""

    scales: torch.Tensor
    alpha: float
    errors: list[float]


def _weighted_output_error(x: torch.Tensor, r: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor, rows: int = 4096) -> float:
    """Σ_t r_t ‖x_t (W − Ŵ)ᵀ‖² / Σ_t r_t, for x [T, C], r [T], W, Ŵ [O, C], in chunks of output rows."""
    total = 0.0
    for o in range(0, W.shape[0], rows):
        diff = x @ (W[o : o + rows] - W_hat[o : o + rows]).t()
        total += (diff.square().sum(1) * r).sum().item()
    return total / r.sum().item()


def awq_scale_search(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    grid: Grid,
    importance: torch.Tensor | None = None,
    x_absmean: torch.Tensor | None = None,
    duo: bool = False,
    n_grid: int = 20,
) -> ScaleSearch:
    """Search AWQ scales for Linears ``weights`` ([O_i, C] each) reading x [T, C] (r [T] weights tokens).

    ``x_absmean`` [C] is mean |x| over all calibration tokens (default: over x)."""
    x = x.float()
    r = torch.ones(x.shape[0], device=x.device) if importance is None else importance.float().to(x.device)
    W = torch.cat([w.float() for w in weights])
    x_mag = (x.abs().mean(0) if x_absmean is None else x_absmean.float()).clamp(min=1e-8)
    w_mag = (W.abs() / W.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)).mean(0).clamp(min=1e-8)
    best, errors = None, []
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mag.pow(alpha) / (w_mag.pow(1 - alpha) if duo and alpha > 0 else 1)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (geometric mean of extremes)
        W_hat = rtn_quantize(W * s, grid).dequantize() / s
        err = _weighted_output_error(x, r, W, W_hat)
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return ScaleSearch(best[2], best[1], errors)


def awq_clip_search(x: torch.Tensor, W: torch.Tensor, grid: Grid, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per (row, group) range shrink in CLIP_SHRINKS minimising Σ_t r_t (x_t,g · (w_g − Q(w_g)))²: [O, K/G]."""
    x, W = x.float(), W.float()
    r = torch.ones(x.shape[0], device=x.device) if importance is None else importance.float().to(x.device)
    o, c = W.shape
    g = c if grid.group_size == -1 else grid.group_size
    groups = c // g
    best_err = torch.full((o, groups), float("inf"), device=W.device)
    best = torch.ones(o, groups, device=W.device)
    blocks = W.reshape(o * groups, g)
    for shrink in CLIP_SHRINKS:
        scale, zero = grid.fit(blocks, shrink)
        diff = (blocks - grid.fake_quantize(blocks, scale, zero)).reshape(o, groups, g)
        for j in range(groups):
            err = ((x[:, j * g : (j + 1) * g] @ diff[:, j].t()).square() * r[:, None]).sum(0)  # [O]
            better = err < best_err[:, j]
            best_err[better, j] = err[better]
            best[better, j] = shrink
    return best


def apply_clip(W: torch.Tensor, shrink: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Clamp each (row, group) of W [O, C] to its shrunk range (the range ``Grid.fit`` would use)."""
    o, c = W.shape
    g = c if grid.group_size == -1 else grid.group_size
    blocks = W.reshape(o, c // g, g)
    lo = blocks.amin(-1).clamp(max=0) * shrink
    hi = blocks.amax(-1).clamp(min=0) * shrink
    if grid.sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    return torch.maximum(torch.minimum(blocks, hi[..., None]), lo[..., None]).reshape(o, c)
