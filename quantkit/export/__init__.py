"""Export: the per-format packers behind one writer that streams layers into safetensors shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from quantkit.algos.quantizer import QuantizedWeight
from quantkit.formats import awq, compressed_tensors, gguf, gptq
from quantkit.export.card import model_card
from quantkit.export.writer import MANIFEST, ShardWriter, write_json, write_part, write_text
from quantkit.model import Adapter
from quantkit.formats.packing import dequantize, unpack_cols, unpack_rows
from quantkit.recipe import Recipe

# recipe format / config quant_method -> module with pack_linear, read_linear, quantization_config, LEAVES
FORMATS = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors, "gguf": gguf}
READERS = FORMATS

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


class Exporter:
    """Collects a quantized model layer by layer into ``folder`` (a temporary export folder).

    Each finished layer is written at once to its own part file (what ``--resume`` restarts
    from), and each routed expert of an MoE layer to its own as soon as it is solved; ``finish``
    merges the parts, in order, into shards of at most ``max_shard_bytes``. Tensors carry the
    checkpoint's names (``adapter``: Mixtral's ``block_sparse_moe``, one name per expert)."""

    def __init__(self, folder: Path, recipe: Recipe, max_shard_bytes: int = 4 * 2**30, adapter: Adapter | None = None) -> None:
        self.folder = folder
        self.recipe = recipe
        self.format = FORMATS[recipe.export_format]
        self.max_shard_bytes = max_shard_bytes
        self.adapter = adapter or Adapter("llama")
        self.side_files: list[Path] = []  # a layer's expert parts and coverage, written before the layer's own part

    def _part(self, name: str) -> Path:
        return self.folder / f"part-{name}.safetensors"

    def add_layer(self, index: int, prefix: str, layer: nn.Module, results: dict[str, QuantizedWeight]) -> list[Path]:
        """Write decoder layer ``prefix`` (e.g. 'model.layers.3'): packed Linears, other tensors as is
        (routed experts: ``add_experts``). Returns every file written for the layer, its experts' too."""
        tensors = {}
        state = layer.state_dict()
        for name, stored in self.adapter.dense_names(layer).items():
            module, _, leaf = name.rpartition(".")
            if not (leaf == "weight" and module in results):
                tensors[f"{prefix}.{stored}"] = state[name]
        for name, q in results.items():
            tensors.update(self.format.pack_linear(f"{prefix}.{self.adapter.checkpoint_name(name)}", q, self.recipe))
        path = self._part(f"{index:05d}")
        write_part(path, tensors)
        written, self.side_files = [*self.side_files, path], []
        return written

    def add_experts(self, index: int, expert: int, results: dict[str, QuantizedWeight]) -> None:
        """Write one routed expert of decoder layer ``index``: {layer-relative checkpoint name: weight}."""
        prefix = f"{self.adapter.layers_path}.{index}"
        tensors = {}
        for name, q in results.items():
            tensors.update(self.format.pack_linear(f"{prefix}.{name}", q, self.recipe))
        path = self._part(f"{index:05d}-expert-{expert:05d}")
        write_part(path, tensors)
        self.side_files.append(path)

    def add_coverage(self, index: int, summary: dict) -> None:
        """Record MoE layer ``index``'s calibration coverage (quantkit.json's ``experts``)."""
        path = self.folder / f"experts-{index:05d}.json"
        write_json(path, summary)
        self.side_files.append(path)

    def layer_parts(self, index: int) -> list[Path]:
        """The part files of decoder layer ``index``: its own, then its routed experts' in order."""
        return [self._part(f"{index:05d}"), *sorted(self.folder.glob(f"part-{index:05d}-expert-*.safetensors"))]

    def restore_layer(self, index: int, prefix: str, layer: nn.Module) -> None:
        """Put a written layer's tensors back into ``layer``, quantized Linears as dequantized weights
        (routed experts stacked into transformers' fused parameters)."""
        tensors = {}
        for part in self.layer_parts(index):
            tensors.update({k[len(prefix) + 1 :]: v for k, v in load_file(str(part)).items()})
        marker = "." + self.format.LEAVES[0]
        qc = self.format.quantization_config(self.recipe)
        state = layer.state_dict()
        for name in [n[: -len(marker)] for n in list(tensors) if n.endswith(marker)]:
            parts = {leaf: tensors.pop(f"{name}.{leaf}") for leaf in self.format.LEAVES if f"{name}.{leaf}" in tensors}
            if self.format is gguf:
                w = gguf.dequantize_linear(parts, qc)
            else:
                packed = self.format.read_linear(parts, qc)
                codes, zeros = unpack_rows(packed["qweight"], self.recipe.bits), unpack_cols(packed["qzeros"], self.recipe.bits)
                w = dequantize(codes, packed["scales"].float(), zeros, packed["g_idx"]).t()
            tensors[f"{name}.weight"] = w
        tensors = {self.adapter.module_name(k): v for k, v in fuse_experts(tensors, self.adapter, layer).items()}
        layer.load_state_dict({k: v.to(state[k].dtype) if v.is_floating_point() else v for k, v in tensors.items()}, assign=True)

    def finish(self, model: nn.Module, adapter: Adapter, source: str | None, tokenizer, manifest: dict) -> None:
        """Write the tensors outside the decoder layers, merge all parts into shards, then config,
        tokenizer and manifest."""
        layers_prefix = adapter.layers_path + "."
        tied = getattr(model.config, "tie_word_embeddings", False)
        rest = {
            name: t
            for name, t in model.state_dict().items()
            if not name.startswith(layers_prefix) and not (tied and name == "lm_head.weight")
        }
        write_part(self._part("rest"), rest)
        if self.format is gguf:  # one .gguf file instead of safetensors shards
            gguf.finish(self.folder, model, source, self.recipe, manifest)
            return
        writer = ShardWriter(self.folder, self.max_shard_bytes)
        layers = len(adapter.layers(model))
        parts = [p for i in range(layers) for p in self.layer_parts(i)] + [self._part("rest")]
        for part in parts:  # exactly ours (the folder holds nothing else, see ExportFolder), in order
            writer.add(load_file(str(part)))
            part.unlink()
        writer.close()
        config = model.config.to_dict()
        config["quantization_config"] = self.format.quantization_config(self.recipe)
        if adapter.moe is not None and "ignore" in config["quantization_config"]:
            config["quantization_config"]["ignore"] += adapter.moe.ignore_patterns()  # router, shared gate
        write_json(self.folder / "config.json", config)
        coverage = sorted(self.folder.glob("experts-*.json"))
        if coverage:
            manifest = {**manifest, "experts": {
                f"{adapter.layers_path}.{int(f.stem.split('-')[1])}": json.loads(f.read_text()) for f in coverage}}
            for f in coverage:
                f.unlink()
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        if source and Path(source).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file() and not (self.folder / name).exists():
                    shutil.copy2(Path(source) / name, self.folder / name)
        write_text(self.folder / "README.md", model_card(config, self.recipe, manifest))
        files = sorted(f.name for f in self.folder.iterdir() if f.name != "resume.json")
        write_json(self.folder / MANIFEST, {**manifest, "files": files})


def fuse_experts(tensors: dict[str, torch.Tensor], adapter: Adapter, layer: nn.Module) -> dict[str, torch.Tensor]:
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


def manifest(recipe: Recipe, source: str, seconds: float, extra: dict | None = None) -> dict:
    import transformers

    from quantkit import __version__

    return {
        "quantkit_version": __version__,
        "source_model": source,
        "format": recipe.export_format,
        "recipe": recipe.to_dict(),
        "verified_with": FORMATS[recipe.export_format].VERIFIED_WITH,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "timings": {"quantize_seconds": round(seconds, 3)},
        **(extra or {}),
    }
