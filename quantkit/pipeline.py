"""The layer walk: owns the model, the devices and the order; calls the algorithms.

[rotate embeddings/head] → capture the first decoder layer's inputs → for each layer: onload,
[rotate], [token importance], Hessians per true-sequential group, GPTQ/RTN, recompute outputs
with the quantized weights → offload.
Peak device memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from transformers import AttentionInterface

from quantkit.algos.awq import apply_clip, awq_clip_search, awq_scale_search
from quantkit.algos.gptq import CholeskyError, Hessian, gptq_quantize
from quantkit.algos.hadamard import random_orthogonal
from quantkit.algos.importance import (
    REFERENCE_LENGTH,
    activation_norm,
    attention_concentration,
    first_last,
    map_importance,
)
from quantkit.algos.quantizer import QuantizedWeight, rtn_quantize
from quantkit.checkpoint import WeightSource
from quantkit.distributed import World
from quantkit.errors import QuantkitError
from quantkit.formats import check_packable
from quantkit.fuse import check_rotatable, rotate_layer, rotate_model_ends, rotate_moe_block, scale_readers
from quantkit.model import Adapter
from quantkit.moe import MIN_EXPERT_TOKENS, Coverage, ExpertBank, expert_hidden, expert_mlp, route
from quantkit.progress import LayerProgress, warn
from quantkit.recipe import Recipe


class _Captured(Exception):
    """Raised by a hook once it has recorded what it needs, to cut the forward short."""


@dataclass
class LayerInputs:
    """Calibration activations entering a decoder layer: hidden [b, L, C] per batch, kept on
    ``storage`` (the compute device, or CPU when offloaded); kwargs live on the compute device.
    Data parallel: ``hidden`` holds this process's batches only; ``world`` combines statistics
    across processes."""

    hidden: list[torch.Tensor]
    kwargs: dict
    device: torch.device
    storage: torch.device
    world: World

    def batches(self) -> Iterator[torch.Tensor]:
        for x in self.hidden:
            yield x.to(self.device, non_blocking=True)


@dataclass
class Rotation:
    """Residual rotation Q [C, C] and per-head value rotation R2 [d, d] (float64)."""

    Q: torch.Tensor
    R2: torch.Tensor
    head_dim: int


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def check_shapes(layer: nn.Module, index: int, adapter: Adapter, recipe: Recipe) -> None:
    """Fail before quantizing a layer whose Linears (and routed experts) cannot be grouped or packed
    with this recipe."""
    shapes = {name: layer.get_submodule(name).weight.shape for name in adapter.linear_names()}
    block = adapter.moe_block(layer)
    if block is not None:
        experts = block.get_submodule(adapter.moe.experts)
        _, hidden, inter = experts.down_proj.shape
        shapes.update({f"{adapter.moe.block}.experts gate/up": (2 * inter, hidden), f"{adapter.moe.block}.experts down": (hidden, inter)})
        if adapter.moe.shared is not None:
            shared = f"{adapter.moe.block}.{adapter.moe.shared}"
            shapes.update({f"{shared}.{n}": m.weight.shape for n, m in block.get_submodule(adapter.moe.shared).named_children()
                           if isinstance(m, nn.Linear)})
    for name, (out_f, in_f) in shapes.items():
        where = f"layer {index} {name} (in_features {in_f})"
        if recipe.group_size != -1 and in_f % recipe.group_size:
            valid = [g for g in (32, 64, 128, 256) if in_f % g == 0] + [-1]
            raise QuantkitError(
                f"--group-size {recipe.group_size} does not divide {where}: valid sizes {', '.join(map(str, valid))}"
            )
        check_packable(where, out_f, in_f, recipe.bits)


def activation_storage(device: torch.device, tokens: torch.Tensor, config, offload: bool | None) -> torch.device:
    """Where calibration activations live: CPU when asked, or (None = auto) when a layer's inputs,
    outputs and reused block inputs (attention output, MLP down_proj input) in fp32 would take
    more than half of the compute device's free memory."""
    if offload is not None:
        return torch.device("cpu") if offload else device
    if device.type != "cuda":
        return device
    needed = tokens.numel() * (3 * config.hidden_size + config.intermediate_size) * 4
    free, _ = torch.cuda.mem_get_info(device)
    return torch.device("cpu") if needed > free // 2 else device


@torch.no_grad()
def capture_inputs(
    model: nn.Module, adapter: Adapter, tokens: torch.Tensor, device: torch.device, batch: int, storage: torch.device,
    world: World = World(),
) -> LayerInputs:
    """Run the embeddings on ``device`` and record what enters decoder layer 0, for tokens [S, L]
    cut into batches of ``batch`` windows (only this process's batches under data parallelism)."""
    first = adapter.layers(model)[0]
    pre = adapter.pre_layer_modules(model)
    seen: dict = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs.pop("hidden_states")).to(storage, torch.float32)
        seen["kwargs"] = {k: _to(v, device) for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    for m in pre:
        m.to(device)
    hidden = []
    try:
        for b, start in enumerate(range(0, tokens.shape[0], batch)):
            if not world.owns(b):
                continue
            try:
                model.model(input_ids=tokens[start : start + batch].to(device), use_cache=False)
            except _Captured:
                hidden.append(seen["hidden"])
    finally:
        handle.remove()
        for m in pre:
            m.to("cpu")
    return LayerInputs(hidden, seen["kwargs"], device, storage, world)


class BlockReuse:
    """Skips recomputing finished blocks during one layer's true-sequential pass.

    A block listed in ``Adapter.reusable`` (self_attn, mlp) outputs its last Linear (o_proj,
    down_proj) applied to that Linear's input. That input is recorded, batch by batch, when the
    Linear's group is observed, which happens after every other Linear of the block is final; from
    then on the block answers last(recorded input) without running attention or gate/up again:
    the same tensors bit for bit, and the last Linear's current (quantized) weights are used."""

    def __init__(self, layer: nn.Module, adapter: Adapter, storage: torch.device):
        earlier: set[str] = set()
        self.blocks = {}  # last Linear's name -> (block, last Linear, returns a tuple)
        for group in adapter.sequential:
            for block, last, returns_tuple in adapter.reusable:
                others = {n for n in adapter.linear_names() if n.startswith(block + ".") and n != last}
                if last in group and others <= earlier:
                    self.blocks[last] = (layer.get_submodule(block), layer.get_submodule(last), returns_tuple)
            earlier |= set(group)
        self.storage = storage
        self.recording: dict[str, list[torch.Tensor]] = {}
        self.recorded: dict[str, list[torch.Tensor]] = {}
        self.fixed: list[tuple[nn.Module, list[torch.Tensor]]] = []

    def set_output(self, block: nn.Module, outputs: list[torch.Tensor]) -> None:
        """From now on ``block`` answers ``outputs[b]`` for batch b (computed elsewhere: the MoE
        block, expert by expert)."""
        self.fixed.append((block, outputs))

    def record(self, name: str, x: torch.Tensor) -> None:
        """Keep ``x`` (the next batch's input of Linear ``name``) if it ends a reusable block."""
        if name in self.blocks:
            self.recording.setdefault(name, []).append(x.to(self.storage))

    def pass_done(self) -> None:
        """Every batch has been through: what was recorded in this pass can be reused from now on."""
        self.recorded.update(self.recording)
        self.recording = {}

    @contextmanager
    def batch(self, b: int, device: torch.device) -> Iterator[None]:
        """While inside, every block whose last input was recorded in an earlier pass reuses it."""
        patched = []
        for name, recorded in self.recorded.items():
            block, last, returns_tuple = self.blocks[name]
            x = recorded[b].to(device)
            block.forward = (lambda *_a, _x=x, _l=last, **_k: (_l(_x), None)) if returns_tuple else (
                lambda *_a, _x=x, _l=last, **_k: _l(_x))
            patched.append(block)
        for block, outputs in self.fixed:
            block.forward = lambda *_a, _y=outputs[b].to(device), **_k: _y
            patched.append(block)
        try:
            yield
        finally:
            for block in patched:
                del block.forward


def _forward(layer: nn.Module, inputs: LayerInputs, reuse: BlockReuse | None = None) -> list[torch.Tensor]:
    outputs = []
    for b, x in enumerate(inputs.batches()):
        with reuse.batch(b, inputs.device) if reuse else nullcontext():
            out = layer(x, **inputs.kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).to(inputs.storage))
    return outputs


def _check_finite(tensors: list[torch.Tensor], what: str) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise QuantkitError(f"NaN or Inf in {what}: the checkpoint or calibration produced non-finite values")


def prepare_rotation(model: nn.Module, adapter: Adapter, recipe: Recipe) -> Rotation:
    """Build R1 and R2 and rotate the embeddings and LM head (the layers are rotated as they are reached)."""
    config = model.config
    check_rotatable(model, adapter)
    head_dim = adapter.head_dim(config)
    Q, q_is_hadamard = random_orthogonal(config.hidden_size, recipe.rotation_seed)
    R2, r2_is_hadamard = random_orthogonal(head_dim, recipe.rotation_seed + 1)
    for n, ok in ((config.hidden_size, q_is_hadamard), (head_dim, r2_is_hadamard)):
        if not ok:
            warn(f"no Hadamard matrix of order {n} can be built: using a random orthogonal matrix (slower to spread outliers)")
    rotate_model_ends(model, adapter, Q)
    return Rotation(Q, R2, head_dim)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function registered with transformers: records post-RoPE q, k and stops the forward."""
    module._quantkit_qk = (query, key, attention_mask, scaling)
    raise _Captured


AttentionInterface.register("quantkit_capture", _capture_attention)


def _attention_inputs(layer: nn.Module, x: torch.Tensor, kwargs: dict):
    attn = layer.self_attn
    original = attn.config._attn_implementation
    attn.config._attn_implementation = "quantkit_capture"
    try:
        layer(x, **kwargs)
    except _Captured:
        pass
    finally:
        attn.config._attn_implementation = original
    q, k, mask, scaling = attn.__dict__.pop("_quantkit_qk")
    return q, k, mask, scaling if scaling is not None else attn.scaling


def token_importance(layer: nn.Module, inputs: LayerInputs, recipe: Recipe) -> list[torch.Tensor] | None:
    """Importance weights [b, L] per batch (mean 1 per sample), from this layer's view of its inputs."""
    if recipe.importance == "uniform":
        return None
    raw = []
    for x in inputs.batches():
        if recipe.importance == "attncon":
            q, k, mask, scaling = _attention_inputs(layer, x, inputs.kwargs)
            raw.append(attention_concentration(q, k, scaling, mask))
        elif recipe.importance == "actnorm":
            raw.append(activation_norm(x))
        else:
            raw.append(first_last(x.shape[1]).expand(x.shape[0], -1))
    reference = REFERENCE_LENGTH if recipe.importance_map == "length-invariant" else None
    return [map_importance(r, recipe.importance_min, recipe.importance_max, reference).to(inputs.device) for r in raw]


@torch.no_grad()
def quantize_layers(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor | None,
    recipe: Recipe,
    device: torch.device,
    show_progress: bool = True,
    batch_tokens: int = 4096,
    offload: bool | None = None,
    weights: WeightSource | None = None,
    restore: Callable[[int, nn.Module], None] | None = None,
    start: int = 0,
    world: World = World(),
    verbose: bool = False,
    experts_sink=None,
) -> Iterator[tuple[int, dict[str, QuantizedWeight]]]:
    """Quantize every decoder layer in order; yields (layer index, {module name: quantized weight}).

    The model's Linear weights are replaced in place by their dequantized values (in their dtype);
    with ``recipe.rotate`` the model is rotated first (its FP function is unchanged).
    ``weights``: layers live on meta and are read from it when reached, then released.
    ``start``/``restore``: layers before ``start`` are already done (resume) — ``restore(i, layer)``
    puts back their quantized tensors, and they are only run to recompute the next inputs.
    ``world``: data-parallel processes sharing the calibration batches (see quantkit.distributed).
    ``verbose``: a progress line per module, not only per layer.
    MoE layers: the routed experts are not in the yielded results; each is handed to
    ``experts_sink.add_experts(i, e, {checkpoint name: quantized weight})`` as soon as it is solved,
    and the layer's calibration coverage to ``experts_sink.add_coverage(i, summary)``."""
    layers = adapter.layers(model)
    grid = recipe.grid
    rotation = prepare_rotation(model, adapter, recipe) if recipe.rotate else None
    inputs = None
    if tokens is not None:
        batch = max(1, batch_tokens // tokens.shape[1])
        batches = -(-tokens.shape[0] // batch)
        if batches < world.size:
            raise QuantkitError(
                f"{tokens.shape[0]} calibration windows make {batches} batches of {batch}, fewer than the "
                f"{world.size} data-parallel processes: raise --nsamples or use fewer processes"
            )
        storage = activation_storage(device, tokens, model.config, offload)
        inputs = capture_inputs(model, adapter, tokens, device, batch, storage, world)
        _check_finite(inputs.hidden, "the embeddings' output")

    with LayerProgress(len(layers), enabled=show_progress and world.is_main, verbose=verbose) as progress:
        for i, layer in enumerate(layers):
            dtype = next(layer.parameters()).dtype
            prefix, block, layer_adapter = f"{adapter.layers_path}.{i}", adapter.moe_block(layer), adapter.for_layer(layer)
            if weights is not None:
                weights.load_into(layer, prefix, dtype, None if block is None else adapter.dense_names(layer))
            if i < start:
                restore(i, layer)
                if inputs is not None:
                    inputs.hidden = _restored_forward(layer, block, adapter, inputs, prefix, device)
                _release(layer, dtype, weights)
                progress.layer_done()
                continue
            check_shapes(layer, i, layer_adapter, recipe)
            bank = ExpertBank.take(block, adapter.moe, prefix, weights) if block is not None else None
            layer.to(device, torch.float32)
            for name, p in layer.named_parameters():
                if not torch.isfinite(p).all():
                    raise QuantkitError(f"NaN or Inf in the weights of layer {i} ({name}): the checkpoint is damaged")
            if rotation is not None:
                rotate_layer(layer, layer_adapter, rotation.Q, rotation.R2, rotation.head_dim)
                if bank is not None:
                    norm = next(n for n, readers in adapter.norm_readers if readers[0].startswith(adapter.moe.block + "."))
                    bank.rotation = rotate_moe_block(block, adapter.moe, layer.get_submodule(norm), rotation.Q)
            importance = None
            if inputs is not None:
                progress.stage(i, "importance")
                importance = token_importance(layer, inputs, recipe)
            if recipe.awq:
                progress.stage(i, "awq")
                progress.note(i, len(layers), "awq " + ", ".join(awq_layer(layer, layer_adapter, inputs, importance, recipe, grid)))
            _round_unquantized(layer, layer_adapter, dtype)
            results = {}
            reuse = BlockReuse(layer, layer_adapter, inputs.storage) if inputs is not None else None
            for group in layer_adapter.sequential:
                modules = {name: layer.get_submodule(name) for name in group}
                hessians = {}
                owners = layer_adapter.input_owners(modules)
                if recipe.method == "gptq":
                    progress.stage(i, "hessians " + "/".join(n.split(".")[-1] for n in group))
                    hessians = _collect_hessians(layer, modules, inputs, importance, owners, reuse)
                for j, names in enumerate(_stacks(owners)):
                    started = time.perf_counter()
                    label = names[0] + "".join("/" + n.rsplit(".", 1)[-1] for n in names[1:])
                    rows = [modules[n].weight.data for n in names]
                    weight = torch.cat(rows) if len(rows) > 1 else rows[0]  # a lone Linear: no copy
                    q, loss = None, None
                    if world.owns(j):
                        q, loss = _quantize_weight(weight, hessians.get(names[0]), recipe, grid, f"layer {i} {label}")
                    q, loss = world.share(j % world.size, q, loss, weight)
                    for name, part in zip(names, q.split_rows([w.shape[0] for w in rows])):
                        # the exported values (dtype-rounded), so the next inputs are the exported model's
                        modules[name].weight.data = part.dequantize().to(dtype).to(weight.dtype)
                        results[name] = _compact(part)
                    progress.module(i, len(layers), label, time.perf_counter() - started, loss)
            if bank is not None:
                results.update(_quantize_moe(layer, block, bank, inputs, importance, recipe, grid, world, reuse,
                                             progress, i, len(layers), device, experts_sink))
            if inputs is not None:
                progress.stage(i, "outputs")
                inputs.hidden = _forward(layer, inputs, reuse)
                _check_finite(inputs.hidden, f"the outputs of layer {i}")
            layer.to("cpu", dtype)
            if bank is not None:
                bank.give_back(block)
            progress.layer_done(i)
            yield i, results
            _release(layer, dtype, weights)


def _round_unquantized(layer: nn.Module, adapter: Adapter, dtype: torch.dtype) -> None:
    """Round the parameters exported as they are (norms with folded AWQ scales, biases) to the
    checkpoint's ``dtype``: the walk then computes the next layer's inputs with exactly the
    exported model's values, as a resumed walk (which reads them back) does."""
    quantized = {f"{name}.weight" for name in adapter.linear_names()}
    for name, p in layer.named_parameters():
        if name not in quantized:
            p.data = p.data.to(dtype).to(p.dtype)


def _release(layer: nn.Module, dtype: torch.dtype, weights: WeightSource | None) -> None:
    """Offload a finished layer: back to CPU, or (streaming) back to meta, freeing its memory."""
    layer.to("meta" if weights is not None else "cpu", dtype)


@dataclass
class InputStats:
    """What a Linear reads over all calibration tokens (all data-parallel ranks): mean |x| [C]
    and the importance-weighted Hessian (2/N) Σ_t r_t x_t x_tᵀ."""

    absmean: torch.Tensor
    hessian: Hessian


def _observe_inputs(layer, modules: dict[str, nn.Module], inputs: LayerInputs, importance, record,
                    reuse: BlockReuse | None = None) -> None:
    """Call ``record(name, x [T, C], r [T] | None)`` with what each of ``modules`` reads, batch by
    batch; each forward stops as soon as every module has seen its input. ``reuse``: finished
    blocks are not recomputed, and the inputs of blocks' last Linears are kept for later forwards."""
    seen: set[str] = set()
    current = {}

    def make_hook(name):
        def hook(_module, args):
            if reuse is not None:
                reuse.record(name, args[0])
            record(name, args[0].reshape(-1, args[0].shape[-1]), current["r"])
            seen.add(name)
            if len(seen) == len(modules):
                raise _Captured

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    try:
        for b, x in enumerate(inputs.batches()):
            current["r"] = None if importance is None else importance[b].reshape(-1)
            seen.clear()
            try:
                with reuse.batch(b, inputs.device) if reuse else nullcontext():
                    layer(x, **inputs.kwargs)
            except _Captured:
                pass
        if reuse is not None:
            reuse.pass_done()
    finally:
        for h in handles:
            h.remove()


def _input_statistics(layer, modules: dict[str, nn.Module], inputs: LayerInputs, importance,
                      owners: dict[str, str] | None = None, reuse: BlockReuse | None = None) -> dict[str, InputStats]:
    """Accumulate each module's input statistics over all calibration batches, combined over ranks
    (float64 sums of per-batch float32 partials: independent of how batches are split).
    ``owners`` ({name: module reading the same input}, Adapter.input_owners): modules that share an
    input share one InputStats, accumulated once."""
    owners = owners or {name: name for name in modules}
    observed = {name: m for name, m in modules.items() if owners[name] == name}
    hessians = {name: Hessian(m.in_features, m.weight.device) for name, m in observed.items()}
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for name, m in observed.items()}

    def record(name, x, r):
        hessians[name].add_batch(x, r)
        sums[name] += x.float().abs().sum(0)

    _observe_inputs(layer, observed, inputs, importance, record, reuse)
    stats = {}
    for name, h in hessians.items():
        _combined(h, inputs.world)
        inputs.world.sum_(sums[name])
        stats[name] = InputStats((sums[name] / max(h.tokens, 1)).float(), h)
    return {name: stats[owners[name]] for name in modules}


def awq_layer(layer: nn.Module, adapter: Adapter, inputs: LayerInputs, importance, recipe: Recipe, grid) -> list[str]:
    """Search and fold AWQ scales for each group of Linears sharing an input, then (with
    ``recipe.awq_clip``) clip weight ranges. Returns one note per group (chosen α or why skipped)."""
    notes = []
    for previous_name, reader_names in adapter.awq_groups:
        previous = layer.get_submodule(previous_name)
        readers = {name: layer.get_submodule(name) for name in reader_names}
        first = next(iter(readers.values()))
        if isinstance(previous, nn.Linear) and previous.out_features != first.in_features:
            notes.append(f"{previous_name}→{reader_names[0]}: skipped (grouped-query attention)")
            continue
        stats = _input_statistics(layer, {reader_names[0]: first}, inputs, importance)[reader_names[0]]
        found = awq_scale_search(stats.hessian.value, stats.absmean, [m.weight for m in readers.values()], grid, recipe.awq_duo)
        scale_readers(previous, list(readers.values()), found.scales)
        notes.append(f"{'/'.join(n.split('.')[-1] for n in reader_names)} α={found.alpha:.2f}")
    if recipe.awq_clip:
        clipped = {n: layer.get_submodule(n) for n in adapter.linear_names() if n not in adapter.clip_skip}
        for name, stats in _input_statistics(layer, clipped, inputs, importance, adapter.input_owners(clipped)).items():
            w = clipped[name].weight
            shrink = awq_clip_search(stats.hessian.value, w.data, grid)
            w.data = apply_clip(w.data.float(), shrink, grid).to(w.dtype)
    return notes


def _collect_hessians(layer, modules: dict[str, nn.Module], inputs: LayerInputs, importance, owners: dict[str, str],
                      reuse: BlockReuse | None = None) -> dict[str, Hessian]:
    """Each module's importance-weighted input Hessian over all calibration batches (one per shared input)."""
    return {name: stats.hessian for name, stats in _input_statistics(layer, modules, inputs, importance, owners, reuse).items()}


def _stacks(owners: dict[str, str]) -> list[list[str]]:
    """Linears that read one input (q/k/v; gate/up) as one stack: they share H and act-order's
    column order, and GPTQ treats rows independently, so one solve over the stacked rows gives each
    Linear exactly its own result while running the per-column loop once."""
    stacks: dict[str, list[str]] = {}
    for name, owner in owners.items():
        stacks.setdefault(owner, []).append(name)
    return list(stacks.values())


def _quantize_weight(weight: torch.Tensor, hessian: Hessian | None, recipe: Recipe, grid, where: str):
    """weight [N, K] (one Linear or a stack) → (QuantizedWeight, GPTQ loss or None for RTN)."""
    if hessian is None:
        return rtn_quantize(weight, grid, recipe.clip_search), None
    H = hessian.value
    if not torch.isfinite(H).all():
        raise QuantkitError(f"NaN or Inf in the activations entering {where}")
    try:
        result = gptq_quantize(
            weight, H, grid, block_size=recipe.block_size, damp=recipe.damp, act_order=recipe.act_order,
            clip_search=recipe.clip_search,
        )
    except CholeskyError as e:
        raise QuantkitError(f"GPTQ failed on {where}: {e}; retry with a larger --damp (e.g. 0.1)") from None
    if result.damp != recipe.damp:
        warn(f"{where}: Hessian needed damping {result.damp:g} (asked {recipe.damp:g}) to be positive definite")
    return result.weight, result.loss


def _compact(q: QuantizedWeight) -> QuantizedWeight:
    """Move to CPU with integer codes/zeros as uint8 (what export packs; offset zeros stay float)."""
    return QuantizedWeight(
        q.codes.to("cpu", torch.uint8),
        q.scales.to("cpu", torch.float32),
        q.zeros.to("cpu", torch.float32 if q.offset else torch.uint8),
        q.g_idx.to("cpu"),
        q.bits,
        q.group_size,
        q.offset,
    )


# --- mixture of experts: the layer's MoE block after its attention is final -------------------------


@dataclass
class _Routed:
    """What one MoE block reads, per calibration batch: x [T, C] and importance r [T] (or None),
    with the router's choice for each token (weights [T, k], experts [T, k])."""

    x: list[torch.Tensor]
    r: list[torch.Tensor | None]
    weights: list[torch.Tensor]
    experts: list[torch.Tensor]
    shape: list[torch.Size]  # each batch's [b, L, C]


def _route_inputs(layer: nn.Module, block: nn.Module, spec, inputs: LayerInputs, importance,
                  reuse: BlockReuse | None) -> _Routed:
    """Run the layer up to its MoE block on every batch (finished attention reused) and route."""
    routed = _Routed([], [], [], [], [])
    router = block.get_submodule(spec.router)

    def hook(_module, args):
        x = args[0]
        routed.shape.append(x.shape)
        x = x.reshape(-1, x.shape[-1])
        weights, experts = route(router, x)
        routed.x.append(x.to(inputs.storage))
        routed.weights.append(weights.float())
        routed.experts.append(experts)
        raise _Captured

    handle = block.register_forward_pre_hook(hook)
    try:
        for b, x in enumerate(inputs.batches()):
            routed.r.append(None if importance is None else importance[b].reshape(-1))
            try:
                with reuse.batch(b, inputs.device) if reuse else nullcontext():
                    layer(x, **inputs.kwargs)
            except _Captured:
                pass
    finally:
        handle.remove()
    return routed


def _combined(h: Hessian, world: World) -> Hessian:
    """``h`` summed over the data-parallel ranks (sum and token count)."""
    world.sum_(h.sum)
    h.tokens = int(world.sum_(torch.tensor(h.tokens, dtype=torch.float64, device=h.sum.device)).item())
    return h


def _solve_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, stats: list[tuple[torch.Tensor, torch.Tensor | None]],
               recipe: Recipe, grid, world: World, owner: int, where: str, progress: LayerProgress, i: int, n: int):
    """GPTQ (or RTN) one gated MLP true-sequentially: gate/up [I, C] as one stack on H(x), then down
    [C, I] on H(act(gate_q x) ⊙ up_q x). ``stats``: the (x [T, C], r [T]) batches its statistics
    come from. Returns the quantized (gate, up, down), each solved on rank ``owner`` and shared."""
    solved = []
    for part, rows in (("gate/up", (gate, up)), ("down", (down,))):
        started = time.perf_counter()
        weight = torch.cat(rows) if len(rows) > 1 else rows[0]
        hessian = None
        if recipe.method == "gptq":
            hessian = Hessian(weight.shape[1], weight.device)
            gate_up = [w.dequantize() for w in solved]  # the quantized gate, up (for down's inputs)
            for x, r in stats:
                x = x.to(weight.device)
                hessian.add_batch(expert_hidden(x, *gate_up, act) if gate_up else x, r)
            hessian = _combined(hessian, world)
        q, loss = _quantize_weight(weight, hessian, recipe, grid, f"{where} {part}") if world.owns(owner) else (None, None)
        q, loss = world.share(owner % world.size, q, loss, weight)
        solved += q.split_rows([w.shape[0] for w in rows])
        progress.module(i, n, f"{where.split(' ', 2)[-1]} {part}", time.perf_counter() - started, loss)
    return solved


def _quantize_moe(layer: nn.Module, block: nn.Module, bank: ExpertBank, inputs: LayerInputs | None, importance,
                  recipe: Recipe, grid, world: World, reuse: BlockReuse | None, progress: LayerProgress, i: int, n: int,
                  device: torch.device, experts_sink=None) -> dict[str, QuantizedWeight]:
    """The MoE stage of layer ``i``: route the calibration tokens, solve each routed expert on the
    tokens the router sends it (fewer than MIN_EXPERT_TOKENS: on all tokens, see ``Coverage``), one
    expert on the device at a time, streaming each to ``experts_sink.add_experts``; then the shared
    expert on all tokens. The block's output (quantized experts, real routing) is left in ``reuse``
    for the layer's output pass. Returns the shared expert's results (module names)."""
    spec = bank.spec
    routed = _route_inputs(layer, block, spec, inputs, importance, reuse) if inputs is not None else None
    outputs = [torch.zeros(s, device=inputs.storage) for s in routed.shape] if routed else None
    if routed is not None:
        counts = torch.zeros(bank.count, dtype=torch.float64, device=inputs.device)
        for experts in routed.experts:
            counts += torch.bincount(experts.reshape(-1), minlength=bank.count).to(counts)
        coverage = Coverage([int(c) for c in world.sum_(counts).tolist()], MIN_EXPERT_TOKENS)
        if coverage.fallback:
            names = ", ".join(f"expert {e} ({coverage.tokens[e]} tokens)" for e in coverage.fallback)
            warn(f"layer {i}: {names} routed fewer than {MIN_EXPERT_TOKENS} calibration tokens: calibrated on all of "
                 "the layer's tokens instead (all-experts fallback)")
        if experts_sink is not None:
            experts_sink.add_coverage(i, coverage.summary())
    for e in range(bank.count):
        progress.stage(i, f"expert {e}/{bank.count}")
        gate, up, down = bank.get(e, device)
        picks, stats = [], []
        if routed is not None:
            picks = [torch.where(experts == e) for experts in routed.experts]  # (tokens, slots) per batch
            everything = e in coverage.fallback
            stats = [(x if everything else x[tokens.to(x.device)], r if everything or r is None else r[tokens])
                     for x, r, (tokens, _) in zip(routed.x, routed.r, picks)]
        q = _solve_mlp(gate, up, down, bank.act, stats, recipe, grid, world, e, f"layer {i} expert {e}", progress, i, n)
        gate, up, down = (part.dequantize().to(gate.dtype) for part in q)
        bank.put(e, gate, up, down)
        if experts_sink is not None:
            experts_sink.add_experts(i, e, dict(zip(spec.expert_names(e), map(_compact, q))))
        if routed is not None:
            _add_expert_output(outputs, routed, picks, gate, up, down, bank.act)
    results = {}
    if spec.shared is not None:
        shared = block.get_submodule(spec.shared)
        linears = [shared.gate_proj, shared.up_proj, shared.down_proj]
        stats = list(zip(routed.x, routed.r)) if routed is not None else []
        q = _solve_mlp(*(m.weight.data for m in linears), shared.act_fn, stats, recipe, grid, world, 0,
                       f"layer {i} {spec.block}.{spec.shared}", progress, i, n)
        for m, name, part in zip(linears, ("gate_proj", "up_proj", "down_proj"), q):
            m.weight.data = part.dequantize().to(m.weight.dtype)
            results[f"{spec.block}.{spec.shared}.{name}"] = _compact(part)
        if routed is not None:
            _add_shared_output(outputs, routed, block, spec, device)
    if outputs is not None:
        reuse.set_output(block, outputs)
    return results


def _add_expert_output(outputs: list[torch.Tensor], routed: _Routed, picks, gate, up, down, act) -> None:
    """outputs[b] [b, L, C] += routing weight × expert(x) for the tokens routed to this expert
    (``picks``: (tokens, slots) per batch, from torch.where(experts == e))."""
    for out, x, w, (tokens, slots) in zip(outputs, routed.x, routed.weights, picks):
        y = expert_mlp(x[tokens.to(x.device)].to(gate.device), gate, up, down, act) * w[tokens, slots, None]
        out.view(-1, out.shape[-1]).index_add_(0, tokens.to(out.device), y.to(out.device))


def _add_shared_output(outputs: list[torch.Tensor], routed: _Routed, block: nn.Module, spec, device) -> None:
    """outputs[b] += sigmoid(shared_gate(x)) × shared_expert(x) over all tokens (Qwen2-MoE)."""
    shared, shared_gate = block.get_submodule(spec.shared), block.get_submodule(spec.shared_gate)
    for out, x in zip(outputs, routed.x):
        x = x.to(device)
        out.view(-1, out.shape[-1]).add_((torch.sigmoid(shared_gate(x)) * shared(x)).to(out.device))


def _restored_forward(layer: nn.Module, block: nn.Module | None, adapter: Adapter, inputs: LayerInputs, prefix: str,
                      device: torch.device) -> list[torch.Tensor]:
    """The next layer's inputs from a layer restored from the export (--resume); an MoE block
    runs expert by expert, as when it was quantized."""
    if block is None:
        layer.to(device, torch.float32)
        return _forward(layer, inputs)
    reuse = BlockReuse(layer, adapter.for_layer(layer), inputs.storage)
    bank = ExpertBank.take(block, adapter.moe, prefix)
    layer.to(device, torch.float32)
    routed = _route_inputs(layer, block, adapter.moe, inputs, None, None)
    outputs = [torch.zeros(s, device=inputs.storage) for s in routed.shape]
    for e in range(bank.count):
        picks = [torch.where(experts == e) for experts in routed.experts]
        _add_expert_output(outputs, routed, picks, *bank.get(e, device), bank.act)
    if adapter.moe.shared is not None:
        _add_shared_output(outputs, routed, block, adapter.moe, device)
    reuse.set_output(block, outputs)
    hidden = _forward(layer, inputs, reuse)
    bank.give_back(block)
    return hidden
