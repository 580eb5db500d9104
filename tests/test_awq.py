"""AWQ: folding scales is exact, the search never loses to plain rounding, clip search."""

import pytest
import torch

from conftest import make_tiny_model
from quantkit.algos.awq import apply_clip, awq_clip_search, awq_scale_search, output_error
from quantkit.algos.gptq import Hessian
from quantkit.algos.quantizer import Grid, round_to_nearest
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


def hessian(x, r=None):
    h = Hessian(x.shape[1])
    h.add_batch(x, r)
    return h.value


def token_error(x, r, W, W_hat):
    """The objective written over tokens: Σ_t r_t ‖x_t (W − Ŵ)ᵀ‖² / T."""
    return ((x.double() @ (W - W_hat).double().t()).square().sum(1) * r.double()).sum().item() / x.shape[0]


def test_output_error_is_the_weighted_token_error():
    x, w = salient_problem()
    r = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(3)) * 2
    w_hat = round_to_nearest(w, Grid(3, 32, sym=False)).dequantize()
    assert output_error(hessian(x, r), w, w_hat) == pytest.approx(token_error(x, r, w, w_hat), rel=1e-4)


def test_alpha_zero_is_plain_quantization_and_search_never_loses():
    x, w = salient_problem()
    grid = Grid(3, 32, sym=False)
    H = hessian(x)
    found = awq_scale_search(H, x.abs().mean(0), [w[:48], w[48:]], grid)
    plain = output_error(H, w, round_to_nearest(w, grid).dequantize())
    assert found.errors[0.0] == pytest.approx(plain, rel=1e-5)
    assert min(found.errors.values()) <= found.errors[0.0]
    assert found.alpha > 0  # with salient channels, scaling must help
    assert found.errors[found.alpha] == min(found.errors.values())
    chosen = round_to_nearest(w * found.scales, grid).dequantize() / found.scales
    assert token_error(x, torch.ones(x.shape[0]), w, chosen) < token_error(x, torch.ones(x.shape[0]), w, round_to_nearest(w, grid).dequantize())


def test_full_grid_tries_every_alpha_and_keeps_the_best():
    x, w = salient_problem(5)
    grid = Grid(3, 32, sym=False)
    H = hessian(x)
    full = awq_scale_search(H, x.abs().mean(0), [w], grid)
    assert list(full.errors) == [i / 20 for i in range(20)]
    assert full.alpha == min(full.errors, key=full.errors.get)
    # each error is the output error of that α's scales, written out
    for alpha in (0.0, full.alpha, 0.95):
        s = x.abs().mean(0).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        w_hat = round_to_nearest(w * s, grid).dequantize() / s
        assert full.errors[alpha] == pytest.approx(output_error(H, w, w_hat), rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits,duo", [(3, False), (4, False), (2, True)])
def test_coarse_to_fine_picks_the_full_grids_alpha(seed, bits, duo):
    """Every α the coarse search tries has the full grid's error, and on these smooth error curves
    its choice is the full grid's, with at most 12 of the 20 evaluations."""
    x, w = salient_problem(seed)
    x[:, 4:12] *= 1 + seed  # vary how salient the channels are, so the best α moves
    grid = Grid(bits, 32, sym=False)
    H = hessian(x)
    full = awq_scale_search(H, x.abs().mean(0), [w], grid, duo, coarse=1)
    fast = awq_scale_search(H, x.abs().mean(0), [w], grid, duo, coarse=4)
    assert len(fast.errors) <= 12
    assert all(full.errors[a] == e for a, e in fast.errors.items())
    assert fast.alpha == full.alpha and torch.equal(fast.scales, full.scales)


def test_importance_weighted_search_serves_the_important_tokens():
    """With 16 tokens weighted 1000× the rest, the weighted search picks another α, whose scales cut
    the weighted token error by ≥ 4% against the uniform search's (measured 5.1%), while the uniform
    search's scales stay the better ones for the unweighted error (each wins its own objective)."""
    x, w = salient_problem(1)
    grid = Grid(2, 32, sym=False)
    r = torch.full((x.shape[0],), 0.01)
    r[:16] = 10.0
    uniform = awq_scale_search(hessian(x), x.abs().mean(0), [w], grid)
    weighted = awq_scale_search(hessian(x, r), x.abs().mean(0), [w], grid)
    assert weighted.alpha != uniform.alpha

    def error(found, weights):
        return token_error(x, weights, w, round_to_nearest(w * found.scales, grid).dequantize() / found.scales)

    assert error(weighted, r) < 0.96 * error(uniform, r)
    ones = torch.ones(x.shape[0])
    assert error(uniform, ones) < error(weighted, ones)


def test_clip_search_never_worse_than_no_clip():
    x, w = salient_problem(2)
    w[0, 5] = 1.5  # an outlier weight that clipping should trim
    grid = Grid(3, 32, sym=True)
    shrink = awq_clip_search(hessian(x), w, grid)
    assert shrink.shape == (96, 4) and (shrink <= 1).all() and (shrink < 1).any()
    clipped = apply_clip(w, shrink, grid)
    r = torch.ones(x.shape[0])
    err_clip = token_error(x, r, w, round_to_nearest(clipped, grid).dequantize())
    err_plain = token_error(x, r, w, round_to_nearest(w, grid).dequantize())
    assert err_clip <= err_plain


def test_clip_search_picks_the_best_shrink_of_each_group():
    """Brute force over the grid for each (row, group), objective written over tokens."""
    x, w = salient_problem(4, o=8)
    grid = Grid(3, 32, sym=False)
    shrink = awq_clip_search(hessian(x), w, grid)
    for row in range(8):
        for j in range(4):
            xs, ws = x[:, j * 32 : (j + 1) * 32], w[row : row + 1, j * 32 : (j + 1) * 32]
            errs = []
            for c in (1 - i / 20 for i in range(10)):
                scale, zero = grid.fit(ws, c)
                errs.append(token_error(xs, torch.ones(x.shape[0]), ws, grid.fake_quantize(ws, scale, zero)))
            best = min(errs)
            picked = errs[round((1 - shrink[row, j].item()) * 20)]
            assert picked <= best * (1 + 1e-4)
