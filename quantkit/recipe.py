"""The recipe: every choice that determines the quantized weights, validated in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from quantkit import methods
from quantkit.errors import QuantkitError

if TYPE_CHECKING:  # torch stays unimported until a grid is built (quantkit.cli validates recipes without it)
    from quantkit.algos.quantizer import BlockGrid, Grid

BITS = (2, 3, 4, 8)
FORMATS = ("auto", "gptq", "compressed-tensors", "awq", "gguf")
IMPORTANCE_MAPS = ("length-invariant", "fixed")  # floor scaled by 4096/seqlen, or the authors' fixed [min, max]


@dataclass(frozen=True)
class Recipe:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    method: str = "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    format: str = "auto"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    rotate: bool = False
    rotation_seed: int = 0
    importance: str | None = None  # None: attncon with a solver on a Hessian (it weights H), uniform otherwise
    importance_min: float = 0.005
    importance_max: float = 1.0
    importance_map: str | None = None  # None: length-invariant with attention shares (attncon), fixed with the others
    expand: int = 1
    awq: bool | None = None  # None: on with a solver on a Hessian (GPTQ), off with RTN (which then needs no calibration)
    awq_duo: bool = False
    awq_clip: bool = False
    clip_search: bool = False  # MSE search of each group's range when its grid is fitted (RTN and GPTQ)
    gguf_type: str | None = None  # --format gguf: the GGUF block type (None: chosen from bits/group/sym)

    def __post_init__(self) -> None:
        solvers, strategies = methods.names("solver"), methods.names("importance")
        if self.method not in solvers:
            raise QuantkitError(f"--method {self.method}: choose one of {', '.join(solvers)}")
        on_hessian = methods.HESSIAN in methods.get("solver", self.method).needs
        if self.awq is None:
            object.__setattr__(self, "awq", on_hessian)
        if self.importance is None:
            object.__setattr__(self, "importance", "attncon" if on_hessian else "uniform")
        if self.importance not in strategies:
            raise QuantkitError(f"--importance {self.importance}: choose one of {', '.join(strategies)}")
        shares = methods.get("importance", self.importance).shares
        if self.importance_map is None:
            object.__setattr__(self, "importance_map", "length-invariant" if shares else "fixed")
        if self.format == "gguf" or self.gguf_type is not None:
            from quantkit.formats.gguf import check_recipe

            object.__setattr__(self, "gguf_type", check_recipe(self))
        elif self.bits not in BITS:
            raise QuantkitError(f"--bits {self.bits} is not supported: choose one of {', '.join(map(str, BITS))}")
        if self.clip_search and self.gguf_type is not None:
            raise QuantkitError("--clip-search searches plain grids; a GGUF type's block scales are fitted as llama.cpp "
                                "stores them: drop --clip-search or choose another --format")
        if self.group_size != -1 and self.group_size < 1:
            raise QuantkitError(f"--group-size {self.group_size}: use -1 (per-channel) or a positive size such as 128")
        if self.format not in FORMATS:
            raise QuantkitError(f"--format {self.format}: choose one of {', '.join(FORMATS)}")
        if self.importance_map not in IMPORTANCE_MAPS:
            raise QuantkitError(f"--importance-map {self.importance_map}: choose one of {', '.join(IMPORTANCE_MAPS)}")
        if self.importance_map == "length-invariant" and not shares:
            shared = ", ".join(n for n in strategies if methods.get("importance", n).shares)
            raise QuantkitError(f"--importance-map length-invariant is for --importance {shared} (attention shares), "
                                f"not {self.importance}: use --importance-map fixed")
        if not 0 < self.damp < 10:
            raise QuantkitError(f"--damp {self.damp}: use a fraction of the mean Hessian diagonal, e.g. 0.01")
        if self.nsamples < 1 or self.seqlen < 2:
            raise QuantkitError("--nsamples must be ≥ 1 and --seqlen ≥ 2")
        for flag, seed in (("--seed", self.seed), ("--rotation-seed", self.rotation_seed)):
            if not 0 <= seed < 2**63 - 1:
                raise QuantkitError(f"{flag} {seed}: use a seed from 0 to 2**63 - 2")
        if self.expand < 1:
            raise QuantkitError("--expand must be ≥ 1")
        if not 0 <= self.importance_min <= self.importance_max or self.importance_max <= 0:
            raise QuantkitError("--importance-min must lie in [0, --importance-max] and --importance-max be above 0")
        if self.format == "awq" and self.bits != 4:
            raise QuantkitError(f"--format awq stores 4-bit weights only; --bits {self.bits} needs --format gptq or compressed-tensors")
        if self.format == "awq" and self.group_size == -1:
            raise QuantkitError("--format awq needs a group size (e.g. --group-size 128), not per-channel")

    @property
    def needs_calibration(self) -> bool:
        """Whether a method of the recipe needs statistics of calibration activations (GPTQ's
        Hessians, AWQ's); RTN alone needs none."""
        return methods.plan(self).needs_calibration

    @property
    def export_format(self) -> str:
        """The concrete format (``quantkit.formats.choose``: --format auto picks one)."""
        from quantkit.formats import choose

        return choose(self)[0]

    @property
    def grid(self) -> "Grid | BlockGrid":
        """The grid the solver rounds to, one the export format stores exactly (``quantkit.formats.grid``)."""
        from quantkit.formats import grid

        return grid(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


PRESETS = {
    "gptq": {"method": "gptq", "rotate": False, "importance": "uniform", "awq": False},
    "rsq": {"method": "gptq", "rotate": True, "importance": "attncon", "awq": False},
    # RSQ's released run (ylsung/rsq scripts/run_rsq.sh: Llama-3-8B, --rotate --w_bits 3 --w_clip, per-channel
    # symmetric, no act-order, attncon in [0.005, 1], 256 × 4096 windows) adapted to a small model: 32 × 4096
    # windows give ~85 calibration tokens per MLP channel (1536), as 256 × 4096 give Llama-3-8B's 14336 (~73).
    # Deviations: R1/R2 fused into the weights, no online R4 Hadamard before down_proj (exports load anywhere);
    # the length-invariant floor, identical to their fixed range at --seqlen 4096 and keeping its split at others.
    "rsq-paper": {"method": "gptq", "rotate": True, "importance": "attncon", "awq": False, "bits": 3,
                  "group_size": -1, "sym": True, "act_order": False, "clip_search": True, "nsamples": 32, "seqlen": 4096},
}
