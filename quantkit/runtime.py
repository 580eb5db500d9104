"""Runtime: ``QuantLinear`` and loading an export (ours or another tool's) as a torch model.

Every format is converted once at load time into one runtime layout (see ``quantkit.formats.packing``):
qweight int32 [K·b/32, N] packed along K, qzeros int32 [K/G, N·b/32] holding the *actual* zero
points packed along N, scales [K/G, N], g_idx int32 [K].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantkit import formats
from quantkit.checkpoint import WeightSource, build_meta, check_layer_count, complete_model, layer_state
from quantkit.errors import QuantkitError, read_json
from quantkit.formats import gguf
from quantkit.formats.packing import dequantize_packed
from quantkit.kernels import dispatch as kernels
from quantkit.model import adapter_for, check_model_ends, config_dtype, load_config


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
        return dequantize_packed(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

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
    """The tensors of the safetensors checkpoint in ``folder``: exactly those its index names (or
    all of its one weights file), see ``quantkit.checkpoint.weight_files``."""
    weights = WeightSource(folder)
    return weights.read(list(weights.files))


def quantization_config(folder: Path) -> dict | None:
    config = read_json(folder / "config.json", "the model config", "re-export the model or restore config.json")
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise QuantkitError(f"{folder / 'config.json'}: quantization_config is a {type(qc).__name__}, not an object")
    return qc


def check_runtime_layer(name: str, parts: dict[str, torch.Tensor], linear: nn.Linear, bits: int, group: int, where: Path) -> None:
    """The runtime tensors of Linear ``name`` (see the module docstring) agree with its shape and
    the declared ``bits``/``group`` (-1 = per channel): shapes, dtypes, g_idx range, finite scales."""
    k, n = linear.in_features, linear.out_features
    g = k if group == -1 else group
    if k % g or (k * bits) % 32 or (n * bits) % 32:
        raise QuantkitError(f"'{where}': {name} (in {k}, out {n}) cannot hold {bits}-bit codes in groups of {g}: "
                            "the export does not match its config")
    groups = k // g
    expected = {"qweight": (k * bits // 32, n), "qzeros": (groups, n * bits // 32), "scales": (groups, n), "g_idx": (k,)}
    for leaf, shape in expected.items():
        t = parts[leaf]
        if tuple(t.shape) != shape:
            raise QuantkitError(f"'{where}': {name}.{leaf} has shape {list(t.shape)}, but {bits}-bit group {group} "
                                f"for a {k}→{n} Linear needs {list(shape)}: the export does not match its config")
        if t.is_floating_point() != (leaf == "scales"):
            raise QuantkitError(f"'{where}': {name}.{leaf} has dtype {t.dtype}: the export is damaged")
    if not torch.isfinite(parts["scales"]).all():
        raise QuantkitError(f"'{where}': NaN or Inf in the scales of {name}: the export is damaged, re-export it")
    g_idx = parts["g_idx"]
    if k and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise QuantkitError(f"'{where}': {name} has g_idx values outside [0, {groups}): the export is damaged, re-export it")


def _fused_experts(model: nn.Module, adapter, quantized: dict, tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Dequantize the routed experts (one checkpoint name per expert) out of ``quantized`` into
    transformers' fused fp32 experts parameters, and rename the layers' other tensors to the
    model's modules (Mixtral's block_sparse_moe is mlp)."""
    experts = f".{adapter.moe.experts}."
    for name in [n for n in quantized if experts in n]:
        tensors[f"{name}.weight"] = dequantize_packed(**quantized.pop(name), bits=bits)
    out = {n: t for n, t in tensors.items() if not n.startswith(adapter.layers_path + ".")}
    for i, layer in enumerate(adapter.layers(model)):
        prefix = f"{adapter.layers_path}.{i}."
        mine = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        out.update({prefix + n: t for n, t in layer_state(mine, adapter, layer).items()})
    for name in [n for n in quantized if n.startswith(adapter.layers_path + ".")]:
        i, local = name[len(adapter.layers_path) + 1 :].split(".", 1)
        quantized[f"{adapter.layers_path}.{i}.{adapter.module_name(local)}"] = quantized.pop(name)
    return out


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a quantized export as a causal LM whose quantized Linears are ``QuantLinear``; every
    quantized Linear is checked against the config (``check_runtime_layer``) before use. A GGUF file
    or folder: dense Linears holding its dequantized weights, float32 unless ``dtype``."""
    if (gguf_path := gguf.gguf_file(path)) is not None:
        return gguf.load_gguf(gguf_path, dtype or torch.float32).to(device)
    folder = Path(path)
    qc = quantization_config(folder)
    if qc is None:
        raise QuantkitError(f"'{folder}' has no quantization_config in config.json: it is not a quantized export")
    if formats.format_of(qc) is gguf:
        raise QuantkitError(f"'{folder}' is a GGUF export without its one *.gguf file: restore it or re-export")
    config = load_config(str(folder))
    del config.quantization_config
    bits, group = formats.config_grid(qc, folder)
    tensors = read_tensors(folder)
    check_layer_count(config, tensors, adapter_for(config).layers_path, folder)
    dtype = dtype or config_dtype(config, torch.float16)
    model = build_meta(config, dtype, folder)
    quantized = formats.read_linears(tensors, qc, folder)
    adapter = adapter_for(config)
    if adapter.moe is not None:
        tensors = _fused_experts(model, adapter, quantized, tensors, bits)
    modules = dict(model.named_modules())
    for name, parts in quantized.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            raise QuantkitError(f"'{folder}' has quantized tensors for {name}, which is not a Linear of the model")
        check_runtime_layer(name, parts, old, bits, group, folder)
        new = QuantLinear(old.in_features, old.out_features, bits, group, old.bias is not None)
        for leaf, t in parts.items():
            setattr(new, leaf, t)
        if old.bias is not None:
            if f"{name}.bias" not in tensors:
                raise QuantkitError(f"'{folder}' lacks the tensor {name}.bias: the export is incomplete")
            new.bias = nn.Parameter(tensors.pop(f"{name}.bias").to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise QuantkitError(f"'{folder}': {str(e).strip().splitlines()[-1].strip()}: the export does not match its config") from None
    if unexpected:
        raise QuantkitError(f"'{folder}' has tensors the model does not: {', '.join(unexpected[:3])}")
    complete_model(model, config, folder)
    check_model_ends(model, adapter_for(config), str(folder))
    return model.to(device).eval()
