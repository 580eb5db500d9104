"""Per-token importance r_t for RSQ's weighted GPTQ Hessian H = Σ_t r_t x_t x_tᵀ.

Raw scores come from one of three strategies (RSQ, Sung et al. 2025):
- ``attention_concentration`` (AttnCon, RSQ's choice): the attention a token receives, summed
  over all heads and all queries of its sequence.
- ``activation_norm`` (ActNorm): ‖x_t‖₂.
- ``first_last``: a positional heuristic favouring the first and last tokens.
``map_importance`` turns raw scores into Hessian weights.

Length invariance (attncon): every query's attention sums to 1, so a window of T tokens hands out
Hq·T in all; the sink takes a share of it that hardly depends on T, so after min–max mapping the
most attended token weighs ``high`` and all tokens' weight above the floor adds up to about the same
mass at every T, while the floor's mass is ``low``·T. With a fixed ``low`` the floor/sink split of
H = Σ r_t x_t x_tᵀ therefore shifts with the window length (the sink's share at T = 512 is about 5×
its share at 4096). ``map_importance(..., reference=REFERENCE_LENGTH)`` keeps ``low``·T constant
instead: ``low`` is the floor at the authors' 4096-token windows and scales as 1/T elsewhere.
"""

from __future__ import annotations

import torch

REFERENCE_LENGTH = 4096  # RSQ's released runs calibrate on 4096-token windows (--train_seqlen 4096)


def attention_concentration(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """r_j = Σ_h Σ_i A_h[i, j], A_h = softmax_j(q_h,i · k_g(h),j · scaling + mask): float32 [B, T].

    q [B, Hq, T, D] and k [B, Hkv, T, D] are post-RoPE queries and keys; query head h reads kv head
    h // (Hq / Hkv). Causal masking always applies; ``attention_mask`` [B, 1, T, T] (True or 0 =
    attend, False or −inf = masked) further restricts it, e.g. for padding. A query that sees
    no key contributes nothing. Queries are processed ``chunk`` at a time against the keys they
    can see, so scores take B·Hq·chunk·T floats at most. Chunks of 64–128 queries ran 1.2–1.45×
    faster than 256 on one thread (SmolLM2's 9/3 heads at T = 512, Llama-8B's 32/8 at T = 2048),
    with r equal to 1e-6 but summed in another order, which flips rounding ties in SmolLM2's GPTQ
    codes (layer 0 k_proj, then every later layer): the default stays 256 until a perplexity
    comparison over seeds decides.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} kv heads evenly")
    q = q.float().reshape(b, hkv, hq // hkv, t, d)  # heads h = g·(Hq/Hkv) + j share kv head g
    k = k.float()[:, :, None]  # [B, Hkv, 1, T, D]
    r = torch.zeros(b, t, device=q.device)
    for start in range(0, t, chunk):
        end = min(start + chunk, t)  # queries [start, end) see keys [0, end)
        scores = q[..., start:end, :] @ k[..., :end, :].transpose(-1, -2) * scaling
        causal = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(start)
        scores.masked_fill_(~causal, float("-inf"))
        if attention_mask is not None:
            mask = attention_mask[:, :, None, start:end, :end]  # [B, 1, 1, c, end]
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, float("-inf"))
            else:
                scores += mask.float()
        probs = scores.softmax(-1)
        if attention_mask is not None:  # only a mask can leave a query no key (causal keeps its own)
            probs.masked_fill_(scores.amax(-1, keepdim=True) == float("-inf"), 0.0)
        r[:, :end] += probs.sum((1, 2, 3))
    return r


def activation_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_t‖₂ of activations x [B, T, C]: float32 [B, T]."""
    return x.float().norm(dim=-1)


def first_last(t: int, n: int = 512) -> torch.Tensor:
    """Score max(0, 1 − i/n, 1 − (t−1−i)/n) of position i in a length-t sequence: float32 [t].

    The first and last n tokens ramp linearly from 1 at either end down to 1/n; the middle
    scores 0 (``map_importance`` lifts it to ``low``). Follows the authors' reference code
    (ylsung/rsq, FirstLastLinearMaskingWeighting, n = 512); where the ramps overlap (2n > t)
    the larger weight wins.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 first/last tokens, got {n}")
    i = torch.arange(t, dtype=torch.float32)
    return torch.maximum(1 - i / n, 1 - (t - 1 - i) / n).clamp_min(0)


def length_invariant_floor(low: float, high: float, t: int, reference: int = REFERENCE_LENGTH) -> float:
    """The floor at windows of t tokens whose total mass floor·t equals low·reference: low·reference/t,
    capped at ``high`` (then every token weighs the same)."""
    return min(high, low * reference / t)


def map_importance(
    r: torch.Tensor, low: float = 0.005, high: float = 1.0, reference: int | None = None
) -> torch.Tensor:
    """Map raw scores r [B, T] per sample linearly onto [low, high] (min → low, max → high),
    then divide by the sample mean so the weights average 1: float32 [B, T].

    ``reference`` (length-invariant floor): ``low`` is the floor at windows of ``reference`` tokens;
    at T tokens the floor is low·reference/T (capped at ``high``), so the floor's total mass is the
    same at every T. None: the fixed range [low, high] (the authors' mapping). A constant sample
    maps to all ones.
    """
    if not 0 <= low <= high or high <= 0:
        raise ValueError(f"need 0 <= low <= high and high > 0, got low={low}, high={high}")
    if reference is not None:
        low = length_invariant_floor(low, high, r.shape[-1], reference)
    r = r.float()
    r_min, r_max = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    w = low + (high - low) * (r - r_min) / (r_max - r_min)  # NaN for a constant sample
    return torch.where(r_max > r_min, w / w.mean(-1, keepdim=True), 1.0)


def hessian_split(w: torch.Tensor, sqnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where tr(Σ_t w_t x_t x_tᵀ) = Σ_t w_t ‖x_t‖² of each sample comes from, for weights w [B, T]
    and squared norms ‖x_t‖² [B, T]: (position 0's share, the share of floor-weight tokens, those
    weighing at most twice the sample's lowest weight), float32 ([B], [B])."""
    mass = w.float() * sqnorm.float()
    total = mass.sum(-1)
    floor = w <= 2 * w.amin(-1, keepdim=True)
    return mass[:, 0] / total, (mass * floor).sum(-1) / total


def effective_tokens(w: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size (Σ w_t)² / Σ w_t² of weights w [B, T]: float32 [B]; T when every
    token weighs the same, 1 when one token carries all the weight. A Hessian over C input channels
    needs well over C effective tokens to be estimated, whatever T is."""
    w = w.float()
    return w.sum(-1).square() / w.square().sum(-1)
