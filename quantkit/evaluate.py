"""Perplexity over non-overlapping windows (the GPTQ-paper protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.progress import WindowProgress


def check_windows(seqlen: int, max_tokens: int | None = None) -> None:
    """--seqlen and --max-tokens that can make at least one window with one prediction."""
    if seqlen < 2:
        raise QuantkitError(f"--seqlen {seqlen}: a window needs at least 2 tokens (one to predict from, one to predict)")
    if max_tokens is not None and max_tokens < seqlen:
        raise QuantkitError(f"--max-tokens {max_tokens} is less than one window of --seqlen {seqlen}: raise it")


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, show_progress: bool = False) -> tuple[float, int]:
    """exp(mean NLL) of tokens [T] cut into ⌊T/seqlen⌋ windows of seqlen; each window predicts
    its own tokens 2..seqlen. Returns (perplexity, number of tokens evaluated)."""
    check_windows(seqlen)
    windows = tokens.numel() // seqlen
    if windows == 0:
        raise QuantkitError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with WindowProgress(windows, enabled=show_progress) as progress:
        for w in range(windows):
            ids = tokens[w * seqlen : (w + 1) * seqlen].to(device)[None]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += seqlen - 1
            progress.window_done(math.exp(nll / count))
    return math.exp(nll / count), windows * seqlen
