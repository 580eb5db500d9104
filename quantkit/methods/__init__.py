"""The methods table: every transform, solver and token-importance strategy the walk can run, what
each needs from the walk and what it returns.

The walk (quantkit.walk) reads an entry's ``needs`` and ``scope`` and offers what is asked; it knows
no method by name. The recipe validates names against this table, the CLI takes its choices and the
model card its labels from it. The table is torch-free (the CLI reads it before torch loads); each
entry names the function implementing it, imported when the walk first calls it.

Adding a method: one module with its function, one ``Method`` entry below (or ``register`` for a
method living elsewhere, e.g. in a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

# What the walk offers on request (quantkit.walk.layer.LayerContext documents each one's shape).
HESSIAN = "hessian"  # importance-weighted H = (2/N) Σ_t r_t x_t x_tᵀ [C, C] of a Linear's input
ABSMEAN = "absmean"  # mean |x| [C] of a Linear's input over all calibration tokens
QK = "qk"  # post-RoPE queries [b, Hq, L, D] and keys [b, Hkv, L, D] of the layer's attention, per batch
INPUTS = "inputs"  # the layer's inputs x [b, L, C], per batch
FP_OUTPUTS = "fp_outputs"  # the layer's outputs before any of its Linears is solved [b, L, C], per batch
GRADIENTS = "gradients"  # the method runs with autograd enabled
NEEDS = frozenset({HESSIAN, ABSMEAN, QK, INPUTS, FP_OUTPUTS, GRADIENTS})

# Kinds, with what an entry's function takes and returns (see each module's docstring):
# "importance" ImportanceBatch -> raw scores [b, L] (entry None: every token weighs 1);
# "solver"     scope "stack": (W [N, K], H | None, recipe, grid, where) -> (QuantizedWeight, loss | None),
#              scope "layer": LayerContext -> {Linear name: QuantizedWeight} (block-wise methods);
# "transform"  scope "model": (model, adapter, recipe) -> state, before the calibration inputs are captured;
#              scope "layer": (LayerContext, state) -> notes, on the FP layer before its solves.
KINDS = ("importance", "solver", "transform")
SCOPES = {"importance": ("batch",), "solver": ("stack", "layer"), "transform": ("layer",)}


@dataclass(frozen=True)
class Method:
    """One table entry.

    ``entry``/``prepare``: "module:function" implementing it (``prepare``: a transform's model-level
    step, run once before calibration). ``flags``: the recipe's bool fields that enable a transform
    (all must be true). ``settings``: the other recipe fields it reads (the model card lists them). ``shares``: an importance whose raw scores are attention shares (each query
    hands out 1), the only kind a length-invariant floor applies to."""

    kind: str
    name: str
    label: str
    summary: str
    needs: frozenset[str] = frozenset()
    scope: str = "batch"
    entry: str | None = None
    prepare: str | None = None
    flags: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    shares: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.scope not in SCOPES[self.kind] or not self.needs <= NEEDS:
            raise ValueError(f"method {self.name}: kind {self.kind!r}, scope {self.scope!r} or needs {set(self.needs)} unknown")

    def load(self, attribute: str = "entry") -> Callable:
        """The function named by ``entry`` (or ``prepare``)."""
        module, name = getattr(self, attribute).split(":")
        return getattr(import_module(module), name)


TABLE: dict[tuple[str, str], Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the table (its name must be new for its kind)."""
    key = (method.kind, method.name)
    if key in TABLE:
        raise ValueError(f"{method.kind} {method.name} is already in the methods table")
    TABLE[key] = method
    return method


def unregister(kind: str, name: str) -> None:
    del TABLE[(kind, name)]


def names(kind: str) -> tuple[str, ...]:
    return tuple(name for k, name in TABLE if k == kind)


def get(kind: str, name: str) -> Method:
    """The entry, or KeyError naming the choices."""
    try:
        return TABLE[(kind, name)]
    except KeyError:
        raise KeyError(f"no {kind} {name!r}: choose one of {', '.join(names(kind))}") from None


def label(kind: str, name: str) -> str:
    return get(kind, name).label


@dataclass(frozen=True)
class Plan:
    """What one recipe runs, from the table: layer transforms in table order, one importance
    strategy, one solver."""

    model_transforms: tuple[Method, ...]
    transforms: tuple[Method, ...]
    importance: Method
    solver: Method

    @property
    def methods(self) -> tuple[Method, ...]:
        return (*self.transforms, self.importance, self.solver)

    def needs(self, need: str) -> bool:
        return any(need in m.needs for m in self.methods)

    @property
    def needs_calibration(self) -> bool:
        return any(m.needs - {GRADIENTS} for m in (*self.transforms, self.solver))


def plan(recipe) -> Plan:
    """The recipe's methods (its names already validated against the table)."""
    transforms = tuple(m for (kind, _), m in TABLE.items() if kind == "transform" and all(getattr(recipe, f) for f in m.flags))
    return Plan(tuple(m for m in transforms if m.prepare), transforms, get("importance", recipe.importance),
                get("solver", recipe.method))


# --- the table ---------------------------------------------------------------------------------------

_I = "quantkit.methods.importance:"
register(Method("importance", "uniform", "uniform", "every token weighs 1"))
register(Method("importance", "attncon", "attention-concentration",
                "attention each token receives, summed over heads and queries (RSQ)", frozenset({QK}),
                entry=_I + "attention_concentration", shares=True))
register(Method("importance", "actnorm", "activation-norm", "‖x_t‖ of the layer's input", frozenset({INPUTS}),
                entry=_I + "activation_norm"))
register(Method("importance", "first-last", "first/last-token", "the first and last 512 positions, ramped",
                frozenset({INPUTS}), entry=_I + "first_last"))
register(Method("importance", "actdiff", "activation-difference", "‖y_t − x_t‖: how much the FP layer changes each token",
                frozenset({INPUTS, FP_OUTPUTS}), entry="quantkit.methods.actdiff:activation_difference"))

_S = "quantkit.methods.solvers:"
register(Method("solver", "rtn", "RTN", "round to nearest", scope="stack", entry=_S + "rtn_stack"))
register(Method("solver", "gptq", "GPTQ", "column-by-column rounding with error feedback through H⁻¹",
                frozenset({HESSIAN}), scope="stack", entry=_S + "gptq_stack", settings=("damp", "block_size", "act_order")))

register(Method("transform", "rotate", "Hadamard rotation", "residual R1 and per-head R2, fused", scope="layer",
                entry="quantkit.methods.rotate:rotate_layer", prepare="quantkit.methods.rotate:prepare_rotation",
                flags=("rotate",)))
register(Method("transform", "awq", "AWQ scales", "per-channel scales s = mean|x|^α, folded into the previous op",
                frozenset({HESSIAN, ABSMEAN}), scope="layer", entry="quantkit.methods.awq:awq_scales", flags=("awq",)))
register(Method("transform", "awq-clip", "AWQ clip", "per-group range shrink minimising the output error",
                frozenset({HESSIAN}), scope="layer", entry="quantkit.methods.awq:awq_clip", flags=("awq", "awq_clip")))
