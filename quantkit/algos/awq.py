"""AWQ (Lin et al., 2024): protect salient input channels with per-channel scales, and clip ranges.

For Linears W_i [O_i, C] that read the same input x [T, C], scaling input channel c by s_c
(W' = W diag(s), x' = x diag(1/s)) leaves x Wᵀ unchanged but changes what rounding loses:
channels with large mean |x| get finer steps. The search picks s = mean|x|^α (AWQ-duo:
divided by mean|w|^(1−α)) on a grid of α, minimising the importance-weighted output error

    err(s) = Σ_t r_t ‖x_t (W − Ŵ)ᵀ‖² / N = Σ_o d_o H d_oᵀ / 2,   d_o = row o of W − Ŵ,

with Ŵ = Q(W diag(s)) diag(1/s), Q the recipe's own quantization grid and H = (2/N) Σ_t r_t x_t x_tᵀ
the Linear's (GPTQ) Hessian over all calibration tokens: each candidate costs O·C² instead of T·O·C.
α = 0 (s = 1) is plain quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algos.quantizer import Grid

CLIP_SHRINKS = tuple(1 - i / 20 for i in range(10))  # 1.0, 0.95, …, 0.55


@dataclass
class ScaleSearch:
    """s [C] (the chosen scales), alpha, and the error of every α tried ({α: error}; α = 0 always)."""

    scales: torch.Tensor
    alpha: float
    errors: dict[float, float]


def output_error(H: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor, rows: int = 4096) -> float:
    """Σ_o d_o H d_oᵀ / 2 with d = W − Ŵ (W, Ŵ [O, C], H [C, C]), in chunks of output rows:
    the mean importance-weighted squared output error per token when H = (2/N) Σ_t r_t x_t x_tᵀ."""
    total = 0.0
    for o in range(0, W.shape[0], rows):
        d = (W[o : o + rows] - W_hat[o : o + rows]).float()
        total += (d @ H).mul_(d).sum().item()
    return total / 2


def _round_trip(W: torch.Tensor, grid: Grid) -> torch.Tensor:
    """W [O, C] quantized on ``grid`` and read back (what ``round_to_nearest(W, grid).dequantize()`` gives)."""
    o, c = W.shape
    grid = grid.for_columns(c)
    scale, zero = grid.fit_span(W.reshape(-1, grid.span(c)))  # a span's groups are fitted together
    return grid.fake_quantize(W.reshape(-1, grid.width(c)), scale.reshape(-1), zero.reshape(-1)).reshape(o, c)


def awq_scale_search(
    H: torch.Tensor,
    x_absmean: torch.Tensor,
    weights: list[torch.Tensor],
    grid: Grid,
    duo: bool = False,
    n_grid: int = 20,
    coarse: int = 1,
) -> ScaleSearch:
    """Search AWQ scales for Linears ``weights`` ([O_i, C] each) reading inputs with Hessian H [C, C]
    and mean |x| ``x_absmean`` [C] over all calibration tokens, over α ∈ {0, 1/n_grid, …}.

    ``coarse`` > 1 searches coarse to fine: every ``coarse``-th α first, then every α between the
    best one's coarse neighbours (11 of 20 evaluations for coarse = 4, 1.8× less time). On SmolLM2's
    90 groups (default recipe, W3 g64) it picked the full grid's α in 89; in the last layer's
    down_proj the error over α has an isolated minimum (0.45) that it missed, for 15% more output
    error there. So the default stays the whole grid (coarse = 1) until perplexity decides."""
    H = H.float()
    W = torch.cat([w.float() for w in weights])
    x_mag = x_absmean.float().clamp(min=1e-8)
    w_mag = (W.abs() / W.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)).mean(0).clamp(min=1e-8)
    tried: dict[int, tuple[float, torch.Tensor]] = {}

    def evaluate(i: int) -> None:
        alpha = i / n_grid
        s = x_mag.pow(alpha) / (w_mag.pow(1 - alpha) if duo and alpha > 0 else 1)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (geometric mean of extremes)
        W_hat = _round_trip(W * s, grid).div_(s)
        tried[i] = (output_error(H, W, W_hat), s)

    for i in range(0, n_grid, coarse):
        evaluate(i)
    best = min(tried, key=lambda i: tried[i][0])
    for i in range(max(best - coarse + 1, 0), min(best + coarse, n_grid)):
        if i not in tried:
            evaluate(i)
    best = min(sorted(tried), key=lambda i: tried[i][0])  # ties: the smallest α, as a full scan picks
    return ScaleSearch(tried[best][1], best / n_grid, {i / n_grid: tried[i][0] for i in sorted(tried)})


def awq_clip_search(H: torch.Tensor, W: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per (row, group) range shrink in CLIP_SHRINKS minimising that group's own output error
    d_g H_gg d_gᵀ (d_g = w_g − Q(w_g), H_gg the group's diagonal block of H [C, C]): [O, C/G]."""
    W = W.float()
    o, c = W.shape
    g, groups = grid.width(c), grid.groups(c)
    H_blocks = torch.stack([H[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(groups)]).float()  # [G, g, g]
    best_err = torch.full((groups, o), float("inf"), device=W.device)
    best = torch.ones(groups, o, device=W.device)
    blocks = W.reshape(o * groups, g)
    for shrink in CLIP_SHRINKS:
        scale, zero = grid.fit(blocks, shrink)
        d = (blocks - grid.fake_quantize(blocks, scale, zero)).reshape(o, groups, g).transpose(0, 1)  # [G, O, g]
        err = (d @ H_blocks).mul_(d).sum(-1)  # [G, O]
        better = err < best_err
        best_err[better] = err[better]
        best[better] = shrink
    return best.t().contiguous()


def apply_clip(W: torch.Tensor, shrink: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Clamp each (row, group) of W [O, C] to its shrunk range (the range ``Grid.fit`` would use)."""
    o, c = W.shape
    blocks = W.reshape(o, grid.groups(c), grid.width(c))
    lo = blocks.amin(-1).clamp(max=0) * shrink
    hi = blocks.amax(-1).clamp(min=0) * shrink
    if grid.sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    return torch.maximum(torch.minimum(blocks, hi[..., None]), lo[..., None]).reshape(o, c)
