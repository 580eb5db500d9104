"""Lazy access to a safetensors checkpoint: build the model on the meta device and load one
module's tensors at a time, so host memory holds one decoder layer, not the model."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantkit.errors import QuantkitError, read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def inside(folder: Path, name: object, named_by: str) -> Path:
    """``folder / name`` (a file name that ``named_by`` gave), refused unless it is a relative
    path that resolves inside ``folder``, links included (a Hugging Face cache snapshot may also
    link into its repository's blobs/ folder)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise QuantkitError(f"{named_by} names the file {name!r}: only file names inside the model folder are allowed")
    root = folder.resolve()
    target = (folder / name).resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(a) for a in allowed):
        raise QuantkitError(f"{named_by} names the file {name!r}, which resolves outside {folder} (to {target}): "
                            "quantkit reads only files inside the model folder")
    return folder / name


def weight_files(folder: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weights files of a checkpoint folder and, with an index, its tensor name -> file map.

    Read exactly: the files model.safetensors.index.json names; else model.safetensors; else the
    only *.safetensors file; else pickle weights (pytorch_model.bin.index.json's files, or the only
    .bin/.pt file). Any other file in the folder is never read. Every name resolves inside ``folder``."""
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        index = folder / index_name
        if index.exists():
            data = read_json(index, "the weights index", "re-download the model or re-export it")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise QuantkitError(f"{index} has no 'weight_map' object of tensor names: re-download the model or re-export it")
            files = {}
            for tensor, name in weight_map.items():
                files.setdefault(name, inside(folder, name, str(index)))
            return sorted(set(files.values())), {tensor: files[name] for tensor, name in weight_map.items()}
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if (folder / "model.safetensors").exists():
        candidates = [folder / "model.safetensors"]
    elif safetensors:
        candidates = safetensors
    elif (folder / "pytorch_model.bin").exists():
        candidates = [folder / "pytorch_model.bin"]
    else:
        candidates = pickles
    if len(candidates) > 1:
        names = ", ".join(f.name for f in candidates[:4])
        raise QuantkitError(
            f"'{folder}' holds several weights files ({names}) and no {SAFETENSORS_INDEX}: quantkit reads only the "
            "files an index names; add the index or remove the extra files"
        )
    return [inside(folder, f.name, f"'{folder}'") for f in candidates], None


def is_pickle(path: Path) -> bool:
    return not path.name.endswith(".safetensors")


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """safe_open(path), with any read problem (damaged, truncated, not safetensors) as one QuantkitError."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"cannot read {path} ({detail}): the file is damaged or not safetensors; "
                            "re-download the model or re-export it") from None


class WeightSource:
    """Tensor name -> file for the safetensors weights files of a checkpoint folder (see ``weight_files``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        files, weight_map = weight_files(folder)
        if not files or any(is_pickle(f) for f in files):
            raise QuantkitError(f"'{folder}' holds no safetensors weights")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.files: dict[str, Path] = {}
        for f in files:
            with open_safetensors(f) as fh:
                for name in fh.keys():
                    if weight_map is None or weight_map.get(name) == f:
                        self.files[name] = f
                        self.shapes[name] = tuple(fh.get_slice(name).get_shape())
        if weight_map is not None:
            missing = next((n for n in weight_map if n not in self.files), None)
            if missing is not None:
                raise QuantkitError(f"{folder / SAFETENSORS_INDEX} places '{missing}' in {weight_map[missing].name}, "
                                    "which lacks it: the checkpoint is incomplete")
        if not self.files:
            raise QuantkitError(f"'{folder}' holds no tensors in its *.safetensors files")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise QuantkitError(f"'{self.folder}' lacks the tensor '{name}': the checkpoint is incomplete")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for f, group in by_file.items():
            with open_safetensors(f) as fh:
                out.update({name: fh.get_tensor(name) for name in group})
        return out

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype, only: dict[str, str] | None = None) -> None:
        """Fill ``module`` (possibly on meta) with the checkpoint's tensors under ``prefix.``;
        ``only``: just these {state name: checkpoint name} (the rest stays as it is)."""
        only = only if only is not None else {n: n for n in module.state_dict()}
        names = {f"{prefix}.{c}" if prefix else c: n for n, c in only.items()}
        state = {names[k]: t.to(dtype) if t.is_floating_point() else t for k, t in self.read(list(names)).items()}
        module.load_state_dict(state, strict=len(only) == len(module.state_dict()), assign=True)


def check_layer_count(config, names, layers_path: str, where: Path) -> int:
    """Fail fast (before any layer is built) unless ``names`` has tensors for exactly the
    config's num_hidden_layers decoder layers; returns that count."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise QuantkitError(f"config.json of '{where}' has num_hidden_layers {n!r}: it must be a positive integer")
    prefix = layers_path + "."
    present = {int(i) for i in (name[len(prefix):].split(".", 1)[0] for name in names if name.startswith(prefix)) if i.isdigit()}
    missing = next((i for i in range(n) if i not in present), None)
    if missing is not None:
        raise QuantkitError(f"config.json of '{where}' asks for {n} decoder layers but the weights have no "
                            f"'{prefix}{missing}.*' tensors: the config does not match the weights")
    return n


def check_weights(config, shapes: dict[str, tuple[int, ...]], adapter, where: Path) -> None:
    """Every tensor the model of ``config`` needs is in ``shapes`` ({name: shape} from the
    checkpoint's headers) with that shape, under the name the checkpoint spells it (``adapter``:
    the architecture's Adapter) — checked before the model is built, layer 0's names standing for
    every layer's (an MoE block's only for layer 0's: layers may differ there). Routed experts,
    fused in transformers' modules, are checked per expert. The LM head may be absent only when
    tied to the embeddings."""
    layers_path, moe = adapter.layers_path, adapter.moe
    n = check_layer_count(config, shapes, layers_path, where)
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if isinstance(getattr(one, "layer_types", None), list):
        one.layer_types = one.layer_types[:1]
    expected = {name: tuple(t.shape) for name, t in build_meta(one, torch.float32, where).state_dict().items()}
    tied = getattr(config, "tie_word_embeddings", False)
    first = f"{layers_path}.0."
    wanted: dict[str, tuple[int, ...]] = {}
    for name, shape in expected.items():
        if tied and name == "lm_head.weight":
            continue
        if not name.startswith(first):
            wanted[name] = shape
            continue
        local = name[len(first):]
        if moe is not None and local.startswith(f"{moe.block}.{moe.experts}."):  # fused [E, 2I, C] or [E, C, I]
            e_count, rows, cols = shape
            per = (rows // 2, cols) if local.endswith("gate_up_proj") else (rows, cols)
            picks = (0, 1) if local.endswith("gate_up_proj") else (2,)
            for e in range(e_count):
                for j in picks:
                    wanted[f"{first}{moe.expert_names(e)[j]}.weight"] = per
            continue
        stored = adapter.checkpoint_name(local)
        every = moe is None or not local.startswith(moe.block + ".")
        for i in range(n) if every else (0,):
            wanted[f"{layers_path}.{i}.{stored}"] = shape
    for full, shape in wanted.items():
        if full not in shapes:
            raise QuantkitError(f"'{where}' lacks the tensor '{full}' that its config.json needs: the checkpoint "
                                "is incomplete or the config does not match the weights")
        if shapes[full] != shape:
            raise QuantkitError(f"'{where}': '{full}' has shape {list(shapes[full])} but config.json implies "
                                f"{list(shape)}: the config does not match the weights")


def fuse_experts(tensors: dict[str, torch.Tensor], adapter, layer: nn.Module) -> dict[str, torch.Tensor]:
    """Layer-relative checkpoint tensors with per-expert weights ({block}.experts.{e}.{w}.weight)
    → the same with transformers' fused experts.gate_up_proj [E, 2I, C] and down_proj [E, C, I]."""
    spec = adapter.moe
    block = adapter.moe_block(layer) if spec is not None else None
    if block is None:
        return tensors
    count = block.get_submodule(spec.experts).down_proj.shape[0]
    gate_up, down = [], []
    for e in range(count):
        g, u, d = (tensors.pop(f"{n}.weight") for n in spec.expert_names(e))
        gate_up.append(torch.cat([g, u]))
        down.append(d)
    experts = f"{spec.checkpoint_block}.{spec.experts}"
    return {**tensors, f"{experts}.gate_up_proj": torch.stack(gate_up), f"{experts}.down_proj": torch.stack(down)}


def layer_state(tensors: dict[str, torch.Tensor], adapter, layer: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's checkpoint tensors (layer-relative names, dense weights) as its state dict:
    routed experts fused, checkpoint names as module names (``adapter``: the architecture's Adapter)."""
    return {adapter.module_name(k): v for k, v in fuse_experts(tensors, adapter, layer).items()}


def build_meta(config, dtype: torch.dtype, where: Path | str) -> nn.Module:
    """``meta_model``, with a config transformers cannot build a model from as one QuantkitError."""
    try:
        return meta_model(config, dtype)
    except Exception as e:  # noqa: BLE001 — transformers raises many types for a bad config
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QuantkitError(f"config.json of '{where}' does not describe a model that can be built "
                            f"({type(e).__name__}: {detail}): fix or re-download config.json") from None


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with every parameter on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def complete_model(model: nn.Module, config, where: Path | str) -> None:
    """After a meta-built model's tensors are loaded: tie the LM head to the embeddings where the
    config says so, rebuild the rotary buffers, and refuse any tensor still on meta (not in ``where``)."""
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers(model, config)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise QuantkitError(f"'{where}' lacks tensors for {', '.join(leftover[:3])}")


def materialize_buffers(model: nn.Module, config) -> None:
    """Rebuild modules whose non-persistent buffers are still on meta (rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=config))
