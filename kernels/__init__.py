"""Triton dequant-GEMM kernels for packed quantized weights (see dequant_gemm.py).

``quant_matmul`` and ``dequantize_packed`` are imported lazily, so this package imports without Triton
and the interpreter switch (TRITON_INTERPRET=1) can still be set before the kernels are defined.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device) -> bool:
    """Whether QuantLinear on `device` should run the Triton kernels: on CUDA unless QUANTKIT_KERNELS=torch;
    on CPU only under the interpreter (TRITON_INTERPRET=1) with QUANTKIT_KERNELS=triton, for tests."""
    mode = os.environ.get("QUANTKIT_KERNELS", "auto")
    if not HAS_TRITON or mode == "torch":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name: str):
    if name in ("quant_matmul", "dequantize_packed", "pick_path"):
        from . import dequant_gemm
        return getattr(dequant_gemm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
