"""Which path QuantLinear takes: the Triton dequant-GEMM kernels (dequant_gemm.py) or plain torch.

``kernels/`` has no ``__init__.py`` on purpose: it is installed as ``quantkit.kernels``, and a regular
package named ``kernels`` at the repository root would shadow the ``kernels`` package transformers
imports whenever Python runs from there (``python -m pytest``). ``quant_matmul`` imports the kernels
lazily, so this module imports without Triton and the interpreter switch (TRITON_INTERPRET=1) can
still be set before the kernels are defined.
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


def quant_matmul(*args, **kwargs) -> torch.Tensor:
    """``dequant_gemm.quant_matmul``, imported on first use."""
    from quantkit.kernels.dequant_gemm import quant_matmul as matmul

    return matmul(*args, **kwargs)
