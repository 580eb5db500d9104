"""The layer walk: reusing finished blocks' inputs and solving Linears that share an input as one
stack change nothing but the time taken; unit token importance is plain GPTQ, bit for bit."""

import dataclasses

import pytest
import torch

import quantkit.methods.solvers
import quantkit.walk

from conftest import make_tiny_model
from quantkit.model import load_model
from quantkit.walk import walk_layers
from quantkit.recipe import Recipe


def walk(folder, reusable: bool, recipe: Recipe):
    model, _, adapter = load_model(str(folder), torch.float32)
    if not reusable:
        adapter = dataclasses.replace(adapter, reusable=())
    calls = []
    for layer in model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, model.config.vocab_size, (6, 48), generator=torch.Generator().manual_seed(0))
    # batch_tokens 96 = 2 windows per forward: 3 batches, so reuse must pick the right batch
    results = dict(walk_layers(model, adapter, tokens, recipe, torch.device("cpu"), show_progress=False,
                                batch_tokens=96))
    return results, model, len(calls)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("importance", ["uniform", "attncon"])
def test_reusing_block_inputs_gives_the_same_quantization(tmp_path, model_type, importance):
    folder = make_tiny_model(tmp_path / model_type, model_type, layers=3, hidden=64)
    rsq = importance == "attncon"
    recipe = Recipe(bits=3, group_size=32, sym=False, importance=importance, rotate=rsq, awq=rsq)
    fast, fast_model, fast_calls = walk(folder, True, recipe)
    slow, slow_model, slow_calls = walk(folder, False, recipe)
    # per layer and batch: gate/up run for the down_proj inputs and the outputs, or only for the former
    # (plus once for AWQ's down_proj statistics, before anything is final)
    assert (slow_calls, fast_calls) == (3 * 3 * (2 + rsq), 3 * 3 * (1 + rsq))
    assert fast.keys() == slow.keys() == {0, 1, 2}
    for i in fast:
        for name, q in fast[i].items():
            assert torch.equal(q.codes, slow[i][name].codes), (i, name)
            assert torch.equal(q.scales, slow[i][name].scales), (i, name)
    # the forwards ran with the reused blocks: the model's final state is identical too
    for (name, a), (_, b) in zip(fast_model.state_dict().items(), slow_model.state_dict().items()):
        assert torch.equal(a, b), name
    # and the blocks are back to their own forward afterwards
    for layer in fast_model.model.layers:
        assert "forward" not in vars(layer.self_attn) and "forward" not in vars(layer.mlp)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_stacked_solves_give_each_linear_its_own_result(tmp_path, monkeypatch, model_type):
    folder = make_tiny_model(tmp_path / model_type, model_type, layers=2, hidden=64)
    recipe = Recipe(bits=3, group_size=32, sym=False, awq=False)
    solved = []
    solve = quantkit.methods.solvers.gptq_solve
    monkeypatch.setattr(quantkit.methods.solvers, "gptq_solve", lambda w, *a, **k: solved.append(w.shape[0]) or solve(w, *a, **k))
    stacked, _, _ = walk(folder, True, recipe)
    stacked_rows = list(solved)
    solved.clear()
    monkeypatch.setattr(quantkit.walk, "_stacks", lambda owners: [[name] for name in owners])
    apart, _, _ = walk(folder, True, recipe)
    config = load_model(str(folder), torch.float32)[0].config
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    assert stacked_rows == 2 * [hidden + 2 * kv, hidden, 2 * inter, hidden]  # q/k/v, o, gate/up, down
    assert solved == 2 * [hidden, kv, kv, hidden, inter, inter, hidden]
    for i in stacked:
        assert stacked[i].keys() == apart[i].keys()
        for name, q in stacked[i].items():
            assert torch.equal(q.codes, apart[i][name].codes), (i, name)
            assert torch.equal(q.scales, apart[i][name].scales), (i, name)
            assert torch.equal(q.zeros, apart[i][name].zeros), (i, name)


@pytest.mark.parametrize("importance", ["attncon", "actnorm", "first-last", "actdiff"])
def test_unit_importance_reproduces_plain_gptq_bit_for_bit(tmp_path, importance):
    """Every importance mapped to the range [1, 1] weighs each token by exactly 1: the weighted
    Hessian path must then give plain (uniform) GPTQ's codes and scales, bit for bit."""
    folder = make_tiny_model(tmp_path / "llama", "llama", layers=2, hidden=64)
    plain, _, _ = walk(folder, True, Recipe(bits=3, group_size=32, sym=False, importance="uniform", awq=False))
    weighted, _, _ = walk(folder, True, Recipe(bits=3, group_size=32, sym=False, importance=importance,
                                               importance_min=1.0, importance_max=1.0, awq=False))
    spread, _, _ = walk(folder, True, Recipe(bits=3, group_size=32, sym=False, importance=importance, awq=False))
    for i in plain:
        for name, q in plain[i].items():
            assert torch.equal(q.codes, weighted[i][name].codes) and torch.equal(q.scales, weighted[i][name].scales)
    # and the check can fail: with the default range the same walk differs somewhere
    assert any(not torch.equal(q.codes, spread[i][name].codes) for i in plain for name, q in plain[i].items())
