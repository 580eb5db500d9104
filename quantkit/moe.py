"""Mixture-of-experts pieces the walk calls: routing, one expert's MLP, one layer's experts one
at a time, and the calibration coverage report.

Shapes: C = hidden size, I = an expert's intermediate size, T = tokens of a batch, k = experts
per token, E = routed experts of a layer.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.algos.rotation import rotate_input, rotate_output
from quantkit.checkpoint import WeightSource
from quantkit.errors import QuantkitError
from quantkit.model import MoeSpec

# An expert that receives fewer routed calibration tokens than this is calibrated on every token
# of its layer (see ``Coverage``): fewer tokens than a few hundred leave most of H's directions
# unobserved, and none leave H = 0, which no damping makes positive definite.
MIN_EXPERT_TOKENS = 128


def route(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own router on x [T, C] → (routing weights [T, k], expert indices [T, k])."""
    _, weights, experts = router(x)
    return weights, experts


def expert_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """act(x gateᵀ) ⊙ (x upᵀ): what an expert's down projection reads. x [T, C], gate/up [I, C] → [T, I]."""
    return act(F.linear(x, gate)) * F.linear(x, up)


def expert_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """One expert (gated MLP) on x [T, C]; down [C, I] → [T, C]."""
    return F.linear(expert_hidden(x, gate, up, act), down)


class ExpertBank:
    """One layer's routed experts, one at a time, as float32 (gate [I, C], up [I, C], down [C, I]).

    They come from transformers' fused parameters (gate_up_proj [E, 2I, C], down_proj [E, C, I])
    or, when the layer streams from the checkpoint (``weights``), from its per-expert tensors
    ``{prefix}.{spec.expert_names(e)}.weight``; ``put`` writes an expert's quantized weights back
    into the fused parameters (a streamed layer keeps nothing). With ``rotation`` set, ``get``
    returns the expert rotated (RSQ's R1), and ``put`` receives it so."""

    @classmethod
    def take(cls, block: nn.Module, spec: MoeSpec, prefix: str, weights: WeightSource | None = None) -> ExpertBank:
        """Take the routed experts out of ``block`` (``give_back`` returns them), so that moving the
        layer's dense part to the compute device leaves them where they are: they go there one at a time."""
        experts = block.get_submodule(spec.experts)
        delattr(block, spec.experts)
        return cls(experts, spec, prefix, weights)

    def give_back(self, block: nn.Module) -> None:
        setattr(block, self.spec.experts, self.experts)

    def __init__(self, experts: nn.Module, spec: MoeSpec, prefix: str, weights: WeightSource | None = None):
        self.experts, self.spec, self.prefix = experts, spec, prefix
        self.streamed = weights is not None and experts.down_proj.is_meta
        self.weights = weights
        self.count, self.hidden, self.inter = experts.down_proj.shape
        if tuple(experts.gate_up_proj.shape) != (self.count, 2 * self.inter, self.hidden):
            raise QuantkitError(
                f"{prefix}: experts.gate_up_proj has shape {tuple(experts.gate_up_proj.shape)}, expected "
                f"{(self.count, 2 * self.inter, self.hidden)} (transformers' fused [E, 2I, C] layout)"
            )
        self.act = experts.act_fn
        self.rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # (diag(γ) Q, Q): see fuse.rotate_moe_block

    def get(self, e: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.streamed:
            names = [f"{self.prefix}.{n}.weight" for n in self.spec.expert_names(e)]
            read = self.weights.read(names)
            gate, up, down = (read[n] for n in names)
        else:
            gate_up = self.experts.gate_up_proj[e]
            gate, up, down = gate_up[: self.inter], gate_up[self.inter :], self.experts.down_proj[e]
        out = tuple(w.to(device, torch.float32) for w in (gate, up, down))
        if self.rotation is not None:
            scaled, Q = self.rotation
            out = (rotate_input(out[0], scaled), rotate_input(out[1], scaled), rotate_output(out[2], Q))
        if not all(torch.isfinite(w).all() for w in out):
            raise QuantkitError(f"NaN or Inf in the weights of {self.prefix} expert {e}: the checkpoint is damaged")
        return out

    @torch.no_grad()
    def put(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        if self.streamed:
            return
        fused = self.experts.gate_up_proj
        fused.data[e, : self.inter] = gate.to(fused.device, fused.dtype)
        fused.data[e, self.inter :] = up.to(fused.device, fused.dtype)
        self.experts.down_proj.data[e] = down.to(fused.device, fused.dtype)


@dataclass
class Coverage:
    """Calibration coverage of one MoE layer: routed tokens per expert (over all data-parallel
    ranks) and the experts that received fewer than ``min_tokens``.

    Fallback ("all-experts" statistics): such an expert's Hessians are accumulated over every
    calibration token of the layer (with its importance), as if the router had sent it all of
    them; the layer's output still uses the real routing. So every expert is solved by GPTQ on a
    full-rank Hessian, never on an empty one."""

    tokens: list[int]
    min_tokens: int
    fallback: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.fallback = [e for e, n in enumerate(self.tokens) if n < self.min_tokens]

    def summary(self) -> dict:
        """What quantkit.json records for the layer."""
        return {
            "tokens": {"min": min(self.tokens), "median": statistics.median(self.tokens), "max": max(self.tokens)},
            "per_expert": self.tokens,
            "fallback": self.fallback,
            "min_tokens": self.min_tokens,
        }


def coverage_table(layers: dict[str, dict]) -> list[str]:
    """Markdown rows (model card) from quantkit.json's ``experts`` {layer: Coverage.summary()}."""
    lines = ["| layer | tokens per expert (min / median / max) | all-experts fallback |", "| --- | --- | --- |"]
    for layer, info in layers.items():
        t = info["tokens"]
        fallback = ", ".join(f"expert {e} ({info['per_expert'][e]} tokens)" for e in info["fallback"]) or "none"
        lines.append(f"| {layer} | {t['min']} / {t['median']:g} / {t['max']} | {fallback} |")
    return lines
