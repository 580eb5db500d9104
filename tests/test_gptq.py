"""GPTQ solver on random layers: never worse than RTN under H, act-order consistency, damping."""

import pytest
import torch

from quantkit.algos.gptq import CholeskyError, Hessian, gptq_quantize, inverse_cholesky
from quantkit.algos.quantizer import Grid, rtn_quantize


def hessian_error(w, q, H):
    d = w - q
    return torch.trace(d @ H @ d.t()).item()


def random_problem(seed, n=64, k=256, tokens=512):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scales = torch.rand(k, generator=gen) * 3 + 0.1  # uneven channel magnitudes, as in LLMs
    x = torch.randn(tokens, k, generator=gen) @ torch.randn(k, k, generator=gen) * 0.2 * scales
    h = Hessian(k)
    h.add_batch(x)
    return w, h.value


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,group_size,sym", [(2, 64, False), (3, 32, True), (4, -1, True), (4, 128, False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_never_above_rtn(seed, bits, group_size, sym, act_order):
    w, H = random_problem(seed)
    grid = Grid(bits, group_size, sym)
    gptq = gptq_quantize(w, H, grid, act_order=act_order)
    rtn = rtn_quantize(w, grid).dequantize()
    assert hessian_error(w, gptq.weight.dequantize(), H) <= hessian_error(w, rtn, H)


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_exported_weights_are_what_the_loop_used(group_size, act_order):
    """The loop's loss Σ err²/2 equals ½ tr((W − Q)(H + λI)(W − Q)ᵀ) for the Q it rounded to (the
    OBS error decomposition), so it must match the exported codes, scales and zeros; one wrong
    code shows."""
    w, H = random_problem(7)
    result = gptq_quantize(w, H, Grid(3, group_size, False), act_order=act_order, block_size=48)
    damped = H + result.damp * H.diag().mean() * torch.eye(H.shape[0])
    q = result.weight.dequantize()
    assert result.loss == pytest.approx(hessian_error(w.double(), q.double(), damped.double()) / 2, rel=1e-5)
    q[3, 17] += result.weight.scales[3, result.weight.g_idx[17]]
    assert result.loss != pytest.approx(hessian_error(w.double(), q.double(), damped.double()) / 2, rel=1e-5)
    width = w.shape[1] if group_size == -1 else group_size
    assert torch.equal(result.weight.g_idx.long(), torch.arange(w.shape[1]) // width)


def test_hessian_weights_tokens():
    x = torch.randn(10, 8)
    r = torch.rand(10)
    h = Hessian(8)
    h.add_batch(x, r)
    expected = 2 / 10 * sum(r[t] * torch.outer(x[t], x[t]) for t in range(10))
    assert torch.allclose(h.value, expected, atol=1e-5)


def test_dead_columns_are_zeroed():
    w, H = random_problem(1)
    H[5, :] = 0
    H[:, 5] = 0
    result = gptq_quantize(w, H, Grid(4, 64, True))
    assert torch.all(result.weight.dequantize()[:, 5] == 0)


def test_damping_increases_until_cholesky_succeeds():
    H = -torch.eye(16) + 0.5  # indefinite
    H += torch.eye(16) * 0.6
    U, damp = inverse_cholesky(H, 0.01)
    assert damp > 0.01 and torch.isfinite(U).all()
    with pytest.raises(CholeskyError):
        inverse_cholesky(-torch.eye(4), 0.01, retries=1)
