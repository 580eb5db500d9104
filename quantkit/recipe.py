"""The recipe: every choice that determines the quantized weights, validated in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from quantkit.algos.quantizer import BlockGrid, Grid
from quantkit.errors import QuantkitError

BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq")
FORMATS = ("auto", "gptq", "compressed-tensors", "awq", "gguf")
IMPORTANCE = ("uniform", "attncon", "actnorm", "first-last")


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
    importance: str | None = None  # None: attncon with GPTQ (it weights the Hessian), uniform with RTN
    importance_min: float = 0.005
    importance_max: float = 1.0
    expand: int = 1
    awq: bool | None = None  # None: on with GPTQ, off with RTN (which then needs no calibration)
    awq_duo: bool = False
    awq_clip: bool = False
    gguf_type: str | None = None  # --format gguf: the GGUF block type (None: chosen from bits/group/sym)

    def __post_init__(self) -> None:
        if self.awq is None:
            object.__setattr__(self, "awq", self.method == "gptq")
        if self.importance is None:
            object.__setattr__(self, "importance", "attncon" if self.method == "gptq" else "uniform")
        if self.format == "gguf" or self.gguf_type is not None:
            from quantkit.export.gguf import check_recipe

            object.__setattr__(self, "gguf_type", check_recipe(self))
        elif self.bits not in BITS:
            raise QuantkitError(f"--bits {self.bits} is not supported: choose one of {', '.join(map(str, BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise QuantkitError(f"--group-size {self.group_size}: use -1 (per-channel) or a positive size such as 128")
        if self.method not in METHODS:
            raise QuantkitError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.format not in FORMATS:
            raise QuantkitError(f"--format {self.format}: choose one of {', '.join(FORMATS)}")
        if self.importance not in IMPORTANCE:
            raise QuantkitError(f"--importance {self.importance}: choose one of {', '.join(IMPORTANCE)}")
        if not 0 < self.damp < 10:
            raise QuantkitError(f"--damp {self.damp}: use a fraction of the mean Hessian diagonal, e.g. 0.01")
        if self.nsamples < 1 or self.seqlen < 2:
            raise QuantkitError("--nsamples must be ≥ 1 and --seqlen ≥ 2")
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
        """GPTQ's Hessians and AWQ's statistics come from calibration activations (weighted by the
        token importance); RTN alone needs none."""
        return self.method == "gptq" or self.awq

    @property
    def export_format(self) -> str:
        """The concrete format: 'auto' picks GPTQ v1 for symmetric 4/8-bit (loadable everywhere),
        compressed-tensors otherwise (transformers + compressed-tensors load every bit width and
        asymmetric grids; vLLM's support for 2/3-bit and asymmetric pack-quantized varies by version)."""
        if self.format != "auto":
            return self.format
        return "gptq" if self.sym and self.bits in (4, 8) else "compressed-tensors"

    @property
    def grid(self) -> Grid | BlockGrid:
        if self.export_format == "gguf":
            return BlockGrid(self.gguf_type)
        # GPTQ v1 stores zero − 1 in `bits` bits, so an asymmetric zero point of 0 cannot be written.
        min_zero = 1 if self.export_format == "gptq" and not self.sym else 0
        return Grid(self.bits, self.group_size, self.sym, min_zero)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


PRESETS = {
    "gptq": {"method": "gptq", "rotate": False, "importance": "uniform", "awq": False},
    "rsq": {"method": "gptq", "rotate": True, "importance": "attncon", "awq": False},
}
