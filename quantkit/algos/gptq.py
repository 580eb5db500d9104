"""GPTQ (Frantar et al., 2022): column-by-column quantization with error feedback through H⁻¹.

Two verbs, as in the reference solver: ``Hessian.add_batch`` accumulates H = (2/n) Σ_t r_t x_t x_tᵀ
over calibration tokens (r_t = token importance, 1 for plain GPTQ), ``gptq_quantize`` solves.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quantkit.algos.quantizer import BlockGrid, Grid, QuantizedWeight


class CholeskyError(RuntimeError):
    """H + damping stayed non positive definite after every retry."""


class Hessian:
    """Running sum Σ_t r_t x_t x_tᵀ [K, K] and token count n; ``value`` = 2·sum / n (float32).

    Each batch's partial sum is a float32 matmul; the partials are added in float64, where sums of
    float32 values are exact (unless their magnitudes differ by more than 2^29), so the total does
    not depend on the order the batches arrive in, e.g. from data-parallel ranks."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """x [..., K] activations; importance [...] (same leading shape) weights each token's outer product."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        if importance is not None:
            x = x * importance.reshape(-1, 1).to(x.device, torch.float32).sqrt()
        self.sum += x.t() @ x
        self.tokens += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return (self.sum * (2.0 / max(self.tokens, 1))).float()


@dataclass
class GPTQResult:
    """weight: the quantized weight; loss: Σ (w − q)² / (2 d²) over columns, which equals
    ½ tr((W − Q)(H + λI)(W − Q)ᵀ); damp: the damping that made H positive definite."""

    weight: QuantizedWeight
    loss: float
    damp: float


@contextmanager
def _one_thread_on_cpu(device: torch.device):
    """The per-column updates are too small to gain from intra-op threads on CPU (and lose
    several-fold when cores are shared); block-level matmuls keep all threads."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_cholesky(H: torch.Tensor, damp: float, retries: int = 4) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H); damp ×10 on each failure.

    Returns (U [K, K], damp actually used). Raises CholeskyError when every retry fails."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, damp
        damp *= 10
    raise CholeskyError(f"Hessian not positive definite even with damp {damp / 10:g}")


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    grid: Grid | BlockGrid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> GPTQResult:
    """Quantize w [N, K] minimising tr((W − Q) H (W − Q)ᵀ) for H [K, K].

    act_order visits columns by decreasing diag(H) with *static groups*: each group's scale and
    zero are fitted on the original weights of its (unpermuted) columns, so the checkpoint needs
    no g_idx reordering. Groups are fitted a span at a time (a llama.cpp super-block for BlockGrid).
    Memory beyond H: the weights once in float32 and the codes in uint8."""
    W = w.detach().to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    n, k = W.shape
    grid = grid.for_columns(k)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gsize, span = grid.width(k), grid.span(k)
    per = span // gsize  # groups per span
    ngroups = k // gsize
    scales = torch.zeros(n, ngroups, device=W.device)
    zeros = torch.zeros(n, ngroups, device=W.device)
    if act_order:
        for g in range(0, ngroups, per):
            scales[:, g : g + per], zeros[:, g : g + per] = grid.fit_span(W[:, g * gsize : g * gsize + span])
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(k, device=W.device)
    # The loop works on Wᵀ [K, N] (permuted) so that each column of W is a contiguous row.
    Wt = W.t()[perm]
    device = W.device
    del W
    H = H[perm][:, perm]
    Hinv, damp_used = inverse_cholesky(H, damp)

    codes = torch.zeros(k, n, dtype=torch.uint8, device=device)
    losses = torch.zeros(n, device=device)
    order = perm.tolist()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread_on_cpu(device):
            for i in range(i2 - i1):
                col = order[i1 + i]
                g = col // gsize
                if not act_order and col % span == 0:
                    upcoming = torch.cat([W1[i:], Wt[i2:]])[:span]
                    scales[:, g : g + per], zeros[:, g : g + per] = grid.fit_span(upcoming.t())
                w, d = W1[i], Hinv1[i, i]
                q = grid.quantize(w[:, None], scales[:, g], zeros[:, g])[:, 0]
                dq = grid.dequantize(q, scales[:, g], zeros[:, g])
                codes[i1 + i] = q
                err = (w - dq) / d
                losses += err.square() / 2
                W1[i:] -= Hinv1[i, i:, None] * err[None, :]
                Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(k, device=device) // gsize).int()
    loss = losses.sum().item()
    if not math.isfinite(loss):
        raise CholeskyError("GPTQ produced non-finite weights")
    weight = QuantizedWeight(codes[inverse].t().contiguous(), scales, zeros, g_idx, grid.bits, gsize, grid.offset)
    return GPTQResult(weight, loss, damp_used)
