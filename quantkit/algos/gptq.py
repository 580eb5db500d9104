"""GPTQ (Frantar et al., 2022): column-by-column quantization with error feedback through H⁻¹.

Two verbs, as in the reference solver: ``Hessian.add_batch`` accumulates H = (2/n) Σ_t r_t x_t x_tᵀ
over calibration tokens (r_t = token importance, 1 for plain GPTQ), ``gptq_solve`` solves.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quantkit.algos.quantizer import BlockGrid, Grid, QuantizedWeight


class CholeskyError(RuntimeError):
    """H + damping stayed non positive definite after every retry."""


def gram(x: torch.Tensor, leaf: int = 192) -> torch.Tensor:
    """xᵀx [K, K] for x [T, K], computing only the upper triangle: the off-diagonal half of each
    split by one matmul, mirrored, the diagonal halves split again down to ``leaf`` columns. About
    half the products of ``x.t() @ x`` for K ≫ leaf (1.4× faster at K = 576, 1.7× at 1536, one
    thread); each entry is still one dot product over T, and with MKL on CPU the same float32 sum
    bit for bit (tested at 1 and 2 threads)."""
    out = torch.empty(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)

    def fill(lo: int, hi: int) -> None:
        if hi - lo <= leaf:
            out[lo:hi, lo:hi] = x[:, lo:hi].t() @ x[:, lo:hi]
            return
        mid = (lo + hi) // 2
        out[lo:mid, mid:hi] = x[:, lo:mid].t() @ x[:, mid:hi]
        out[mid:hi, lo:mid] = out[lo:mid, mid:hi].t()
        fill(lo, mid)
        fill(mid, hi)

    fill(0, x.shape[1])
    return out


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
        self.sum += gram(x)
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


def gptq_solve(
    w: torch.Tensor,
    H: torch.Tensor,
    grid: Grid | BlockGrid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
) -> GPTQResult:
    """Quantize w [N, K] minimising tr((W − Q) H (W − Q)ᵀ) for H [K, K].

    act_order visits columns by decreasing diag(H) with *static groups*: each group's scale and
    zero are fitted on the original weights of its (unpermuted) columns, so the checkpoint needs
    no g_idx reordering. Groups are fitted a span at a time (a llama.cpp super-block for BlockGrid);
    ``clip_search``: each group's range from ``Grid.search`` (MSE). Memory beyond H: the weights
    once in float32 and the codes in uint8.

    The loop is the paper's, with the same float32 operations in the same order: the codes, scales
    and zeros are the reference solver's bit for bit (the loss is summed per block, not per column)."""
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

    hdiag = torch.diag(H).clone()  # block grids fit each group's scale by the error weighted with diag(H)

    def fit_span(w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros of the groups in w [N, span] (columns col..col + span), as rows [span/G, N]."""
        if clip_search:
            scale, zero = grid.search(w)
            return scale[None], zero[None]
        scale, zero = grid.fit_span(w, hdiag[col : col + span]) if isinstance(grid, BlockGrid) else grid.fit_span(w)
        return scale.t(), zero.t()

    # per-group scales and zeros as rows [G, N]: the loop reads one group's as a contiguous vector
    scales = torch.zeros(ngroups, n, device=W.device)
    zeros = torch.zeros(ngroups, n, device=W.device)
    if act_order:
        for g in range(0, ngroups, per):
            scales[g : g + per], zeros[g : g + per] = fit_span(W[:, g * gsize : g * gsize + span], g * gsize)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(k, device=W.device)
    # The loop works on Wᵀ [K, N] (permuted) so that each column of W is a contiguous row.
    Wt = W.t().contiguous()
    device = W.device
    del W
    if act_order:
        Wt, H = Wt[perm], H[perm][:, perm]
    Hinv, damp_used = inverse_cholesky(H, damp)

    codes = torch.empty(k, n, dtype=torch.uint8, device=device)
    losses = torch.zeros(n, device=device)
    update = torch.empty(block_size, n, device=device)  # one buffer for every rank-1 update
    order = perm.tolist()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2]  # updated in place: these rows are read only until quantized
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread_on_cpu(device):
            for i in range(i2 - i1):
                col = order[i1 + i]
                g = col // gsize
                if not act_order and col % span == 0:
                    upcoming = W1[i : i + span]
                    if upcoming.shape[0] < span:  # the span runs past this outer block
                        upcoming = torch.cat([upcoming, Wt[i2 : i2 + span - upcoming.shape[0]]])
                    scales[g : g + per], zeros[g : g + per] = fit_span(upcoming.t().contiguous(), col)  # rows contiguous
                w, s, z = W1[i], scales[g], zeros[g]
                q = grid.quantize(w[:, None], s, z)[:, 0]
                codes[i1 + i] = q
                dq = q.mul_(s).add_(z) if grid.offset else q.sub_(z).mul_(s)  # llama.cpp's mins: s·q + m
                err = torch.sub(w, dq, out=Err1[i]).div_(Hinv1[i, i])  # (w − dq) / d
                rest = update[: i2 - i1 - i - 1]
                W1[i + 1 :] -= torch.mul(Hinv1[i, i + 1 :, None], err[None, :], out=rest)
            losses += Err1.square().sum(0)
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1

    if act_order:
        codes = codes[torch.argsort(perm)]
    g_idx = (torch.arange(k, device=device) // gsize).int()
    loss = losses.sum().item() / 2
    if not math.isfinite(loss):
        raise CholeskyError("GPTQ produced non-finite weights")
    weight = QuantizedWeight(codes.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(), g_idx,
                             grid.bits, gsize, grid.offset)
    return GPTQResult(weight, loss, damp_used)
