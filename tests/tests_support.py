"""Helpers shared by tests: checkpoints of other architectures, export comparison."""

import json
from pathlib import Path


def export_files(folder: Path) -> dict[str, bytes]:
    """Every file of an export; quantkit.json without its timings (they differ run to run)."""
    files = {f.name: f.read_bytes() for f in sorted(folder.iterdir())}
    manifest = json.loads(files.pop("quantkit.json"))
    manifest.pop("timings")
    files["quantkit.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def save_gpt2(folder: Path) -> Path:
    """A tiny random GPT-2 (an architecture quantkit does not support) saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100, n_positions=64))
    model.save_pretrained(folder)
    return folder
