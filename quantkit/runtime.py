"""Runtime: ``QuantLinear`` and loading an export (ours or another tool's) as a torch model.

Every format is converted once at load time into one runtime layout (see ``quantkit.packing``):
qweight int32 [K·b/32, N] packed along K, qzeros int32 [K/G, N·b/32] holding the *actual* zero
points packed along N, scales [K/G, N], g_idx int32 [K].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from quantkit.kernels import dispatch as kernels
from quantkit.checkpoint import materialize_buffers, meta_model
from quantkit.errors import QuantkitError
from quantkit.model import ADAPTERS
from quantkit.packing import dequantize, unpack_cols, unpack_rows


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W [N, K] stored as ``bits``-bit codes, group scales and zero points."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // self.group_size)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._dense: torch.Tensor | None = None

    def dequantize_weight(self) -> torch.Tensor:
        """W [N, K] in fp32."""
        codes = unpack_rows(self.qweight, self.bits)
        zeros = unpack_cols(self.qzeros, self.bits)
        return dequantize(codes, self.scales.float(), zeros, self.g_idx).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_triton(x.device):
            return kernels.quant_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                        self.group_size, bias=self.bias)
        # torch path: unpacking costs more than the matmul, so the dense weight is kept after the
        # first call (CPU fallback memory = the unquantized model's)
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dequantize_weight().to(x.device, x.dtype)
        return F.linear(x, self._dense, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors checkpoint in ``folder`` (single file or sharded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuantkitError(f"'{folder}' holds no *.safetensors files")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                tensors[name] = fh.get_tensor(name)
    return tensors


def quantization_config(folder: Path) -> dict | None:
    config = json.loads((folder / "config.json").read_text())
    return config.get("quantization_config")


def _runtime_layers(tensors: dict[str, torch.Tensor], qc: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: runtime tensors} for every quantized Linear, converted from the checkpoint's format."""
    from quantkit.export import READERS

    method = qc.get("quant_method")
    if method not in READERS:
        raise QuantkitError(f"quantization method '{method}' is not supported by quantkit's loader ({', '.join(READERS)})")
    reader = READERS[method]
    marker = "." + reader.LEAVES[0]
    layers = {}
    for name in [n[: -len(marker)] for n in tensors if n.endswith(marker)]:
        parts = {leaf: tensors.pop(f"{name}.{leaf}") for leaf in reader.LEAVES if f"{name}.{leaf}" in tensors}
        layers[name] = reader.read_linear(parts, qc)
    return layers


def _fused_experts(model: nn.Module, adapter, quantized: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dequantize the routed experts (one checkpoint name per expert) out of ``quantized`` into
    transformers' fused fp32 experts parameters, and rename the layers' other tensors to the
    model's modules (Mixtral's block_sparse_moe is mlp)."""
    from quantkit.export import fuse_experts

    experts = f".{adapter.moe.experts}."
    for name in [n for n in quantized if experts in n]:
        parts = quantized.pop(name)
        codes, zeros = unpack_rows(parts["qweight"], _bits(parts)), unpack_cols(parts["qzeros"], _bits(parts))
        tensors[f"{name}.weight"] = dequantize(codes, parts["scales"].float(), zeros, parts["g_idx"]).t()
    out = {n: t for n, t in tensors.items() if not n.startswith(adapter.layers_path + ".")}
    for i, layer in enumerate(adapter.layers(model)):
        prefix = f"{adapter.layers_path}.{i}."
        mine = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        out.update({prefix + adapter.module_name(n): t for n, t in fuse_experts(mine, adapter, layer).items()})
    for name in [n for n in quantized if n.startswith(adapter.layers_path + ".")]:
        i, local = name[len(adapter.layers_path) + 1 :].split(".", 1)
        quantized[f"{adapter.layers_path}.{i}.{adapter.module_name(local)}"] = quantized.pop(name)
    return out


def _bits(parts: dict[str, torch.Tensor]) -> int:
    """Bit width of a runtime-layout Linear: qweight [K·b/32, N] and g_idx [K]."""
    return parts["qweight"].shape[0] * 32 // parts["g_idx"].numel()


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a quantized export as a causal LM whose quantized Linears are ``QuantLinear``."""
    from transformers import AutoConfig

    folder = Path(path)
    config = AutoConfig.from_pretrained(folder)
    qc = quantization_config(folder)
    if qc is None:
        raise QuantkitError(f"'{folder}' has no quantization_config in config.json: it is not a quantized export")
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = meta_model(config, dtype)
    tensors = read_tensors(folder)
    quantized = _runtime_layers(tensors, qc)
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is not None and adapter.moe is not None:
        tensors = _fused_experts(model, adapter, quantized, tensors)
    for name, parts in quantized.items():
        old = model.get_submodule(name)
        bits = parts["qweight"].shape[0] * 32 // old.in_features
        group_size = old.in_features // parts["scales"].shape[0]
        new = QuantLinear(old.in_features, old.out_features, bits, group_size, old.bias is not None)
        for leaf, t in parts.items():
            if getattr(new, leaf).shape != t.shape:
                raise QuantkitError(f"'{folder}': {name}.{leaf} has shape {tuple(t.shape)}, expected {tuple(getattr(new, leaf).shape)}")
            setattr(new, leaf, t)
        if old.bias is not None:
            new.bias = nn.Parameter(tensors.pop(f"{name}.bias").to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QuantkitError(f"'{folder}' has tensors the model does not: {', '.join(unexpected[:3])}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers(model, config)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise QuantkitError(f"'{folder}' lacks tensors for {', '.join(leftover[:3])}")
    return model.to(device).eval()
