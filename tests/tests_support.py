"""Helpers for tests that need checkpoints of other architectures."""

from pathlib import Path


def save_gpt2(folder: Path) -> Path:
    """A tiny random GPT-2 (an architecture quantkit does not support) saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100, n_positions=64))
    model.save_pretrained(folder)
    return folder
