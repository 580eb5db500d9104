"""Bit packing of low-bit integer codes into int32 words: the one place the layouts live.

Every packed format in quantkit is a *bitstream*: 32 consecutive b-bit codes along the packed
dimension fill exactly b int32 words, code i occupying bits [b·i, b·i + b) of the stream,
least-significant bit first. For b ∈ {2, 4, 8} this is the familiar "32/b codes per word,
code j of a word at bits [b·j, b·j + b)"; for b = 3 it is the GPTQ 3-bit layout (32 codes in
3 words, codes 10 and 21 straddling word boundaries).

Layouts built on it (K = in_features, N = out_features, G = group size):
- GPTQ ``qweight``  int32 [K·b/32, N]: codes of W[n, k] packed along K (``pack_rows``).
- GPTQ ``qzeros``   int32 [K/G, N·b/32]: zero − 1 (format v1) packed along N (``pack_cols``).
- GPTQ ``scales``   fp16 [K/G, N];  ``g_idx`` int32 [K] (group of each input channel).
- AWQ  ``qweight``  int32 [K, N/8]: 4-bit codes packed along N in the order 0 2 4 6 1 3 5 7
  (``AWQ_ORDER``); ``qzeros`` int32 [K/G, N/8] likewise, zeros stored as is.
The dequantized weight is always W[n, k] = scale[g(k), n] · (code[k, n] − zero[g(k), n]).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2^32) as int32 two's complement."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [R, C] (ints in [0, 2^bits)) along R into int32 [R·bits/32, C]; R·bits % 32 == 0."""
    rows, cols = codes.shape
    if rows * bits % 32:
        raise ValueError(f"cannot pack {rows} rows of {bits} bits into whole int32 words")
    padded = -(-rows // 32) * 32
    c = torch.zeros(padded, cols, dtype=torch.int64, device=codes.device)
    c[:rows] = codes
    rows = padded
    c = c.reshape(rows // 32, 32, cols)
    words = torch.zeros(rows // 32, bits, cols, dtype=torch.int64, device=codes.device)
    mask = (1 << bits) - 1
    for i in range(32):
        v = c[:, i] & mask
        word, shift = divmod(bits * i, 32)
        words[:, word] |= (v << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= v >> (32 - shift)
    return to_int32(words.reshape(rows // 32 * bits, cols)[: codes.shape[0] * bits // 32])


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 [R·bits/32, C] -> int32 codes [R, C]."""
    words_total, cols = packed.shape
    padded = -(-words_total // bits) * bits
    w = torch.zeros(padded, cols, dtype=torch.int64, device=packed.device)
    w[:words_total] = packed.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(padded // bits, bits, cols)
    out = torch.empty(padded // bits, 32, cols, dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for i in range(32):
        word, shift = divmod(bits * i, 32)
        v = w[:, word] >> shift
        if shift + bits > 32:
            v = v | (w[:, word + 1] << (32 - shift))
        out[:, i] = v & mask
    return out.reshape(-1, cols)[: words_total * 32 // bits].to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [R, C] along C into int32 [R, C·bits/32]; C·bits % 32 == 0."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_cols``: int32 [R, C·bits/32] -> int32 codes [R, C]."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM layout: 4-bit codes [R, C] -> int32 [R, C/8], nibble j of word holds column AWQ_ORDER[j]."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"cannot AWQ-pack {cols} columns: need a multiple of 8")
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    words = torch.zeros(rows, cols // 8, dtype=torch.int64, device=codes.device)
    for j in range(8):
        words |= (c[:, :, j] & 0xF) << (4 * j)
    return to_int32(words)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_awq``: int32 [R, C/8] -> int32 codes [R, C]."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * j)) & 0xF for j in range(8)], dim=-1)
    inverse = [AWQ_ORDER.index(i) for i in range(8)]
    return nib[:, :, inverse].reshape(packed.shape[0], -1).to(torch.int32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W^T [K, N] = scales[g_idx] · (codes − zeros[g_idx]) for codes [K, N], scales/zeros [K/G, N], g_idx [K]."""
    g = g_idx.long()
    return scales[g] * (codes.to(scales.dtype) - zeros[g].to(scales.dtype))


def dequantize_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """W [N, K] float32 of a Linear in the runtime layout: qweight int32 [K·b/32, N], qzeros int32
    [K/G, N·b/32] (actual zero points), scales [K/G, N], g_idx [K]."""
    return dequantize(unpack_rows(qweight, bits), scales.float(), unpack_cols(qzeros, bits), g_idx).t()
