"""The walk's MoE stage: a layer's sparse MoE block, solved after its attention is final. Routed
experts are solved one at a time on the tokens routed to them; the block's output (quantized
experts, real routing) is then fixed in ``BlockReuse`` for the layer's output pass."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.algos.gptq import Hessian
from quantkit.algos.quantizer import QuantizedWeight
from quantkit.distributed import World
from quantkit.methods import HESSIAN, Method
from quantkit.model import Adapter
from quantkit.moe import MIN_EXPERT_TOKENS, Coverage, ExpertBank, expert_hidden, expert_mlp, route
from quantkit.progress import LayerProgress, warn
from quantkit.walk.capture import BlockReuse, LayerInputs, _Captured, combined, layer_outputs, reusing
from quantkit.walk.layer import LayerContext, compact


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
                with reusing(reuse, b, inputs.device):
                    layer(x, **inputs.kwargs)
            except _Captured:
                pass
    finally:
        handle.remove()
    return routed


def _solve_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, stats: list[tuple[torch.Tensor, torch.Tensor | None]],
               ctx: LayerContext, solver: Method, world: World, owner: int, where: str, progress: LayerProgress, n: int):
    """Solve one gated MLP true-sequentially: gate/up [I, C] as one stack on H(x), then down
    [C, I] on H(act(gate_q x) ⊙ up_q x). ``stats``: the (x [T, C], r [T]) batches its statistics
    come from. Returns the quantized (gate, up, down), each solved on rank ``owner`` and shared."""
    solve = solver.load()
    solved = []
    for part, rows in (("gate/up", (gate, up)), ("down", (down,))):
        started = time.perf_counter()
        weight = torch.cat(rows) if len(rows) > 1 else rows[0]
        hessian = None
        if HESSIAN in solver.needs:
            hessian = Hessian(weight.shape[1], weight.device)
            gate_up = [w.dequantize() for w in solved]  # the quantized gate, up (for down's inputs)
            for x, r in stats:
                x = x.to(weight.device)
                hessian.add_batch(expert_hidden(x, *gate_up, act) if gate_up else x, r)
            hessian = combined(hessian, world)
        q, loss = solve(weight, hessian, ctx.recipe, ctx.grid, f"{where} {part}") if world.owns(owner) else (None, None)
        q, loss = world.share(owner % world.size, q, loss, weight)
        solved += q.split_rows([w.shape[0] for w in rows])
        progress.module(ctx.index, n, f"{where.split(' ', 2)[-1]} {part}", time.perf_counter() - started, loss)
    return solved


def _coverage(routed: _Routed, bank: ExpertBank, world: World, i: int, device: torch.device) -> Coverage:
    counts = torch.zeros(bank.count, dtype=torch.float64, device=device)
    for experts in routed.experts:
        counts += torch.bincount(experts.reshape(-1), minlength=bank.count).to(counts)
    coverage = Coverage([int(c) for c in world.sum_(counts).tolist()], MIN_EXPERT_TOKENS)
    if coverage.fallback:
        names = ", ".join(f"expert {e} ({coverage.tokens[e]} tokens)" for e in coverage.fallback)
        warn(f"layer {i}: {names} routed fewer than {MIN_EXPERT_TOKENS} calibration tokens: calibrated on all of "
             "the layer's tokens instead (all-experts fallback)")
    return coverage


def solve_moe_block(ctx: LayerContext, solver: Method, reuse: BlockReuse | None, progress: LayerProgress, n: int,
                    device: torch.device, experts_sink=None) -> dict[str, QuantizedWeight]:
    """The MoE stage of layer ``ctx.index``: route the calibration tokens, solve each routed expert on
    the tokens the router sends it (fewer than MIN_EXPERT_TOKENS: on all tokens, see ``Coverage``),
    one expert on the device at a time, streaming each to ``experts_sink.add_experts``; then the
    shared expert on all tokens. Returns the shared expert's results (module names)."""
    i, layer, block, bank, inputs = ctx.index, ctx.layer, ctx.block, ctx.bank, ctx.inputs
    spec = bank.spec
    world = ctx.world
    routed = _route_inputs(layer, block, spec, inputs, ctx.importance, reuse) if inputs is not None else None
    outputs = [torch.zeros(s, device=inputs.storage) for s in routed.shape] if routed else None
    if routed is not None:
        coverage = _coverage(routed, bank, world, i, inputs.device)
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
        q = _solve_mlp(gate, up, down, bank.act, stats, ctx, solver, world, e, f"layer {i} expert {e}", progress, n)
        gate, up, down = (part.dequantize().to(gate.dtype) for part in q)
        bank.put(e, gate, up, down)
        if experts_sink is not None:
            experts_sink.add_experts(i, e, dict(zip(spec.expert_names(e), map(compact, q))))
        if routed is not None:
            _add_expert_output(outputs, routed, picks, gate, up, down, bank.act)
    results = {}
    if spec.shared is not None:
        shared = block.get_submodule(spec.shared)
        linears = [shared.gate_proj, shared.up_proj, shared.down_proj]
        stats = list(zip(routed.x, routed.r)) if routed is not None else []
        q = _solve_mlp(*(m.weight.data for m in linears), shared.act_fn, stats, ctx, solver, world, 0,
                       f"layer {i} {spec.block}.{spec.shared}", progress, n)
        for m, name, part in zip(linears, ("gate_proj", "up_proj", "down_proj"), q):
            m.weight.data = part.dequantize().to(m.weight.dtype)
            results[f"{spec.block}.{spec.shared}.{name}"] = compact(part)
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


def restored_moe_outputs(layer: nn.Module, block: nn.Module, adapter: Adapter, inputs: LayerInputs, prefix: str,
                         device: torch.device) -> list[torch.Tensor]:
    """The next layer's inputs from an MoE layer restored from the export (--resume), run expert by
    expert as when it was quantized."""
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
    hidden = layer_outputs(layer, inputs, reuse)
    bank.give_back(block)
    return hidden
