"""GPTQ solver on random layers: never worse than RTN under H, act-order consistency, damping."""

import pytest
import torch

from quantkit.algos.gptq import CholeskyError, Hessian, gptq_solve, gram, inverse_cholesky
from quantkit.algos.quantizer import Grid, round_to_nearest


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
    gptq = gptq_solve(w, H, grid, act_order=act_order)
    rtn = round_to_nearest(w, grid).dequantize()
    assert hessian_error(w, gptq.weight.dequantize(), H) <= hessian_error(w, rtn, H)


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_exported_weights_are_what_the_loop_used(group_size, act_order):
    """The loop's loss Σ err²/2 equals ½ tr((W − Q)(H + λI)(W − Q)ᵀ) for the Q it rounded to (the
    OBS error decomposition), so it must match the exported codes, scales and zeros; one wrong
    code shows."""
    w, H = random_problem(7)
    result = gptq_solve(w, H, Grid(3, group_size, False), act_order=act_order, block_size=48)
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
    result = gptq_solve(w, H, Grid(4, 64, True))
    assert torch.all(result.weight.dequantize()[:, 5] == 0)


def test_damping_increases_until_cholesky_succeeds():
    H = -torch.eye(16) + 0.5  # indefinite
    H += torch.eye(16) * 0.6
    U, damp = inverse_cholesky(H, 0.01)
    assert damp > 0.01 and torch.isfinite(U).all()
    with pytest.raises(CholeskyError):
        inverse_cholesky(-torch.eye(4), 0.01, retries=1)


# ---- fast paths against a straightforward implementation of the same math ----------------------

def reference_gptq(w, H, grid, block_size=128, damp=0.01, act_order=False):
    """GPTQ as the paper writes it, on Wᵀ as quantkit's solver always has (so that the lazy block
    update is the same matmul): per column quantize, err = (w − q) / d, rank-1 update of the rest
    of the block; one matmul for the later blocks. Returns (codes, scales, zeros, loss)."""
    W, H = w.float().clone(), H.float().clone()
    n, k = W.shape
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gsize = grid.width(k)
    scales, zeros = torch.zeros(n, k // gsize), torch.zeros(n, k // gsize)
    perm = torch.argsort(H.diag(), descending=True) if act_order else torch.arange(k)
    if act_order:
        for g in range(k // gsize):
            scales[:, g], zeros[:, g] = grid.fit(W[:, g * gsize : (g + 1) * gsize])
    Wt, H = W.t()[perm], H[perm][:, perm]
    Hinv, _ = inverse_cholesky(H, damp)
    codes, loss = torch.zeros(k, n), torch.zeros(n)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, Err1 = Wt[i1:i2].clone(), torch.zeros(i2 - i1, n)
        for i in range(i2 - i1):
            col = perm[i1 + i].item()
            g = col // gsize
            if not act_order and col % gsize == 0:
                scales[:, g], zeros[:, g] = grid.fit(torch.cat([W1[i:], Wt[i2:]])[:gsize].t())
            q = grid.quantize(W1[i][:, None], scales[:, g], zeros[:, g])[:, 0]
            codes[i1 + i] = q
            err = (W1[i] - scales[:, g] * (q - zeros[:, g])) / Hinv[i1 + i, i1 + i]
            loss += err.square() / 2
            W1[i:] -= Hinv[i1 + i, i1 + i : i2, None] * err[None, :]
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1
    return codes[torch.argsort(perm)].t(), scales, zeros, loss.sum().item()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,group_size,sym", [(2, 64, False), (3, 32, True), (4, -1, True), (4, 128, False)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [128, 48])
def test_solver_matches_the_reference_bit_for_bit(seed, bits, group_size, sym, act_order, block_size):
    """The same codes, scales and zeros as the paper's loop; the loss (summed per block, not per
    column) to 1e-6. Blocks of 48 cut groups of 32 and 64 mid-block."""
    w, H = random_problem(seed)
    grid = Grid(bits, group_size, sym)
    codes, scales, zeros, loss = reference_gptq(w, H, grid, block_size, act_order=act_order)
    fast = gptq_solve(w, H, grid, block_size=block_size, act_order=act_order)
    assert torch.equal(fast.weight.codes.float(), codes)
    assert torch.equal(fast.weight.scales, scales) and torch.equal(fast.weight.zeros, zeros)
    assert fast.loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_solver_matches_the_reference_on_a_real_layer_shape(act_order):
    """SmolLM2's q/k/v stack (960×576, W3 g64 asym): 553k codes, none different."""
    w, H = random_problem(0, n=960, k=576, tokens=2048)
    grid = Grid(3, 64, False)
    codes, scales, zeros, _ = reference_gptq(w, H, grid, act_order=act_order)
    fast = gptq_solve(w, H, grid, act_order=act_order)
    assert torch.equal(fast.weight.codes.float(), codes) and torch.equal(fast.weight.scales, scales)


@pytest.mark.parametrize("k,leaf", [(256, 192), (577, 64), (1000, 96), (40, 192)])
def test_gram_is_the_full_matmul_bit_for_bit(k, leaf):
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(k))
    g = gram(x, leaf)
    assert torch.equal(g, x.t() @ x)
    assert torch.equal(g, g.t())
