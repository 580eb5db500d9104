"""Fused W{2,3,4,8}A16 dequant-GEMM in Triton: y[M, N] = x[M, K] @ W^T[K, N] + bias, W read packed.

Layout (quantkit.formats.packing; K = in_features, N = out_features, G = group size, b = bits):
qweight int32 [K·b/32, N] holds code[k, n] as a b-bit bitstream along K (3-bit codes may straddle two
words), qzeros int32 [K/G, N·b/32] the zero points as a bitstream along N, scales [K/G, N], g_idx [K], and
    W^T[k, n] = scales[g_idx[k], n] · (code[k, n] − zero[g_idx[k], n]).
Paths by M = rows of x: "skinny" (M ≤ SKINNY_MAX_M, split-K so one row spreads over all SMs, fp32 atomic
adds), "tiled" (one program per output tile), "dense" (M ≥ DENSE_FROM_M: dequantize once, then cuBLAS).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
import triton.testing

SKINNY_MAX_M = 16
# Crossover to dequantize + torch.matmul. An estimate, not a measurement: at M = 1024 one extra
# read+write of the fp16 weight is ~25% of an H100/H200 cuBLAS GEMM of Llama-3-8B shapes, about what a
# Triton tl.dot kernel trails cuBLAS by. Measure with `python -m quantkit.kernels.bench` and update.
DENSE_FROM_M = 1024
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(bm: int, bn: int, bk: int, split_k: int, group_m: int, warps: int = 4, stages: int = 3) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": group_m}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Autotuning needs a GPU driver: the interpreter gets exactly one (small, ragged-friendly) config.
if INTERPRET:
    SKINNY_CONFIGS = [_cfg(16, 64, 64, 3, 1)]
    TILED_CONFIGS = [_cfg(32, 64, 64, 1, 2)]
else:
    SKINNY_CONFIGS = [_cfg(16, bn, bk, sk, 1, warps=8 if bn == 256 else 4, stages=4)
                      for bn, bk in ((64, 128), (128, 64), (128, 128), (256, 64)) for sk in (4, 8, 16)]
    TILED_CONFIGS = [_cfg(64, 64, 64, 1, 8, 4, 4), _cfg(64, 128, 64, 1, 8, 4, 4), _cfg(128, 64, 64, 1, 8, 4, 4),
                     _cfg(128, 128, 32, 1, 8, 4, 4), _cfg(128, 128, 64, 1, 8, 8, 3), _cfg(64, 256, 64, 1, 8, 8, 3),
                     _cfg(128, 256, 64, 1, 8, 8, 3), _cfg(256, 128, 64, 1, 8, 8, 3)]


@triton.jit
def _unpack(ptrs, shift, next_word, mask, BITS: tl.constexpr):
    """b-bit codes starting at bit `shift` of the int32 words at `ptrs`; a 3-bit code with shift > 29
    continues in the low bits of the word at `ptrs + next_word`."""
    shift = shift.to(tl.uint32)
    codes = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift
    if BITS == 3:
        spill = mask & (shift > 29)
        hi = tl.load(ptrs + next_word, mask=spill, other=0).to(tl.uint32, bitcast=True)
        codes |= hi << ((32 - shift) & 31)  # hi == 0 where nothing spills
    return (codes & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, N, K, BITS: tl.constexpr):
    """fp32 W^T[offs_k, offs_n], a [BLOCK_K, BLOCK_N] tile that is 0 outside K × N."""
    k_ok = offs_k < K
    mask = k_ok[:, None] & (offs_n < N)[None, :]
    g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
    bit_k = offs_k * BITS  # position of code[k, n] in column n's bitstream
    codes = _unpack(qw_ptr + (bit_k // 32)[:, None] * N + offs_n[None, :], (bit_k % 32)[:, None], N, mask, BITS)
    bit_n = offs_n * BITS  # position of zero[g, n] in row g's bitstream
    zero_ptrs = qz_ptr + g[:, None] * (N * BITS // 32) + (bit_n // 32)[None, :]
    zeros = _unpack(zero_ptrs, (bit_n % 32)[None, :], 1, mask, BITS)
    scales = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return scales * (codes - zeros).to(tl.float32)


@triton.jit
def _qgemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                  M_BUCKET,  # unused in the body: the autotune key, next power of two of M
                  BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = x[M, K] @ W^T + bias. Program (tile, s) covers K blocks s, s + SPLIT_K, ...; with
    SPLIT_K > 1 out is fp32 and the partial sums are atomically added (bias by s == 0 only)."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * grid_n)  # bands of GROUP_M tile rows, walked column by column for L2 reuse
    band_rows = tl.minimum(grid_m - band * GROUP_M, GROUP_M)
    pid_m = band * GROUP_M + (pid % (GROUP_M * grid_n)) % band_rows
    pid_n = (pid % (GROUP_M * grid_n)) // band_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, N, K, BITS)
        if x.dtype == tl.float16:
            acc = tl.dot(x, w.to(tl.float16), acc)
        else:  # fp32, and bf16 upcast (tf32 tensor cores on GPU)
            acc = tl.dot(x.to(tl.float32), w, acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, g_ptr, w_ptr, N, K, BITS: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[K, N] = W^T in w's dtype, one [BLOCK_K, BLOCK_N] tile per program."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, offs_k, offs_n, N, K, BITS)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


_KEY = ["M_BUCKET", "N", "K", "BITS"]
_BENCH = functools.partial(triton.testing.do_bench, warmup=5, rep=25)  # 1/4 of the default ms: faster tuning
_skinny = triton.autotune(SKINNY_CONFIGS, key=_KEY, reset_to_zero=["out_ptr"], do_bench=_BENCH)(_qgemm_kernel)
_tiled = triton.autotune(TILED_CONFIGS, key=_KEY, do_bench=_BENCH)(_qgemm_kernel)


def pick_path(m: int) -> str:
    """Kernel path for an x with m rows: "skinny", "tiled" or "dense"."""
    return "skinny" if m <= SKINNY_MAX_M else "tiled" if m < DENSE_FROM_M else "dense"


def _group_index(g_idx: torch.Tensor | None, k: int, group_size: int, device: torch.device) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.contiguous()
    return torch.arange(k, device=device, dtype=torch.int32) // (group_size if group_size > 0 else k)


def dequantize_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                      bits: int, group_size: int = -1, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W^T [K, N] in `dtype` from qweight [K·b/32, N], qzeros [K/G, N·b/32], scales [K/G, N],
    g_idx [K] (None: k // group_size)."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g = _group_index(g_idx, k, group_size, qweight.device)
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(k, 64), triton.cdiv(n, 128))
    _dequant_kernel[grid](qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g, w, n, k,
                          BITS=bits, BLOCK_K=64, BLOCK_N=128)
    return w


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None = None,
                 path: str = "auto") -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T + bias for packed W: qweight int32 [K·b/32, N], qzeros int32 [K/G, N·b/32],
    scales [K/G, N], g_idx [K] (None: k // group_size; group_size ≤ 0 means per-channel).
    path: "auto" (pick_path by rows of x), "skinny", "tiled" or "dense"."""
    k, n = x.shape[-1], qweight.shape[1]
    if bits not in (2, 3, 4, 8) or k % 32 or qweight.shape[0] * 32 != k * bits or qzeros.shape[1] * 32 != n * bits:
        raise ValueError(f"bad packed shapes for {bits}-bit: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"qzeros {tuple(qzeros.shape)}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    g = _group_index(g_idx, k, group_size, x.device)
    path = pick_path(m) if path == "auto" else path
    if path == "dense":
        w = dequantize_packed(qweight, qzeros, scales, g, bits, dtype=x.dtype)
        out = x2 @ w if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
        return out.reshape(*x.shape[:-1], n)
    if path not in ("skinny", "tiled"):
        raise ValueError(f"unknown path {path!r}")
    kernel = _skinny if path == "skinny" else _tiled
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if path == "skinny" else x2.new_empty(m, n)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]

    kernel[grid](x2, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g, bias, out, m, n, k,
                 x2.stride(0), max(16, triton.next_power_of_2(m)), BITS=bits, HAS_BIAS=bias is not None)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
