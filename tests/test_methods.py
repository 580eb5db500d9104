"""The methods table is the one list of transforms, solvers and importance strategies: the recipe,
the CLI and the model card read it, and a method registered in it (here a block-wise one, from
this test) is run by the walk with what it asked for."""

import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_model
from quantkit import methods
from quantkit.algos.quantizer import QuantizedWeight
from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.export.card import recipe_label
from quantkit.methods.solvers import rtn_stack
from quantkit.model import load_model
from quantkit.recipe import Recipe
from quantkit.walk import walk_layers
from quantkit.walk.capture import layer_outputs


def test_recipe_and_cli_take_their_names_from_the_table():
    with pytest.raises(QuantkitError, match="--importance nope: choose one of uniform, attncon, actnorm, first-last, actdiff"):
        Recipe(importance="nope")
    with pytest.raises(QuantkitError, match="--method nope: choose one of rtn, gptq"):
        Recipe(method="nope")
    help_text = CliRunner().invoke(cli, ["quantize", "--help"], terminal_width=400).output
    for name in methods.names("importance") + methods.names("solver"):
        assert name in help_text


def test_a_registered_strategy_is_valid_everywhere_and_labelled_on_the_card():
    method = methods.Method("importance", "probe", "probe-label", "a test strategy", frozenset({methods.INPUTS}),
                            entry="quantkit.methods.importance:activation_norm")
    methods.register(method)
    try:
        recipe = Recipe(importance="probe")
        assert "probe-label importance" in recipe_label(recipe)
        assert methods.plan(recipe).importance is method
    finally:
        methods.unregister("importance", "probe")
    with pytest.raises(QuantkitError, match="--importance probe"):
        Recipe(importance="probe")
    with pytest.raises(ValueError, match="needs"):
        methods.Method("importance", "bad", "bad", "", frozenset({"telepathy"}))


# --- a block-wise method: FP outputs and gradients -----------------------------------------------------

SEEN = {}


def _output(layer, x, kwargs, **weights):
    out = torch.func.functional_call(layer, weights, (x,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def least_squares_down(ctx) -> dict[str, QuantizedWeight]:
    """RTN every Linear of the layer, then fit a multiplier per output row of down_proj's quantized
    weight (its per-row scales) by gradient descent so that the layer's outputs match its FP outputs."""
    SEEN.setdefault("grad", []).append(torch.is_grad_enabled())
    SEEN.setdefault("fp", []).append([y.clone() for y in ctx.fp_outputs])
    results = {}
    for name in ctx.adapter.linear_names():
        linear = ctx.layer.get_submodule(name)
        results[name], _ = rtn_stack(linear.weight.data, None, ctx.recipe, ctx.grid, name)
        linear.weight.data = results[name].dequantize()
    base = ctx.layer.mlp.down_proj.weight.detach().clone()
    c = torch.ones(base.shape[0], requires_grad=True)
    optimizer = torch.optim.LBFGS([c], lr=1, max_iter=50, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        total = sum((_output(ctx.layer, x, ctx.inputs.kwargs, **{"mlp.down_proj.weight": c[:, None] * base}) - y).square().sum()
                    for x, y in zip(ctx.inputs.batches(), ctx.fp_outputs))
        total.backward()
        return total

    optimizer.step(loss)
    q = results["mlp.down_proj"]
    results["mlp.down_proj"] = QuantizedWeight(q.codes, q.scales * c.detach()[:, None], q.zeros, q.g_idx, q.bits,
                                               q.group_size, q.offset)
    SEEN.setdefault("c", []).append(c.detach().clone())
    return results


@pytest.fixture
def block_wise():
    method = methods.register(methods.Method(
        "solver", "lsq-down", "LSQ-down", "test: RTN, then down_proj's row scales fitted to the FP outputs",
        frozenset({methods.FP_OUTPUTS, methods.GRADIENTS}), scope="layer", entry=f"{__name__}:least_squares_down"))
    SEEN.clear()
    yield method
    methods.unregister("solver", "lsq-down")


def test_a_block_wise_method_gets_fp_outputs_and_gradients(tmp_path, block_wise):
    folder = make_tiny_model(tmp_path / "llama", "llama", layers=2, hidden=64)
    model, _, adapter = load_model(str(folder), torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(bits=3, group_size=32, sym=False, method="lsq-down")
    assert recipe.needs_calibration and not recipe.awq and recipe.importance == "uniform"

    # what the walk should offer layer 0: its FP outputs on the embeddings; and what plain RTN gives
    reference, _, _ = load_model(str(folder), torch.float32)
    first = reference.model.layers[0]
    seen = {}
    handle = first.register_forward_pre_hook(lambda _m, a, k: seen.update(x=(a[0] if a else k["hidden_states"]), kwargs=k),
                                             with_kwargs=True)
    with torch.no_grad():
        reference(input_ids=tokens, use_cache=False)
    handle.remove()
    x, kwargs = seen["x"], {k: v for k, v in seen["kwargs"].items() if k != "hidden_states"}
    with torch.no_grad():
        fp = _output(first, x, kwargs)
        rtn_down = rtn_stack(first.mlp.down_proj.weight.data, None, recipe, recipe.grid, "down")[0]
        for name in adapter.linear_names():
            linear = first.get_submodule(name)
            linear.weight.data = rtn_stack(linear.weight.data, None, recipe, recipe.grid, name)[0].dequantize()
        rtn_error = (_output(first, x, kwargs) - fp).square().sum().item()

    results = dict(walk_layers(model, adapter, tokens, recipe, torch.device("cpu"), show_progress=False))
    assert SEEN["grad"] == [True, True]
    assert torch.equal(torch.cat(SEEN["fp"][0]), fp)
    layer = model.model.layers[0].float()
    with torch.no_grad():
        fitted_error = (_output(layer, x, kwargs) - fp).square().sum().item()
        # the least-squares multipliers in closed form: y = rest + c ⊙ (down z), per output row
        z = {}
        h = layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: z.update(z=a[0]))
        out = _output(layer, x, kwargs)
        h.remove()
        down = z["z"] @ layer.mlp.down_proj.weight.t() / SEEN["c"][0]  # the RTN down_proj's contribution
        rest = out - down * SEEN["c"][0]
        closed = ((fp - rest) * down).sum((0, 1)) / down.square().sum((0, 1))
    assert fitted_error < 0.99 * rtn_error  # c = 1 (plain RTN) is one of the candidates
    torch.testing.assert_close(SEEN["c"][0], closed, rtol=1e-4, atol=1e-5)
    exported = results[0]["mlp.down_proj"]  # the fitted multipliers are the exported row scales' factors
    assert torch.equal(exported.codes, rtn_down.codes.to(torch.uint8))
    torch.testing.assert_close(exported.scales, rtn_down.scales * SEEN["c"][0][:, None], rtol=0, atol=0)
    assert set(results[0]) == set(adapter.linear_names())


def test_the_walk_computes_fp_outputs_only_when_asked(tmp_path, monkeypatch):
    folder = make_tiny_model(tmp_path / "llama", "llama", layers=1, hidden=64)
    model, _, adapter = load_model(str(folder), torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    import quantkit.walk

    monkeypatch.setattr(quantkit.walk, "layer_outputs", lambda *a: calls.append(len(a)) or layer_outputs(*a))
    list(walk_layers(model, adapter, tokens, Recipe(bits=4, group_size=32), torch.device("cpu"), show_progress=False))
    assert calls == [3]  # the output pass only (layer, inputs, reuse)


def test_actdiff_scores_how_much_the_fp_layer_changes_each_token(tmp_path, monkeypatch):
    """One module and one table entry: the walk offers the FP outputs it asks for."""
    import quantkit.methods.actdiff

    folder = make_tiny_model(tmp_path / "llama", "llama", layers=2, hidden=64)
    model, _, adapter = load_model(str(folder), torch.float32)
    reference, _, _ = load_model(str(folder), torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    scores = []
    score = quantkit.methods.actdiff.activation_difference
    monkeypatch.setattr(quantkit.methods.actdiff, "activation_difference", lambda b: scores.append(score(b)) or scores[-1])
    recipe = Recipe(bits=3, group_size=32, sym=False, importance="actdiff", awq=False)
    list(walk_layers(model, adapter, tokens, recipe, torch.device("cpu"), show_progress=False, batch_tokens=64))
    assert len(scores) == 2 * 2  # two layers, two batches of two windows
    seen = {}
    layer = reference.model.layers[0]
    handle = layer.register_forward_hook(lambda _m, a, out: seen.update(x=a[0], y=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        reference(input_ids=tokens, use_cache=False)
    handle.remove()
    torch.testing.assert_close(torch.cat(scores[:2]), (seen["y"] - seen["x"]).norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_a_block_wise_method_refuses_moe_layers(tiny_moe, block_wise):
    model, _, adapter = load_model(str(tiny_moe("mixtral")), torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for recipe, name in ((Recipe(method="lsq-down"), "solver lsq-down"), (Recipe(importance="actdiff"), "importance actdiff")):
        with pytest.raises(QuantkitError, match=f"layer 0 is a mixture of experts: {name} needs the whole FP layer"):
            list(walk_layers(model, adapter, tokens, recipe, torch.device("cpu"), show_progress=False))
