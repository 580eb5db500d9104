"""The uniform integer grid: per-group scale and zero point, quantize, dequantize.

A weight w in a group with scale s and zero z is stored as the code q = clamp(round(w/s) + z, 0, 2^b − 1)
and read back as s·(q − z). Symmetric grids fix z = 2^(b−1) (the GPTQ convention); asymmetric
grids fit [min(w, 0), max(w, 0)] onto [0, 2^b − 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """bits ∈ {2, 3, 4, 8}; group_size = columns sharing a scale (-1 = whole row); sym; min_zero = lowest
    allowed zero point (1 for GPTQ v1 checkpoints, which store zero − 1 in b bits)."""

    bits: int
    group_size: int = 128
    sym: bool = True
    min_zero: int = 0

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def width(self, in_features: int) -> int:
        """Columns per group for a Linear with ``in_features`` inputs (the whole row when per-channel)."""
        return in_features if self.group_size == -1 else self.group_size

    def groups(self, in_features: int) -> int:
        return in_features // self.width(in_features)

    def fit(self, w: torch.Tensor, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero for rows of w [N, C] (one group per row): ([N], [N]), zero integral.

        ``shrink`` ≤ 1 narrows the range (clip search)."""
        wmin = w.min(dim=1).values.clamp(max=0) * shrink
        wmax = w.max(dim=1).values.clamp(min=0) * shrink
        if self.sym:
            wmax = torch.maximum(-wmin, wmax)
            wmin = -wmax
        flat = wmax == wmin
        wmin, wmax = torch.where(flat, -1.0, wmin), torch.where(flat, 1.0, wmax)
        # checkpoints store fp16 scales: use exactly those, so the export equals what was optimised
        scale = ((wmax - wmin) / self.maxq).clamp(min=2**-16).to(torch.float16).to(w.dtype)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            zero = torch.round(-wmin / scale).clamp(self.min_zero, self.maxq)
        return scale, zero

    def search(self, w: torch.Tensor, steps: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
        """``fit`` with each row's range shrunk by the p ∈ {1, 1 − 1/steps, …} (max_shrink·steps candidates,
        down to 0.21) that minimises Σ |w − Q(w)|^norm over the row: ([N], [N]). The MSE grid search of
        the reference GPTQ quantizer (IST-DASLab/gptq quant.py, mse=True) that RSQ's --w_clip runs, on the
        scales and zeros ``fit`` gives (fp16 scales as stored, zeros clamped to the grid)."""
        def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
            return (self.fake_quantize(w, scale, zero) - w).abs_().pow_(norm).sum(1)

        best_scale, best_zero = self.fit(w)
        best_err = error(best_scale, best_zero)
        for i in range(1, int(max_shrink * steps)):
            scale, zero = self.fit(w, 1 - i / steps)
            err = error(scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        return best_scale, best_zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes of w [N, C] with per-row scale/zero [N] (or broadcastable [N, C])."""
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        return (w / scale).round_().add_(zero).clamp_(0, self.maxq)

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Round w [N, C] to the grid and return it dequantized (same shape and dtype)."""
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        return self.quantize(w, scale, zero).sub_(zero).mul_(scale)


@dataclass
class QuantizedWeight:
    """A quantized Linear weight: codes [N, K] (ints as float or int), scales/zeros [N, K/G], g_idx [K]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in the scales' dtype."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes.to(self.scales.dtype) - self.zeros[:, g])

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """The weights of Linears stacked along N (sizes: each one's out_features), apart again
        (copies: no part shares memory with another, as safetensors requires of saved tensors)."""
        parts = zip(*(t.split(sizes) for t in (self.codes, self.scales, self.zeros)))
        return [QuantizedWeight(c.clone(), s.clone(), z.clone(), self.g_idx.clone(), self.bits, self.group_size)
                for c, s, z in parts]


def rtn_quantize(w: torch.Tensor, grid: Grid, clip_search: bool = False) -> QuantizedWeight:
    """Round-to-nearest: w [N, K] -> QuantizedWeight on ``grid`` (K divisible by the group size);
    ``clip_search``: each group's range from ``Grid.search`` instead of its min/max."""
    n, k = w.shape
    g = grid.width(k)
    blocks = w.float().reshape(n * (k // g), g)
    scale, zero = grid.search(blocks) if clip_search else grid.fit(blocks)
    codes = grid.quantize(blocks, scale, zero).reshape(n, k)
    g_idx = torch.arange(k, device=w.device) // g
    return QuantizedWeight(codes, scale.reshape(n, -1), zero.reshape(n, -1), g_idx.int(), grid.bits, g)
