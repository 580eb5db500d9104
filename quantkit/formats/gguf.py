"""GGUF (llama.cpp's file format): block packing, the whole-model file, and reading it back.

Quantized Linears are stored in llama.cpp's block types (``quantkit.algos.quantizer.BLOCK_TYPES``),
row by row along the input dimension K, each row a run of blocks (bytes, little-endian):
  Q4_0  [d fp16][qs 16: code j | code j+16 << 4]                                  w = d·(q − 8)
  Q4_1  [d][m fp16][qs 16 as Q4_0]                                                 w = d·q + m
  Q5_0  [d][qh u32: bit j = code j >> 4][qs 16 as Q4_0, low 4 bits]                w = d·(q − 16)
  Q8_0  [d][q − 128 as int8 ×32]                                                   w = d·(q − 128)
  Q2_K  [sc | m << 4 ×16][qs 64: 2-bit][d][dmin]                                   w = d·sc_j·q − dmin·m_j
  Q3_K  [hmask 32: bit 2][qs 64: bits 0–1][sc 12: 6-bit, + 32][d]                  w = d·(sc_j − 32)·(q − 4)
  Q4_K  [d][dmin][sc, m 12: 6-bit each][qs 128: 4-bit]                             w = d·sc_j·q − dmin·m_j
  Q6_K  [ql 128: bits 0–3][qh 64: bits 4–5][sc int8 ×16][d]                       w = d·sc_j·(q − 32)
k-quant code order within a super-block (code e = position in the 256): Q2_K/Q3_K qs[h·32 + l]
bits 2s hold code h·128 + s·32 + l, Q3_K hmask[l] bit i holds bit 2 of code i·32 + l; Q4_K qs[c·32 + l]
nibble k holds code c·64 + k·32 + l; Q6_K ql[h·64 + l] nibble k holds bits 0–3 of code h·128 + k·64 + l
and qh[h·32 + l] bits 2s bits 4–5 of code h·128 + s·32 + l. The grid the solver rounds to keeps
d·sc_j and the mins as float32 values; packing factors them back into fp16 d and integer sc_j and
refuses anything that is not exactly representable, so the file holds what GPTQ saw.

The file is what llama.cpp's convert_hf_to_gguf.py writes for the Llama family: architecture
metadata, GGUF tensor names, the BPE tokenizer (vocab, merges, special tokens, chat template), and
q/k rows permuted from Hugging Face's half-split RoPE to llama.cpp's interleaved pairs (llama arch
only; qwen2/qwen3 run NEOX RoPE). Unquantized tensors: norms F32, embeddings F16, the LM head (and
tied embeddings) Q6_K when K is a multiple of 256, else Q8_0 — llama.cpp's own choice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantkit import __version__
from quantkit.algos.quantizer import BLOCK_TYPES, BlockGrid, QuantizedWeight, round_to_nearest
from quantkit.errors import QuantkitError

TYPES = tuple(BLOCK_TYPES)
# Recipes whose grid is a GGUF type as it is (the k-quants are named with --gguf-type)
RECIPE_TYPES = {(4, 32, True): "Q4_0", (4, 32, False): "Q4_1", (5, 32, True): "Q5_0", (8, 32, True): "Q8_0"}
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q8_0": "MOSTLY_Q8_0",
              "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q6_K": "MOSTLY_Q6_K",
              None: "ALL_F32"}
LEAVES = ("qblocks", "qtype")
REQUIRED = LEAVES


def _gguf():
    try:
        import gguf
    except ImportError:
        raise QuantkitError("--format gguf needs the 'gguf' package: pip install 'quantkit[gguf]'") from None
    return gguf


# ---------------------------------------------------------------- recipe constraints


def recipe_defaults(gguf_type: str) -> dict:
    """The bits / group size / symmetry a GGUF type implies (what --gguf-type fills in)."""
    if gguf_type not in BLOCK_TYPES:
        raise QuantkitError(f"--gguf-type {gguf_type}: choose one of {', '.join(TYPES)}")
    spec = BLOCK_TYPES[gguf_type]
    return {"bits": spec.bits, "group_size": spec.sub, "sym": not spec.offset}


def check_recipe(recipe) -> str:
    """The GGUF type of a --format gguf recipe; one clear error when the grid cannot be stored exactly."""
    if recipe.format != "gguf":
        raise QuantkitError(f"--gguf-type {recipe.gguf_type} needs --format gguf (or leave --format out)")
    name = recipe.gguf_type
    if name is None:
        name = RECIPE_TYPES.get((recipe.bits, recipe.group_size, recipe.sym))
        if name is None:
            scheme = f"--bits {recipe.bits} --group-size {recipe.group_size} --{'sym' if recipe.sym else 'asym'}"
            raise QuantkitError(
                f"--format gguf: {scheme} is no GGUF block type; use --group-size 32 with --bits 4 --sym (Q4_0), "
                f"--bits 4 --asym (Q4_1) or --bits 8 --sym (Q8_0), or name a type with --gguf-type ({', '.join(TYPES)})")
    want = recipe_defaults(name)
    got = {"bits": recipe.bits, "group_size": recipe.group_size, "sym": recipe.sym}
    if got != want:
        raise QuantkitError(
            f"--gguf-type {name} stores {want['bits']}-bit {'symmetric' if want['sym'] else 'scale + min'} blocks of "
            f"{want['group_size']}: drop --bits/--group-size/--sym/--asym or set them to match")
    if recipe.awq_clip:
        raise QuantkitError("--awq-clip is not available with --format gguf: drop it (AWQ scales still apply)")
    return name


def head_type(gguf_type: str | None, in_features: int) -> str | None:
    """The LM head's (and tied embeddings') type, as llama.cpp's quantizer picks it."""
    if gguf_type is None:
        return None
    if gguf_type == "Q8_0" or in_features % 256:
        return "Q8_0"
    return "Q6_K"


# ---------------------------------------------------------------- block packing

QK_K = 256


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[B] float32 values that are fp16-exact -> [B, 2] bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _from_fp16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] bytes -> [B] float32."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def _factor(s: torch.Tensor, lo: int, hi: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 d [B] and integers q [B, J] in [lo, hi] with d·q == s [B, J] exactly (float32)."""
    ext = s.gather(1, s.abs().argmax(1, keepdim=True))[:, 0]
    d = torch.zeros_like(ext)
    q = torch.zeros_like(s)
    found = ext == 0  # an all-zero block: d = 0
    for k in sorted((k for k in range(lo, hi + 1) if k), key=lambda k: (-abs(k), k)):
        if found.all():
            break
        dk = ext / k
        qk = s / dk[:, None]
        ok = ~found & (dk.half().float() == dk) & ((qk == qk.round()) & (qk >= lo) & (qk <= hi)).all(1)
        ok &= (dk[:, None] * qk.round() == s).all(1)
        d, q, found = torch.where(ok, dk, d), torch.where(ok[:, None], qk.round(), q), found | ok
    if not found.all():
        raise QuantkitError(f"{what}: {int((~found).sum())} blocks' scales are not an fp16 scale times "
                            f"{lo}..{hi} integers, so they cannot be stored exactly (not a BlockGrid result)")
    return d, q


def _pack_bits(c: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n, per] small ints -> [..., per] bytes, item i at bit i·bits (per = 8/bits values per byte)."""
    out = torch.zeros(c.shape[:-2] + c.shape[-1:], dtype=torch.int32)
    for i in range(c.shape[-2]):
        out |= c[..., i, :].int() << (bits * i)
    return out.to(torch.uint8)


def _unpack_bits(b: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of _pack_bits: [..., per] bytes -> [..., n, per]."""
    b = b.int()
    return torch.stack([(b >> (bits * i)) & (2**bits - 1) for i in range(n)], dim=-2)


def _pack_q3_scales(u: torch.Tensor) -> torch.Tensor:
    """[B, 16] 6-bit values -> [B, 12]: bytes 0–7 low nibbles (j, j + 8), bytes 8–11 the high 2 bits."""
    low = (u & 0xF).reshape(-1, 2, 8)
    high = (u >> 4).reshape(-1, 4, 4)
    return torch.cat([_pack_bits(low, 4), _pack_bits(high, 2)], 1)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    low = _unpack_bits(b[:, :8], 4, 2).reshape(-1, 16)
    high = _unpack_bits(b[:, 8:], 2, 4).reshape(-1, 16)
    return low | (high << 4)


def _pack_q4k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[B, 8] 6-bit scales and mins -> [B, 12]: j < 4 in bytes j / 4 + j (6 bits), j ≥ 4 split into
    the low nibbles of bytes 8–11 (scale low, min high) and the top 2 bits of bytes j − 4 / j."""
    sc, m = sc.int(), m.int()
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], 1).to(torch.uint8)


def _unpack_q4k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.int()
    b0, b1, b2 = b[:, :4], b[:, 4:8], b[:, 8:]
    sc = torch.cat([b0 & 0x3F, (b2 & 0xF) | ((b0 >> 6) << 4)], 1)
    m = torch.cat([b1 & 0x3F, (b2 >> 4) | ((b1 >> 6) << 4)], 1)
    return sc, m


def pack_blocks(q: QuantizedWeight, gguf_type: str, what: str = "weight") -> torch.Tensor:
    """GGUF rows of ``q`` (codes [N, K] on ``gguf_type``'s grid): uint8 [N, K / span · type size]."""
    spec = BLOCK_TYPES[gguf_type]
    n, k = q.codes.shape
    if k % spec.span:
        raise QuantkitError(f"{what}: {k} columns are not whole {gguf_type} blocks of {spec.span}")
    if q.group_size != spec.sub or q.offset != spec.offset:
        raise QuantkitError(f"{what}: quantized with group {q.group_size} ({'offset' if q.offset else 'zero point'}), "
                            f"not on the {gguf_type} grid")
    codes = q.codes.to(torch.int32)
    if codes.min() < 0 or codes.max() > 2**spec.bits - 1:
        raise QuantkitError(f"{what}: codes outside 0..{2**spec.bits - 1} cannot be stored as {gguf_type}")
    nb = n * k // spec.span
    c = codes.reshape(nb, spec.span)
    s = q.scales.float().reshape(nb, -1)
    z = q.zeros.float().reshape(nb, -1)
    if not spec.offset and (z != spec.zero).any():
        raise QuantkitError(f"{what}: {gguf_type} has the fixed zero point {spec.zero}")
    if spec.scale_bits == 0:  # one fp16 scale (and min) per block of 32
        d = s[:, 0]
        if (d.half().float() != d).any() or (spec.offset and (z.half().float() != z).any()):
            raise QuantkitError(f"{what}: {gguf_type} scales must be fp16 values")
        head = [_fp16_bytes(d)] + ([_fp16_bytes(z[:, 0])] if spec.offset else [])
        if gguf_type == "Q8_0":
            return torch.cat(head + [(c - 128).to(torch.int8).view(torch.uint8)], 1).reshape(n, -1)
        low = _pack_bits((c & 0xF).reshape(nb, 2, 16), 4)
        if gguf_type == "Q5_0":
            qh = _pack_bits((c >> 4).reshape(nb, 4, 8).transpose(1, 2), 1)  # bit j of the u32 = code j
            head.append(qh)
        return torch.cat(head + [low], 1).reshape(n, -1)
    top = 2**spec.scale_bits - 1
    if spec.offset:
        d, sc = _factor(s, 0, top, f"{what} ({gguf_type} scales)")
        dmin, m = _factor(-z, 0, top, f"{what} ({gguf_type} mins)")
        if (dmin < 0).any() or (d < 0).any():
            raise QuantkitError(f"{what}: {gguf_type} super-block scales must not be negative")
    else:
        half = 2 ** (spec.scale_bits - 1)
        d, sc = _factor(s, -half, half - 1, f"{what} ({gguf_type} scales)")
    if gguf_type == "Q4_K":
        qs = _pack_bits(c.reshape(nb, 4, 2, 32), 4).reshape(nb, 128)
        out = [_fp16_bytes(d), _fp16_bytes(dmin), _pack_q4k_scales(sc, m), qs]
    elif gguf_type == "Q2_K":
        qs = _pack_bits(c.reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
        out = [(sc.int() | (m.int() << 4)).to(torch.uint8), qs, _fp16_bytes(d), _fp16_bytes(dmin)]
    elif gguf_type == "Q3_K":
        hmask = _pack_bits((c >> 2).reshape(nb, 8, 32), 1)
        qs = _pack_bits((c & 3).reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
        out = [hmask, qs, _pack_q3_scales(sc.int() + 32), _fp16_bytes(d)]
    else:  # Q6_K
        ql = _pack_bits((c & 0xF).reshape(nb, 2, 2, 64), 4).reshape(nb, 128)
        qh = _pack_bits((c >> 4).reshape(nb, 2, 4, 32), 2).reshape(nb, 64)
        out = [ql, qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)]
    return torch.cat(out, 1).reshape(n, -1)


def unpack_blocks(data: torch.Tensor, gguf_type: str) -> QuantizedWeight:
    """Inverse of ``pack_blocks``: uint8 rows [N, bytes] -> codes, scales d·sc_j, zeros (or mins)."""
    spec = BLOCK_TYPES[gguf_type]
    size = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType[gguf_type]][1]
    n = data.shape[0]
    b = data.reshape(-1, size)
    nb = b.shape[0]
    if spec.scale_bits == 0:
        d = _from_fp16(b[:, :2])[:, None]
        if gguf_type == "Q8_0":
            codes, zeros = b[:, 2:].contiguous().view(torch.int8).int() + 128, torch.full_like(d, 128.0)
        else:
            at = 4 if gguf_type == "Q4_1" else 2
            zeros = _from_fp16(b[:, 2:4])[:, None] if spec.offset else torch.full_like(d, spec.zero)
            if gguf_type == "Q5_0":
                high = _unpack_bits(b[:, 2:6], 1, 8).transpose(1, 2).reshape(nb, 32)
                at = 6
            else:
                high = 0
            codes = _unpack_bits(b[:, at:], 4, 2).reshape(nb, 32) | (high << 4)
        scales = d
    else:
        if gguf_type == "Q4_K":
            d, dmin = _from_fp16(b[:, :2]), _from_fp16(b[:, 2:4])
            sc, m = _unpack_q4k_scales(b[:, 4:16])
            codes = _unpack_bits(b[:, 16:].reshape(nb, 4, 32), 4, 2).reshape(nb, 256)
        elif gguf_type == "Q2_K":
            sc, m = b[:, :16].int() & 0xF, b[:, :16].int() >> 4
            codes = _unpack_bits(b[:, 16:80].reshape(nb, 2, 32), 2, 4).reshape(nb, 256)
            d, dmin = _from_fp16(b[:, 80:82]), _from_fp16(b[:, 82:84])
        elif gguf_type == "Q3_K":
            high = _unpack_bits(b[:, :32], 1, 8).reshape(nb, 256)
            low = _unpack_bits(b[:, 32:96].reshape(nb, 2, 32), 2, 4).reshape(nb, 256)
            codes = low | (high << 2)
            sc = _unpack_q3_scales(b[:, 96:108]) - 32
            d = _from_fp16(b[:, 108:110])
        else:  # Q6_K
            low = _unpack_bits(b[:, :128].reshape(nb, 2, 64), 4, 2).reshape(nb, 256)
            high = _unpack_bits(b[:, 128:192].reshape(nb, 2, 32), 2, 4).reshape(nb, 256)
            codes = low | (high << 4)
            sc = b[:, 192:208].contiguous().view(torch.int8).int()
            d = _from_fp16(b[:, 208:210])
        scales = d[:, None] * sc.float()
        zeros = -(dmin[:, None] * m.float()) if spec.offset else torch.full_like(scales, spec.zero)
    codes = codes.reshape(n, -1)
    k = codes.shape[1]
    g_idx = (torch.arange(k) // spec.sub).int()
    return QuantizedWeight(codes.to(torch.uint8), scales.reshape(n, -1), zeros.reshape(n, -1), g_idx,
                           spec.bits, spec.sub, spec.offset)


def dequantize_blocks(data: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """W [N, K] float32 from GGUF rows (llama.cpp's dequantization, bit for bit)."""
    return unpack_blocks(data, gguf_type).dequantize()


def quantize_rtn(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """GGUF rows of w [N, K] rounded to nearest on ``gguf_type`` (the LM head, tied embeddings)."""
    return pack_blocks(round_to_nearest(w, BlockGrid(gguf_type)), gguf_type)


# ---------------------------------------------------------------- exporter interface


def pack_linear(prefix: str, q: QuantizedWeight, recipe) -> dict[str, torch.Tensor]:
    """Part-file tensors of one Linear: its GGUF rows and its type (a k-quant may fall back per shape)."""
    gguf_type = BlockGrid(recipe.gguf_type).for_columns(q.codes.shape[1]).type
    type_id = int(_gguf().GGMLQuantizationType[gguf_type])
    return {f"{prefix}.qblocks": pack_blocks(q, gguf_type, prefix),
            f"{prefix}.qtype": torch.tensor([type_id], dtype=torch.int32)}


def _type_name(qtype: torch.Tensor | int) -> str:
    return _gguf().GGMLQuantizationType(int(qtype)).name


def dequantize_linear(parts: dict[str, torch.Tensor], qc: dict) -> torch.Tensor:
    """W [N, K] of a Linear from its part-file tensors (``pack_linear``'s)."""
    return dequantize_blocks(parts["qblocks"], _type_name(parts["qtype"]))


def quantization_config(recipe) -> dict:
    return {"quant_method": "gguf", "format": recipe.gguf_type, "gguf_type": recipe.gguf_type, "bits": recipe.bits, "group_size": recipe.group_size,
            "sym": recipe.sym, "static_groups": recipe.act_order,
            "meta": {"quantizer": [f"quantkit:{__version__}"], "act_order": recipe.act_order}}


VERIFIED_WITH = {
    "llama.cpp": {
        "packages": {"llama-cpp-python": "0.3.36"},
        "notes": "tests/test_gguf.py loads the SmolLM2-135M export in llama.cpp (CPU): tokenization equal to "
        "transformers, perplexity within 1% of quantkit eval",
    },
}


# ---------------------------------------------------------------- the file


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise QuantkitError(f"--format gguf: RoPE scaling '{rope_type}' is not supported yet (only plain RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise QuantkitError("--format gguf: the config has no rope_theta")
    return float(theta)


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k [heads·d, ...] from Hugging Face's half-split RoPE order to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(hf_name: str, config) -> int | None:
    """How many heads to permute ``hf_name``'s rows by (llama arch q/k), None otherwise."""
    if ARCHS.get(config.model_type) != "llama":
        return None
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _name_map(config):
    gguf = _gguf()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCHS[config.model_type])
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_name(hf_name: str, name_map) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise QuantkitError(f"--format gguf: no GGUF name for tensor '{hf_name}'")
    return name


# Test text whose token ids llama.cpp's converter hashes to name the BPE pre-tokenizer
# ("tokenizer.ggml.pre"); the hashes of the Llama-family tokenizers quantkit knows.
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
           '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на '
           'Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll '
           'make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def _pre_tokenizer(tok, pre_tokenizer: dict | None, source: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by the converter's hash of a known
    tokenizer, else by structure (GPT-2's byte-level regex, optionally with single digits split)."""
    pre_hash = hashlib.sha256(str(tok.encode(_CHKTXT)).encode()).hexdigest()
    if pre_hash in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[pre_hash]
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = [(p.get("type"), p.get("use_regex", p.get("individual_digits"))) for p in steps]
    if kinds == [("ByteLevel", True)]:
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    raise QuantkitError(f"--format gguf: the pre-tokenizer of '{source}' (llama.cpp hash {pre_hash[:12]}…) is not one "
                        f"quantkit knows ({', '.join(sorted(set(_PRE_TOKENIZERS.values())))}, gpt-2, smollm)")


def _bpe_tokenizer(source: Path):
    """(HF tokenizer, llama.cpp pre-tokenizer name) of the byte-level BPE tokenizer in ``source``."""
    from transformers import AutoTokenizer

    tj = source / "tokenizer.json"
    spec = json.loads(tj.read_text()) if tj.is_file() else {}
    if spec.get("model", {}).get("type") != "BPE" or spec["model"].get("byte_fallback"):
        raise QuantkitError(f"--format gguf: '{source}' has no byte-level BPE tokenizer.json (GPT-2 style); "
                            "SentencePiece tokenizers are not supported yet")
    tok = AutoTokenizer.from_pretrained(str(source))
    return tok, _pre_tokenizer(tok, spec.get("pre_tokenizer"), source)


def preflight(config, source: str | None) -> None:
    """Refuse, before any quantization, what the GGUF writer would refuse at the end."""
    if not source or not Path(source).is_dir():
        raise QuantkitError("--format gguf needs a local model folder (for its tokenizer files)")
    if config.model_type not in ARCHS:
        raise QuantkitError(f"--format gguf supports {', '.join(ARCHS)}, not '{config.model_type}'")
    _rope_theta(config)
    _bpe_tokenizer(Path(source))


def _add_tokenizer(writer, source: Path, config) -> None:
    """Vocab, token types, BPE merges, special tokens and chat template of the HF tokenizer in ``source``."""
    gguf = _gguf()
    tok, pre = _bpe_tokenizer(source)
    vocab = {i: t for t, i in tok.get_vocab().items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = vocab.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(source, load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer)
    # what the HF tokenizer does, not what its config files may say
    ids = tok("a").input_ids
    writer.add_add_bos_token(tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id])


def _add_metadata(writer, config, name: str, gguf_type: str | None) -> None:
    gguf = _gguf()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


Tensors = Callable[[], Iterator[tuple[str, np.ndarray, object]]]


def write_gguf(path: Path, config, tokenizer_dir: Path, tensors: Tensors, gguf_type: str | None, name: str) -> None:
    """Write the GGUF file: metadata, tokenizer, then ``tensors()`` — called twice (tensor infos, then
    data), it yields (GGUF name, array, GGMLQuantizationType or None for a plain F16/F32 array)."""
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), ARCHS[config.model_type])
    try:
        _add_metadata(writer, config, name, gguf_type)
        _add_tokenizer(writer, tokenizer_dir, config)
        for tname, array, raw in tensors():
            writer.add_tensor_info(tname, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, array, _ in tensors():
            writer.write_tensor_data(array)
    except OSError as e:
        raise QuantkitError(f"writing {path} failed ({e.strerror or e}): free disk space and retry") from None
    finally:
        writer.close()


def _convert(hf_name: str, t: torch.Tensor, config, name_map, gguf_type: str | None, tied: bool,
             qtype: torch.Tensor | None = None):
    """(GGUF name, array, raw type) for one tensor: packed rows as they are, the head and tied
    embeddings quantized on the head type, other matrices F16 and vectors F32 (all F32 when unquantized)."""
    gguf = _gguf()
    heads = _rope_heads(hf_name, config)
    if heads is not None:
        t = _permute_rope(t, heads)
    gname = gguf_name(hf_name, name_map)
    if qtype is not None:
        return gname, t.numpy(), gguf.GGMLQuantizationType(int(qtype))
    is_head = hf_name == "lm_head.weight" or (tied and hf_name.endswith("embed_tokens.weight"))
    htype = head_type(gguf_type, t.shape[-1]) if is_head else None
    if htype is not None:
        return gname, quantize_rtn(t.float(), htype).numpy(), gguf.GGMLQuantizationType[htype]
    if gguf_type is not None and t.dim() == 2:
        return gname, t.to(torch.float16).numpy(), None
    return gname, t.float().numpy(), None


def _layer_sort_key(hf_name: str) -> tuple:
    parts = hf_name.split(".")
    index = next((int(p) for p in parts if p.isdigit()), -1)
    return (0 if "embed_tokens" in hf_name else 2 if index < 0 else 1, index, hf_name)


def _state_items(state: dict[str, torch.Tensor], config, name_map, gguf_type, tied):
    """Convert a {HF name: tensor} mapping, with packed Linears as (name.qblocks, name.qtype)."""
    for name in sorted(state, key=_layer_sort_key):
        if name.endswith(".qtype") or (tied and name == "lm_head.weight"):
            continue
        if name.endswith(".qblocks"):
            base = name[: -len(".qblocks")] + ".weight"
            yield _convert(base, state[name], config, name_map, gguf_type, tied, state[name[: -len("qblocks")] + "qtype"])
        else:
            yield _convert(name, state[name], config, name_map, gguf_type, tied)


def export_fp(model: nn.Module, tokenizer_dir: str | Path, path: str | Path) -> Path:
    """An unquantized (F32) GGUF of ``model``: the reference llama.cpp's own quantizer starts from."""
    config = model.config
    preflight(config, str(tokenizer_dir))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    name_map = _name_map(config)
    path = Path(path)
    write_gguf(path, config, Path(tokenizer_dir), lambda: _state_items(state, config, name_map, None, tied), None,
               Path(tokenizer_dir).name)
    return path


def finish(folder: Path, config, source: str | None, recipe, manifest: dict) -> None:
    """Turn an export folder's part files (decoder layers, then 'rest') into ``model-<TYPE>.gguf``, with
    config.json (its quantization_config names the type), the tokenizer files and README.md."""
    from safetensors.torch import load_file

    from quantkit.export.writer import write_json

    preflight(config, source)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    name_map = _name_map(config)
    parts = sorted(folder.glob("part-*.safetensors"))

    def tensors():
        for part in parts:
            yield from _state_items(load_file(str(part)), config, name_map, recipe.gguf_type, tied)

    path = folder / f"model-{recipe.gguf_type}.gguf"
    write_gguf(path, config, Path(source), tensors, recipe.gguf_type, Path(source).name)
    for part in parts:
        part.unlink()
    config_dict = config.to_dict()
    config_dict["quantization_config"] = quantization_config(recipe)
    write_json(folder / "config.json", config_dict)
    from quantkit.checkpoint import TOKENIZER_FILES

    for fname in TOKENIZER_FILES:
        if (Path(source) / fname).is_file():
            shutil.copy2(Path(source) / fname, folder / fname)
    (folder / "README.md").write_text(model_card(path.name, recipe, manifest))


def model_card(filename: str, recipe, manifest: dict) -> str:
    source = manifest.get("source_model", "")
    return "\n".join([
        "---", "library_name: gguf", "tags:", "  - quantized", "  - gguf", "  - quantkit", f"  - {recipe.gguf_type}", "---", "",
        f"# {Path(source).name or 'Model'} — GGUF {recipe.gguf_type}", "",
        f"`{source}` quantized by quantkit {manifest.get('quantkit_version', '')} with {recipe.method.upper()}"
        f"{' + AWQ' if recipe.awq else ''}{', Hadamard-rotated' if recipe.rotate else ''} onto llama.cpp's {recipe.gguf_type} "
        f"grid (`{filename}`; rows whose length is no multiple of 256 use llama.cpp's fallback type, the LM head "
        "Q6_K or Q8_0 as llama.cpp's quantizer chooses).", "",
        "```bash", f"llama-cli -m {filename} -p 'The capital of France is'", f"echo 'FROM ./{filename}' > Modelfile && ollama create my-model -f Modelfile",
        "```", "",
        "```python", "from llama_cpp import Llama", "", f'llm = Llama(model_path="{filename}")',
        'print(llm("The capital of France is", max_tokens=20)["choices"][0]["text"])', "```", "",
        "## Recipe", "", "```json", json.dumps(recipe.to_dict(), indent=2), "```", ""])


# ---------------------------------------------------------------- reading a GGUF back


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the single *.gguf in a quantkit export folder."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader):
    """The Hugging Face config of a GGUF's architecture metadata."""
    from transformers import AutoConfig

    arch = _field(reader, "general.architecture")
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch)
    if model_type is None:
        raise QuantkitError(f"GGUF architecture '{arch}' is not supported by quantkit's reader (llama, qwen2, qwen3)")
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=_field(reader, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_field(reader, f"{arch}.attention.head_count_kv", heads),
        rms_norm_eps=_field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        max_position_embeddings=_field(reader, f"{arch}.context_length"),
        vocab_size=_field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens")),
        head_dim=_field(reader, f"{arch}.attention.key_length", hidden // heads),
        tie_word_embeddings="output.weight" not in names,
        rope_parameters={"rope_type": "default", "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0)},
    )
    return AutoConfig.for_model(model_type, **kwargs)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A GGUF quantkit wrote, as a causal LM with the dequantized weights (llama.cpp's values, bit for bit)."""
    gguf = _gguf()
    from quantkit.checkpoint import complete_model, meta_model

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise QuantkitError(f"cannot read GGUF '{path}': {e}") from None
    config = read_config(reader)
    model = meta_model(config, dtype)
    name_map = _name_map(config)
    to_hf = {gguf_name(n, name_map): n for n in model.state_dict()}
    state = {}
    for t in reader.tensors:
        hf = to_hf.get(t.name)
        if hf is None:
            raise QuantkitError(f"'{path}': tensor '{t.name}' has no place in a {config.model_type} model")
        data = torch.from_numpy(np.array(t.data))
        kind = gguf.GGMLQuantizationType(int(t.tensor_type))
        if kind.name in BLOCK_TYPES:
            rows = int(np.prod(t.shape[1:])) if t.shape.size > 1 else 1  # shape is ggml's (K, N)
            w = dequantize_blocks(data.view(torch.uint8).reshape(rows, -1), kind.name)
        elif kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w = data.float().reshape(tuple(int(x) for x in reversed(t.shape)))
        else:
            raise QuantkitError(f"'{path}': tensor '{t.name}' is {kind.name}, which quantkit's reader does not read")
        heads = _rope_heads(hf, config)
        state[hf] = (_unpermute_rope(w, heads) if heads is not None else w).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    complete_model(model, config, path)
    return model.eval()
