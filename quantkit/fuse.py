"""Folding changes of basis into a model's weights, module by module (the model side of
``quantkit.algos.rotation``). The FP model's function is unchanged; only its weights move."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.algos.rotation import (
    fold_norm,
    rotate_heads_input,
    rotate_heads_output,
    rotate_input,
    rotate_output,
)
from quantkit.model import Adapter, MoeSpec


def _scaled_rows(Q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """diag(γ) Q in float64: folding a norm's weight γ [C] and rotating Q [C, C] in one product."""
    return gamma.detach().to(Q.device, torch.float64)[:, None] * Q.double()


@torch.no_grad()
def rotate_model_ends(model: nn.Module, adapter: Adapter, Q: torch.Tensor) -> None:
    """Embeddings write x Q; the final norm is folded into the LM head, which reads x Q.
    Tied embeddings are untied (the two matrices now differ)."""
    embed, head, norm = adapter.embed(model), adapter.lm_head(model), adapter.final_norm(model)
    if head.weight is embed.weight or getattr(model.config, "tie_word_embeddings", False):
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    embed.weight.data = rotate_input(embed.weight.data, Q)  # rows of E are residual vectors: E Q
    head.weight.data = rotate_input(head.weight.data, _scaled_rows(Q, norm.weight))  # W diag(γ) Q
    norm.weight.data.fill_(1)


@torch.no_grad()
def rotate_layer(layer: nn.Module, adapter: Adapter, Q: torch.Tensor, R2: torch.Tensor | None, head_dim: int) -> None:
    """Fold norms and rotate one decoder layer for the residual rotation Q [C, C] and the
    per-head value rotation R2 [d, d] (shared by all heads, so grouped-query attention is respected)."""
    for norm_name, readers in adapter.norm_readers:
        norm = layer.get_submodule(norm_name)
        for name in readers:
            linear = layer.get_submodule(name)
            linear.weight.data = rotate_input(linear.weight.data, _scaled_rows(Q, norm.weight))
        norm.weight.data.fill_(1)
    for name in adapter.residual_writers:
        linear = layer.get_submodule(name)
        linear.weight.data = rotate_output(linear.weight.data, Q)
        if linear.bias is not None:
            linear.bias.data = rotate_input(linear.bias.data[None], Q)[0]
    if R2 is not None:
        v, o = layer.get_submodule(adapter.value_proj), layer.get_submodule(adapter.attn_out_proj)
        v.weight.data = rotate_heads_output(v.weight.data, R2, head_dim)
        if v.bias is not None:
            v.bias.data = rotate_heads_input(v.bias.data[None], R2, head_dim)[0]
        o.weight.data = rotate_heads_input(o.weight.data, R2, head_dim)


@torch.no_grad()
def rotate_moe_block(block: nn.Module, spec: MoeSpec, norm: nn.Module, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the MoE block's input norm γ and rotate the block's own readers and writers of the
    residual stream: the router and the shared expert's gate (unquantized, exact), the shared
    expert. Returns (diag(γ) Q, Q): the routed experts' gate/up read through the first and their
    down writes through the second, applied as each expert is fetched (``ExpertBank.rotation``)."""
    scaled = _scaled_rows(Q, norm.weight)
    readers = [block.get_submodule(spec.router)]
    if spec.shared is not None:
        shared = block.get_submodule(spec.shared)
        readers += [shared.gate_proj, shared.up_proj, block.get_submodule(spec.shared_gate)]
        shared.down_proj.weight.data = rotate_output(shared.down_proj.weight.data, Q)
    for module in readers:
        module.weight.data = rotate_input(module.weight.data, scaled)
    norm.weight.data.fill_(1)
    return scaled, Q


@torch.no_grad()
def scale_readers(previous: nn.Module, readers: list[nn.Linear], s: torch.Tensor) -> None:
    """AWQ fold: readers' weights W diag(s); the previous op's output divided by s — a norm's weight,
    or a Linear's rows and bias. Raises ValueError if the previous op's output does not match."""
    if isinstance(previous, nn.Linear):
        if previous.out_features != s.numel():
            raise ValueError(f"{previous.out_features} outputs cannot absorb {s.numel()} scales")
        previous.weight.data = (previous.weight.double() / s.double()[:, None]).to(previous.weight.dtype)
        if previous.bias is not None:
            previous.bias.data = (previous.bias.double() / s.double()).to(previous.bias.dtype)
    else:
        previous.weight.data = (previous.weight.double() / s.double()).to(previous.weight.dtype)
    for linear in readers:
        linear.weight.data = fold_norm(linear.weight.data, s)
