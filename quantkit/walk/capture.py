"""What the walk records from a layer's forwards: the calibration activations entering each decoder
layer (``LayerInputs``), each Linear's input statistics (``InputStats``), post-RoPE q/k, and the
reuse of finished blocks (``BlockReuse``). Forwards are cut short (``_Captured``) as soon as a hook
has what it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from transformers import AttentionInterface

from quantkit.algos.gptq import Hessian
from quantkit.distributed import World
from quantkit.errors import QuantkitError
from quantkit.model import Adapter


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
class InputStats:
    """What a Linear reads over all calibration tokens (all data-parallel ranks): mean |x| [C]
    and the importance-weighted Hessian (2/N) Σ_t r_t x_t x_tᵀ."""

    absmean: torch.Tensor
    hessian: Hessian


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


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
                adapter.decoder(model)(input_ids=tokens[start : start + batch].to(device), use_cache=False)
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


def reusing(reuse: BlockReuse | None, b: int, device: torch.device):
    """``reuse.batch(b, device)``, or nothing without reuse."""
    return reuse.batch(b, device) if reuse is not None else nullcontext()


def layer_outputs(layer: nn.Module, inputs: LayerInputs, reuse: BlockReuse | None = None) -> list[torch.Tensor]:
    """The layer's hidden-state output [b, L, C] for every batch, kept on ``inputs.storage``."""
    outputs = []
    for b, x in enumerate(inputs.batches()):
        with reusing(reuse, b, inputs.device):
            out = layer(x, **inputs.kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).to(inputs.storage))
    return outputs


def check_finite(tensors: list[torch.Tensor], what: str) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise QuantkitError(f"NaN or Inf in {what}: the checkpoint or calibration produced non-finite values")


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function registered with transformers: records post-RoPE q, k and stops the forward."""
    module._quantkit_qk = (query, key, attention_mask, scaling)
    raise _Captured


AttentionInterface.register("quantkit_capture", _capture_attention)


def capture_qk(layer: nn.Module, adapter: Adapter, x: torch.Tensor, kwargs: dict):
    """Run ``layer`` on x up to its attention function: (q [b, Hq, L, D], k [b, Hkv, L, D] post-RoPE,
    the attention mask or None, the softmax scaling)."""
    attn = adapter.attention(layer)
    with adapter.attention_function(layer, "quantkit_capture"):
        try:
            layer(x, **kwargs)
        except _Captured:
            pass
    q, k, mask, scaling = attn.__dict__.pop("_quantkit_qk")
    return q, k, mask, scaling if scaling is not None else attn.scaling


def observe_inputs(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs, importance,
                   record: Callable, reuse: BlockReuse | None = None) -> None:
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
                with reusing(reuse, b, inputs.device):
                    layer(x, **inputs.kwargs)
            except _Captured:
                pass
        if reuse is not None:
            reuse.pass_done()
    finally:
        for h in handles:
            h.remove()


def combined(h: Hessian, world: World) -> Hessian:
    """``h`` summed over the data-parallel ranks (sum and token count)."""
    world.sum_(h.sum)
    h.tokens = int(world.sum_(torch.tensor(h.tokens, dtype=torch.float64, device=h.sum.device)).item())
    return h


def input_statistics(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs, importance,
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

    observe_inputs(layer, observed, inputs, importance, record, reuse)
    stats = {}
    for name, h in hessians.items():
        combined(h, inputs.world)
        inputs.world.sum_(sums[name])
        stats[name] = InputStats((sums[name] / max(h.tokens, 1)).float(), h)
    return {name: stats[owners[name]] for name in modules}
