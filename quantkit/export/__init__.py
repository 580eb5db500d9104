"""Export: the per-format packers behind one writer that streams layers into safetensors shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from quantkit.algos.quantizer import QuantizedWeight
from quantkit.export import awq, compressed_tensors, gguf, gptq
from quantkit.export.card import model_card
from quantkit.export.writer import MANIFEST, ShardWriter, write_json, write_part, write_text
from quantkit.model import Adapter
from quantkit.packing import dequantize, unpack_cols, unpack_rows
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
    from); ``finish`` merges the parts, in order, into shards of at most ``max_shard_bytes``."""

    def __init__(self, folder: Path, recipe: Recipe, max_shard_bytes: int = 4 * 2**30) -> None:
        self.folder = folder
        self.recipe = recipe
        self.format = FORMATS[recipe.export_format]
        self.max_shard_bytes = max_shard_bytes

    def _part(self, name: str) -> Path:
        return self.folder / f"part-{name}.safetensors"

    def add_layer(self, index: int, prefix: str, layer: nn.Module, results: dict[str, QuantizedWeight]) -> Path:
        """Write decoder layer ``prefix`` (e.g. 'model.layers.3'): packed Linears, other tensors as is.
        Returns the part file written."""
        tensors = {}
        for name, t in layer.state_dict().items():
            module, _, leaf = name.rpartition(".")
            if not (leaf == "weight" and module in results):
                tensors[f"{prefix}.{name}"] = t
        for name, q in results.items():
            tensors.update(self.format.pack_linear(f"{prefix}.{name}", q, self.recipe))
        path = self._part(f"{index:05d}")
        write_part(path, tensors)
        return path

    def restore_layer(self, index: int, prefix: str, layer: nn.Module) -> None:
        """Put a written layer's tensors back into ``layer``, quantized Linears as dequantized weights."""
        tensors = {k[len(prefix) + 1 :]: v for k, v in load_file(str(self._part(f"{index:05d}"))).items()}
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
            tensors[f"{name}.weight"] = w.to(state[f"{name}.weight"].dtype)
        layer.load_state_dict(tensors, assign=True)

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
        for part in [self._part(f"{i:05d}") for i in range(layers)] + [self._part("rest")]:  # exactly ours, in order
            writer.add(load_file(str(part)))
            part.unlink()
        writer.close()
        config = model.config.to_dict()
        config["quantization_config"] = self.format.quantization_config(self.recipe)
        write_json(self.folder / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        if source and Path(source).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file() and not (self.folder / name).exists():
                    shutil.copy2(Path(source) / name, self.folder / name)
        write_text(self.folder / "README.md", model_card(config, self.recipe, manifest))
        files = sorted(f.name for f in self.folder.iterdir() if f.name != "resume.json")
        write_json(self.folder / MANIFEST, {**manifest, "files": files})


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
