"""Fused rotations (RSQ's R, as in QuaRot/SpinQuant): orthogonal changes of basis folded into weights.

Linear weights are W [out, in] with y = x Wᵀ + b. For an orthogonal Q (Q Qᵀ = I):
- a Linear *reading* a rotated stream x Q keeps its output with W' = W Q       (``rotate_input``)
- a Linear *writing* into a rotated stream produces y Q with W' = Qᵀ W, b' = b Q (``rotate_output``)
- RMSNorm with unit weight commutes with Q (it only divides by ‖x‖), so each norm's weight γ is
  first folded into the Linears that read it: W' = W diag(γ)                       (``fold_norm``)
All math runs in float64 and is cast back to the weight's dtype.
"""

from __future__ import annotations

import torch


def fold_norm(W: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """W [out, in] · diag(γ [in])."""
    return (W.double() * gamma.double()[None, :]).to(W.dtype)


def rotate_input(W: torch.Tensor, Q: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """W [out, in] Q [in, in], ``rows`` rows at a time so that float64 copies of a large
    embedding or LM head (vocab × hidden) are never made whole."""
    Q = Q.to(W.device, torch.float64)
    out = torch.empty_like(W)
    for r in range(0, W.shape[0], rows):
        out[r : r + rows] = (W[r : r + rows].double() @ Q).to(W.dtype)
    return out


def rotate_output(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Qᵀ [out, out] W [out, in] (apply the same rotation to a bias b [out] as ``rotate_input(b[None], Q)``)."""
    return (Q.to(W.device, torch.float64).t() @ W.double()).to(W.dtype)


def rotate_heads_output(W: torch.Tensor, R: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of W [heads·d, in] rotated per head: each head's output v_h becomes v_h R (R [d, d])."""
    heads = W.shape[0] // head_dim
    Wh = W.double().reshape(heads, head_dim, -1)
    return (R.to(W.device, torch.float64).t() @ Wh).reshape(W.shape).to(W.dtype)


def rotate_heads_input(W: torch.Tensor, R: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Columns of W [out, heads·d] rotated per head, to read the per-head rotated values a_h R."""
    heads = W.shape[1] // head_dim
    Wh = W.double().reshape(-1, heads, head_dim)
    return (Wh @ R.to(W.device, torch.float64)).reshape(W.shape).to(W.dtype)
