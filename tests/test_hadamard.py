import math

import pytest
import torch

from quantkit.algos.hadamard import (
    _factors,
    _paley,
    _prime_power,
    _quadratic_character,
    hadamard,
    hadamard_orders,
    random_orthogonal,
)

COMMON_WIDTHS = [
    64, 128, 576, 768, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 8192, 11008, 13824, 14336, 18944
]
ORDERS = hadamard_orders(16384)


def _along_every_axis(transform, x):
    """fftn/ifftn over (Z_p)^k done axis by axis (MKL rejects fftn above rank 7)."""
    for axis in range(x.dim()):
        x = transform(x, dim=axis)
    return x


def test_small_orders_exact():
    """Every claimed order ≤ 512, built in full: ±1 entries and H Hᵀ = n I exactly (float32
    sums of ±1 are exact up to 2^24). Covers both Paley kinds over prime and prime-power fields."""
    small = [n for n in ORDERS if n <= 512]
    blocks = {_paley(m) for n in small for m in _factors(n) if m > 2}
    assert {(27, 1), (243, 1), (343, 1), (25, 2), (49, 2), (169, 2)} <= blocks
    for n in small:
        h = hadamard(n)
        assert h.dtype == torch.float64 and h.abs().eq(1).all()
        h = h.float()
        assert torch.equal(h @ h.T, n * torch.eye(n)), n


def test_every_claimed_order_up_to_16384():
    """Every claimed order (and common width) is a Kronecker product of Sylvester and Paley
    blocks, and H_a ⊗ H_b is Hadamard when both factors are. A Paley block over GF(q) is Hadamard
    iff its Jacobsthal matrix Q[a, b] = χ(a − b) has zero row sums and Q Qᵀ = q I − J, i.e. iff
    Σ χ = 0 and χ's autocorrelation over (Z_p)^k is q − 1 at 0 and −1 elsewhere; and Q must be
    skew (Paley I) or symmetric (Paley II), i.e. χ(−1) = −1 or 1. Checked exactly (FFT) for every
    block used; ``test_small_orders_exact`` covers assembling blocks from χ."""
    assert len(ORDERS) > 2000
    blocks = set()
    for n in ORDERS + COMMON_WIDTHS:
        assert math.prod(_factors(n)) == n
        blocks.update(_factors(n))
    for m in sorted(blocks - {2}):
        q, kind = _paley(m)
        p, k = _prime_power(q)
        chi = _quadratic_character(q).double()
        assert chi.sum() == 0 and chi[p - 1] == (-1 if kind == 1 else 1), q
        spectrum = _along_every_axis(torch.fft.fft, chi.reshape((p,) * k))  # one axis per digit
        autocorr = _along_every_axis(torch.fft.ifft, spectrum.abs() ** 2).real.flatten()
        expected = torch.full((q,), -1.0, dtype=torch.float64)
        expected[0] = q - 1
        assert torch.allclose(autocorr, expected, rtol=0, atol=1e-6), q


@pytest.mark.parametrize("n", [576, 768, 2560, 3584, 4096, 11008])
def test_large_orders_freivalds(n):
    """End to end on common widths (one per kind of block): H (Hᵀ V) = n V for 16 random ±1
    probes V, so a wrong Gram matrix survives with probability ≤ 2^-16. Exact in float64
    (integers below n² < 2^53)."""
    h = hadamard(n)
    v = torch.randint(0, 2, (n, 16), generator=torch.Generator().manual_seed(n)).double() * 2 - 1
    assert torch.equal(h @ (h.T @ v), n * v)


def test_supported_orders():
    claimed = set(hadamard_orders(max(COMMON_WIDTHS)))
    assert set(COMMON_WIDTHS) <= claimed
    assert {2**i for i in range(15)} <= claimed
    assert set(ORDERS) == {n for n in claimed if n <= 16384}
    assert all(n in (1, 2) or n % 4 == 0 for n in claimed)


@pytest.mark.parametrize("n", [0, 3, 6, 92, 172])
def test_unsupported_orders_raise(n):
    assert n not in ORDERS
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard(n)


@pytest.mark.parametrize("n, is_hadamard", [(768, True), (172, False), (7, False)])
def test_random_orthogonal(n, is_hadamard):
    q, flag = random_orthogonal(n, seed=0)
    assert flag is is_hadamard and q.dtype == torch.float64
    assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    if is_hadamard:
        assert torch.allclose(q.abs(), torch.full_like(q, n**-0.5), rtol=1e-15, atol=0)
    assert torch.equal(random_orthogonal(n, seed=0)[0], q)
    assert not torch.equal(random_orthogonal(n, seed=1)[0], q)
    assert random_orthogonal(n, seed=0, dtype=torch.float32)[0].dtype == torch.float32
