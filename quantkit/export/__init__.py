"""Export: the formats' packers (``quantkit.formats``) behind one writer that streams layers into safetensors shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantkit import formats
from quantkit.algos.quantizer import QuantizedWeight
from quantkit.checkpoint import TOKENIZER_FILES
from quantkit.export.card import model_card
from quantkit.export.writer import MANIFEST, ShardWriter, write_json, write_part, write_text
from quantkit.recipe import Recipe


class Exporter:
    """Collects a quantized model layer by layer into ``folder`` (a temporary export folder).

    Each finished layer is written at once to its own part file (what ``--resume`` restarts
    from), and each routed expert of an MoE layer to its own as soon as it is solved; ``finish``
    merges the parts, in order, into shards of at most ``max_shard_bytes``. Every name is a
    checkpoint name (Mixtral's ``block_sparse_moe``, one name per expert), layer-relative below
    ``layers_path`` ('model.layers': layer 3 is 'model.layers.3.')."""

    def __init__(self, folder: Path, recipe: Recipe, max_shard_bytes: int = 4 * 2**30, layers_path: str = "model.layers") -> None:
        self.folder = folder
        self.recipe = recipe
        self.format = formats.FORMATS[recipe.export_format]
        self.max_shard_bytes = max_shard_bytes
        self.layers_path = layers_path
        self.side_files: list[Path] = []  # a layer's expert parts and coverage, written before the layer's own part

    def _part(self, name: str) -> Path:
        return self.folder / f"part-{name}.safetensors"

    def _packed(self, index: int, results: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of layer ``index``'s quantized Linears {name: quantized weight}."""
        tensors = {}
        for name, q in results.items():
            tensors.update(self.format.pack_linear(f"{self.layers_path}.{index}.{name}", q, self.recipe))
        return tensors

    def add_layer(self, index: int, tensors: dict[str, torch.Tensor], results: dict[str, QuantizedWeight]) -> list[Path]:
        """Write decoder layer ``index``: its unquantized ``tensors`` as they are and its quantized
        Linears packed (routed experts: ``add_experts``). Returns every file written for the layer,
        its experts' too."""
        prefix = f"{self.layers_path}.{index}"
        path = self._part(f"{index:05d}")
        write_part(path, {**{f"{prefix}.{name}": t for name, t in tensors.items()}, **self._packed(index, results)})
        written, self.side_files = [*self.side_files, path], []
        return written

    def add_experts(self, index: int, expert: int, results: dict[str, QuantizedWeight]) -> None:
        """Write one routed expert of decoder layer ``index``: {Linear name: quantized weight}."""
        path = self._part(f"{index:05d}-expert-{expert:05d}")
        write_part(path, self._packed(index, results))
        self.side_files.append(path)

    def add_coverage(self, index: int, summary: dict) -> None:
        """Record MoE layer ``index``'s calibration coverage (quantkit.json's ``experts``)."""
        path = self.folder / f"experts-{index:05d}.json"
        write_json(path, summary)
        self.side_files.append(path)

    def layer_parts(self, index: int) -> list[Path]:
        """The part files of decoder layer ``index``: its own, then its routed experts' in order."""
        return [self._part(f"{index:05d}"), *sorted(self.folder.glob(f"part-{index:05d}-expert-*.safetensors"))]

    def read_layer(self, index: int) -> dict[str, torch.Tensor]:
        """A written layer's tensors back, quantized Linears as dequantized float32 ``{name}.weight``."""
        prefix = f"{self.layers_path}.{index}."
        tensors = {}
        for part in self.layer_parts(index):
            tensors.update({k[len(prefix) :]: v for k, v in load_file(str(part)).items()})
        qc = self.format.quantization_config(self.recipe)
        dense = formats.dense_linears(tensors, qc, self.folder)
        return {**tensors, **{f"{name}.weight": w for name, w in dense.items()}}

    def finish(self, config, rest: dict[str, torch.Tensor], source: str | None, tokenizer, manifest: dict,
               ignore: list[str] | None = None) -> None:
        """Write ``rest`` (the tensors outside the decoder layers), merge all parts into shards, then
        config (``config``: the model's; ``ignore``: patterns of further unquantized Linears),
        tokenizer and manifest."""
        write_part(self._part("rest"), rest)
        if self.format is formats.gguf:  # one .gguf file instead of safetensors shards
            formats.gguf.finish(self.folder, config, source, self.recipe, manifest)
        else:
            manifest = self._finish_safetensors(config, source, tokenizer, manifest, ignore)
        files = sorted(f.name for f in self.folder.iterdir() if f.name != "resume.json")
        write_json(self.folder / MANIFEST, {**manifest, "files": files})

    def _finish_safetensors(self, config, source: str | None, tokenizer, manifest: dict, ignore: list[str] | None) -> dict:
        """Shards, config.json, tokenizer and card of a safetensors export; returns the manifest with
        the MoE layers' calibration coverage."""
        writer = ShardWriter(self.folder, self.max_shard_bytes)
        parts = [p for i in range(config.num_hidden_layers) for p in self.layer_parts(i)] + [self._part("rest")]
        for part in parts:  # exactly ours (the folder holds nothing else, see ExportFolder), in order
            writer.add(load_file(str(part)))
            part.unlink()
        writer.close()
        config = config.to_dict()
        config["quantization_config"] = self.format.quantization_config(self.recipe)
        if ignore and "ignore" in config["quantization_config"]:
            config["quantization_config"]["ignore"] += ignore
        write_json(self.folder / "config.json", config)
        coverage = sorted(self.folder.glob("experts-*.json"))
        if coverage:
            manifest = {**manifest, "experts": {
                f"{self.layers_path}.{int(f.stem.split('-')[1])}": json.loads(f.read_text()) for f in coverage}}
            for f in coverage:
                f.unlink()
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        if source and Path(source).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file() and not (self.folder / name).exists():
                    shutil.copy2(Path(source) / name, self.folder / name)
        write_text(self.folder / "README.md", model_card(config, self.recipe, manifest))
        return manifest


def manifest(recipe: Recipe, source: str, seconds: float, extra: dict | None = None) -> dict:
    import transformers

    from quantkit import __version__

    return {
        "quantkit_version": __version__,
        "source_model": source,
        "format": recipe.export_format,
        "recipe": recipe.to_dict(),
        "verified_with": formats.FORMATS[recipe.export_format].VERIFIED_WITH,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "timings": {"quantize_seconds": round(seconds, 3)},
        **(extra or {}),
    }
