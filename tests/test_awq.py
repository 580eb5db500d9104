"""AWQ: folding scales is exact, the search never loses to plain rounding, clip search."""

import pytest
import torch

from conftest import make_tiny_model
from quantkit.algos.awq import _weighted_output_error, apply_clip, awq_clip_search, awq_scale_search
from quantkit.algos.quantizer import Grid, rtn_quantize
from quantkit.fuse import scale_readers
from quantkit.model import adapter_for, load_model


def salient_problem(seed=0, t=512, c=128, o=96):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=gen)
    x[:, :4] *= 20  # a few salient input channels, as in LLM activations
    w = torch.randn(o, c, generator=gen) * 0.05
    return x, w


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_folding_scales_keeps_logits(tmp_path, model_type):
    folder = make_tiny_model(tmp_path / "m", model_type, hidden=64, num_key_value_heads=4)  # no GQA: v→o folds too
    model, _, _ = load_model(str(folder), dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(1)
    for layer in adapter.layers(model):
        for previous, readers in adapter.awq_groups:
            modules = [layer.get_submodule(n) for n in readers]
            s = torch.rand(modules[0].in_features, generator=gen, dtype=torch.float64) * 4 + 0.25
            scale_readers(layer.get_submodule(previous), modules, s)
    after = model(input_ids=ids).logits
    assert (after - before).abs().max().item() < 2e-6 * before.abs().max().item()


def test_alpha_zero_is_plain_quantization_and_search_never_loses():
    x, w = salient_problem()
    grid = Grid(3, 32, sym=False)
    found = awq_scale_search(x, [w[:48], w[48:]], grid)
    plain = _weighted_output_error(x, torch.ones(x.shape[0]), w, rtn_quantize(w, grid).dequantize())
    assert found.errors[0] == pytest.approx(plain, rel=1e-5)
    assert min(found.errors) <= found.errors[0]
    assert found.alpha > 0  # with salient channels, scaling must help
    assert found.errors[int(found.alpha * 20)] == min(found.errors)


def test_importance_changes_the_objective():
    x, w = salient_problem(1)
    grid = Grid(2, 32, sym=False)
    r = torch.full((x.shape[0],), 0.01)
    r[:16] = 10.0
    uniform = awq_scale_search(x, [w], grid)
    weighted = awq_scale_search(x, [w], grid, importance=r)
    assert uniform.errors != weighted.errors


def test_clip_search_never_worse_than_no_clip():
    x, w = salient_problem(2)
    w[0, 5] = 1.5  # an outlier weight that clipping should trim
    grid = Grid(3, 32, sym=True)
    shrink = awq_clip_search(x, w, grid)
    assert shrink.shape == (96, 4) and (shrink <= 1).all() and (shrink < 1).any()
    clipped = apply_clip(w, shrink, grid)
    r = torch.ones(x.shape[0])
    err_clip = _weighted_output_error(x, r, w, rtn_quantize(clipped, grid).dequantize())
    err_plain = _weighted_output_error(x, r, w, rtn_quantize(w, grid).dequantize())
    assert err_clip <= err_plain
