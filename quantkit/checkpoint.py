"""Lazy access to a safetensors checkpoint: build the model on the meta device and load one
module's tensors at a time, so host memory holds one decoder layer, not the model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quantkit.errors import QuantkitError


class WeightSource:
    """Tensor name -> file for every *.safetensors file of a checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                self.files.update({name: f for name in fh.keys()})
        if not self.files:
            raise QuantkitError(f"'{folder}' holds no *.safetensors files")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise QuantkitError(f"'{self.folder}' lacks the tensor '{name}': the checkpoint is incomplete")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                out.update({name: fh.get_tensor(name) for name in group})
        return out

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype, only: dict[str, str] | None = None) -> None:
        """Fill ``module`` (possibly on meta) with the checkpoint's tensors under ``prefix.``;
        ``only``: just these {state name: checkpoint name} (the rest stays as it is)."""
        only = only if only is not None else {n: n for n in module.state_dict()}
        names = {f"{prefix}.{c}" if prefix else c: n for n, c in only.items()}
        state = {names[k]: t.to(dtype) if t.is_floating_point() else t for k, t in self.read(list(names)).items()}
        module.load_state_dict(state, strict=len(only) == len(module.state_dict()), assign=True)


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with every parameter on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def materialize_buffers(model: nn.Module, config) -> None:
    """Rebuild modules whose non-persistent buffers are still on meta (rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=config))
