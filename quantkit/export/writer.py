"""Writing an export safely: a temporary folder renamed at the end, shards written as they fill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.errors import QuantkitError


def temporary_dir(output: Path) -> Path:
    """Where an export of ``output`` is assembled (beside it, so the final rename is atomic)."""
    return output.parent / f".{output.name}.partial"


def prepare_output(output: Path, force: bool, resume: bool = False) -> Path:
    """Check OUTPUT_DIR and return a fresh (or, with resume, the kept) temporary folder."""
    if output.exists() and not force:
        raise QuantkitError(f"output folder '{output}' exists: choose another path or pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise QuantkitError(f"output '{output}' is a file: choose a folder path")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(output)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    return tmp


def finalize_output(tmp: Path, output: Path) -> None:
    """Replace ``output`` by the finished ``tmp`` folder."""
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


class ShardWriter:
    """Writes tensors to safetensors shards of at most ``max_shard_bytes`` as they arrive.

    Shards are named model-0000i-of-0000n.safetensors at ``close`` (a single shard becomes
    model.safetensors) and an index maps every tensor to its shard."""

    def __init__(self, folder: Path, max_shard_bytes: int = 4 * 2**30, metadata: dict | None = None) -> None:
        self.folder = folder
        self.max_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = t.detach().to("cpu").contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.shards):05d}.tmp"
        try:
            save_file(self.pending, str(path), metadata=self.metadata)
        except OSError as e:
            raise QuantkitError(f"writing {path.parent} failed ({e.strerror or e}): free disk space and retry") from None
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards and write the index; returns the shard file names."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (tensor_names, name) in enumerate(zip(self.shards, names)):
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / name)
            weight_map.update({t: name for t in tensor_names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.folder / "model.safetensors.index.json", index)
        return names


def write_part(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` to ``path`` atomically (written beside it, then renamed)."""
    tmp = path.with_suffix(".tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    except OSError as e:
        raise QuantkitError(f"writing {path.parent} failed ({e.strerror or e}): free disk space and retry") from None
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    try:
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    except OSError as e:
        raise QuantkitError(f"writing {path} failed ({e.strerror or e}): free disk space and retry") from None
