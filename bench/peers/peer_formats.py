"""Reference (pure torch) unpack / dequant helpers for the peer checkpoint
formats documented in bench/peers/FORMATS.md.

Independent of gptqmodel / compressed-tensors so the probes can check the
peers' own kernels against them, and interop tests can reuse them. All
functions return float32 weights shaped like nn.Linear.weight: [out, in].
"""
import os

import torch

MASK32 = 0xFFFFFFFF


def _u32(t):
    """int32 tensor -> int64 tensor holding the unsigned 32-bit value."""
    return t.to(torch.int64) & MASK32


def unpack_stream(packed, bits, n, dim):
    """Unpack a *bit-stream* packing (GPTQ): value k occupies bits
    [k*bits, (k+1)*bits) of the little-endian concatenation of the int32 words
    along `dim`; values may straddle two words (3-bit). Returns int64 codes
    (unsigned, 0..2**bits-1) with `n` entries along `dim`."""
    p = _u32(packed.movedim(dim, 0))
    mask = (1 << bits) - 1
    k = torch.arange(n)
    off = k * bits
    w, s = off // 32, off % 32
    lo = p[w] >> s.view(-1, *([1] * (p.dim() - 1)))
    nxt = torch.clamp(w + 1, max=p.shape[0] - 1)
    spill = (s + bits > 32).view(-1, *([1] * (p.dim() - 1)))
    hi = (p[nxt] << (32 - s).view(-1, *([1] * (p.dim() - 1)))) & MASK32
    v = torch.where(spill, lo | hi, lo) & mask
    return v.movedim(0, dim)


def unpack_per_word(packed, bits, n, dim):
    """Unpack a *per-word* packing (compressed-tensors pack_quantized):
    floor(32/bits) values per int32 word, value j of a word in bits
    [j*bits, (j+1)*bits), unused high bits zero, last word zero-padded.
    Returns int64 codes (unsigned 0..2**bits-1) with `n` entries along `dim`."""
    p = _u32(packed.movedim(dim, 0))
    per = 32 // bits
    mask = (1 << bits) - 1
    k = torch.arange(n)
    w, j = k // per, k % per
    v = (p[w] >> (j * bits).view(-1, *([1] * (p.dim() - 1)))) & mask
    return v.movedim(0, dim)


def gptq_v1_dequant(qweight, qzeros, scales, g_idx, bits, zero_mode="v1"):
    """GPTQ (checkpoint_format "gptq", a.k.a. v1) -> W [out, in] float32.

    qweight [in*bits/32, out] int32 (stream-packed along in),
    qzeros [n_groups, out*bits/32] int32 (stream-packed along out),
    scales [n_groups, out] fp16, g_idx [in] int32.

    zero_mode:
      "v1"       z = (stored + 1) & mask   (per field; the v1 convention)
      "v1_word"  z = field of (word + 0x..1111 repeated), i.e. the +1 added to
                 the whole packed int32 (what gptqmodel's v1->v2 conversion
                 does for 2/4/8 bit; carries between fields when stored==mask)
      "v2"       z = stored               (gptq_v2 / no offset)
    W[o, i] = scales[g, o] * (q[i, o] - z[g, o]),  g = g_idx[i]
    """
    in_f = qweight.shape[0] * 32 // bits
    out_f = qweight.shape[1]
    mask = (1 << bits) - 1
    q = unpack_stream(qweight, bits, in_f, 0)  # [in, out]
    if zero_mode == "v1_word" and 32 % bits == 0:
        inc = 0
        for j in range(32 // bits):
            inc |= 1 << (j * bits)
        zw = ((_u32(qzeros) + inc) & MASK32)
        z = unpack_stream(zw, bits, out_f, 1)
    else:
        z = unpack_stream(qzeros, bits, out_f, 1)  # [groups, out]
        if zero_mode in ("v1", "v1_word"):
            z = (z + 1) & mask
    g = g_idx.to(torch.int64)
    w = scales.float()[g] * (q.float() - z.float()[g])  # [in, out]
    return w.t().contiguous()


def pack_stream(codes, bits, dim):
    """Inverse of unpack_stream: unsigned codes (0..2**bits-1) -> int32 words,
    dense bit stream along `dim` (zero padded up to a whole word)."""
    c = codes.to(torch.int64).movedim(dim, 0)
    n = c.shape[0]
    n_words = -(-n * bits // 32)
    out = torch.zeros((n_words, *c.shape[1:]), dtype=torch.int64)
    for k in range(n):
        off = k * bits
        w, s = off // 32, off % 32
        out[w] |= (c[k] << s) & MASK32
        if s + bits > 32:
            out[w + 1] |= c[k] >> (32 - s)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(0, dim).contiguous()


def pack_per_word(codes, bits, dim):
    """Inverse of unpack_per_word: floor(32/bits) unsigned codes per int32,
    value j of a word at bits [j*bits, (j+1)*bits), zero padded (the
    compressed-tensors <= 0.17 pack_quantized layout)."""
    c = codes.to(torch.int64).movedim(dim, 0)
    per = 32 // bits
    n = c.shape[0]
    n_words = -(-n // per)
    out = torch.zeros((n_words, *c.shape[1:]), dtype=torch.int64)
    for k in range(n):
        out[k // per] |= c[k] << ((k % per) * bits)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(0, dim).contiguous()


def ct_pack_quantized_dequant(weight_packed, weight_scale, weight_shape, bits,
                              group_size=None, weight_zero_point=None,
                              weight_g_idx=None, packing="stream"):
    """compressed-tensors "pack-quantized" -> W [out, in] float32.

    weight_packed [out, ceil(in*bits/32)] int32: signed codes q in
    [-2**(b-1), 2**(b-1)-1] stored as u = q + 2**(b-1), packed along `in`.
    packing="stream": dense bit stream, 32 values per `bits` words, values
      straddle words for 3/5/6/7 bit (compressed-tensors >= 0.18, see
      FORMATS.md); "per_word": floor(32/bits) values per word (<= 0.17).
    weight_scale [out, n_groups] (group) or [out, 1] (channel).
    weight_zero_point (asymmetric only): int32 [ceil(out*bits/32), n_groups],
      the signed zero points offset by 2**(b-1) and packed along `out` (dim 0)
      the same way; or an already unpacked signed tensor shaped like scale.
    W[o, i] = scale[o, g] * (q[o, i] - zp[o, g]),  g = i // group_size, or
    weight_g_idx[i] if given.
    """
    out_f, in_f = [int(x) for x in (weight_shape.tolist() if torch.is_tensor(weight_shape) else weight_shape)]
    unpack = unpack_stream if packing == "stream" else unpack_per_word
    off = 1 << (bits - 1)
    q = unpack(weight_packed, bits, in_f, 1) - off  # [out, in]
    scale = weight_scale.float()
    if weight_g_idx is not None:
        g = weight_g_idx.to(torch.int64)
    elif scale.shape[1] == 1:
        g = torch.zeros(in_f, dtype=torch.int64)
    else:
        g = torch.arange(in_f) // group_size
    if weight_zero_point is None:
        zp = torch.zeros_like(scale)
    elif weight_zero_point.dtype == torch.int32 and weight_zero_point.shape[0] != out_f:
        zp = (unpack(weight_zero_point, bits, out_f, 0) - off).float()
    else:
        zp = weight_zero_point.float()
    return scale[:, g] * (q.float() - zp[:, g])


# shared by the probes

def err(e):
    """One line naming an exception, for the probes' JSON."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def read_ckpt(ckpt):
    from safetensors import safe_open
    tensors, meta = {}, {}
    for fn in sorted(os.listdir(ckpt)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt, fn), "pt") as f:
                meta[fn] = f.metadata()
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
    return tensors, meta


def get_module(model, name):
    mod = model
    for p in name.split("."):
        mod = getattr(mod, p)
    return mod
