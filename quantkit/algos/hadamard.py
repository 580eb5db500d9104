"""Hadamard matrices and the random orthogonal rotations built from them.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I; H / √n is orthogonal and spreads
every input coordinate evenly over all outputs, which is why rotating by it removes outliers.
Orders are built from three constructions and their Kronecker products (H_a ⊗ H_b has order a·b):

- Sylvester: H_2 = [[1, 1], [1, −1]].
- Paley I, order q + 1 for a prime power q ≡ 3 (mod 4).
- Paley II, order 2(q + 1) for a prime power q ≡ 1 (mod 4).

Both Paley constructions start from the Jacobsthal matrix Q[a, b] = χ(a − b) over the field
GF(q), χ the quadratic character (χ(0) = 0, χ(x) = 1 for non-zero squares, −1 otherwise). It has
zero row sums and Q Qᵀ = q I − J (J all ones), and Qᵀ = χ(−1)·Q with χ(−1) = (−1)^((q−1)/2).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _paley(m: int) -> tuple[int, int] | None:
    """(q, 1) if Paley I builds order m = q + 1, (q, 2) if Paley II builds m = 2(q + 1), else None."""
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return m - 1, 1
    if m % 2 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return m // 2 - 1, 2
    return None


@lru_cache(maxsize=None)
def _factors(n: int) -> tuple[int, ...] | None:
    """Orders of the Sylvester (2) and Paley blocks whose Kronecker product has order n, or None.

    Prefers doubling (n = 2·n/2), then a single Paley block, then any split n = a·b, a ≤ b.
    """
    if n <= 1:
        return () if n == 1 else None
    if n % 4 and n != 2:  # a Hadamard order above 2 is a multiple of 4
        return None
    if n % 2 == 0 and (half := _factors(n // 2)) is not None:
        return (2, *half)
    if _paley(n):
        return (n,)
    for a in range(4, math.isqrt(n) + 1, 4):
        if n % a == 0 and (fa := _factors(a)) is not None and (fb := _factors(n // a)) is not None:
            return fa + fb
    return None


def _mul(a: torch.Tensor, b: torch.Tensor, tail: torch.Tensor, p: int) -> torch.Tensor:
    """Product in GF(p)[x] / (x^k + tail·[1, x, …, x^(k−1)]) of coefficient rows a, b [N, k]."""
    k = a.shape[1]
    c = torch.zeros(a.shape[0], 2 * k - 1, dtype=torch.int64)
    for i, j in itertools.product(range(k), repeat=2):
        c[:, i + j] += a[:, i] * b[:, j]
    c %= p
    for deg in range(2 * k - 2, k - 1, -1):  # x^deg = x^(deg−k)·x^k ≡ −x^(deg−k)·tail
        c[:, deg - k : deg] -= c[:, deg : deg + 1] * tail
        c %= p
    return c[:, :k]


def _digits(p: int, k: int) -> torch.Tensor:
    """Base-p digits [p^k, k] of 0..p^k−1, least significant first: code e ↔ polynomial Σ d_i x^i."""
    return torch.arange(p**k)[:, None] // p ** torch.arange(k) % p


def _euler_powers(p: int, tail: torch.Tensor) -> torch.Tensor:
    """e^((q−1)/2) for every e in GF(p)[x] / (x^k + tail·[1, x, …, x^(k−1)]), q = p^k: [q, k]."""
    base, e = _digits(p, len(tail)), (p ** len(tail) - 1) // 2
    power = torch.zeros_like(base)
    power[:, 0] = 1
    while e:
        if e & 1:
            power = _mul(power, base, tail, p)
        base, e = _mul(base, base, tail, p), e >> 1
    return power


@lru_cache(maxsize=None)
def _quadratic_character(q: int) -> torch.Tensor:
    """χ over GF(q), q an odd prime power: int8 [q] indexed by the element's base-p code.

    GF(p^k) is GF(p)[x] modulo a monic degree-k polynomial f. Every non-zero e satisfies
    e^((q−1)/2) = ±1 iff the quotient ring has no zero divisors, i.e. iff f is irreducible, and
    then e^((q−1)/2) = χ(e) (Euler's criterion). The first such f in lexicographic order of its
    lower coefficients is used (for k = 1 any f = x + c works: GF(p)[x] / (x + c) ≅ GF(p)).
    """
    p, k = _prime_power(q)
    signs = torch.zeros(2, k, dtype=torch.int64)
    signs[:, 0] = torch.tensor([1, p - 1])  # the constants 1 and −1
    tails = itertools.product(range(1, p), *[range(p)] * (k - 1))  # x ∤ f: constant term ≠ 0
    hits = ((_euler_powers(p, torch.tensor(t))[:, None] == signs).all(2) for t in tails)
    hit = next(h for h in hits if h[1:].any(1).all())  # [q, 2]: e^((q−1)/2) == 1, == −1
    return hit[:, 0].to(torch.int8) - hit[:, 1].to(torch.int8)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = χ(a − b) over GF(q): int8 [q, q], rows and columns in element-code order."""
    p, k = _prime_power(q)
    x = _digits(p, k).to(torch.int32)
    diff = torch.zeros(q, q, dtype=torch.int32)
    for i in range(k):  # digit-wise subtraction mod p, re-encoded
        diff += (x[:, None, i] - x[None, :, i]).remainder_(p).mul_(p**i)
    return _quadratic_character(q)[diff]


def _block(m: int) -> torch.Tensor:
    """Sylvester (m = 2) or Paley block of order m: int8 [m, m]."""
    if m == 2:
        return torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    q, kind = _paley(m)
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)  # bordered core [[0, 1ᵀ], [±1, Q]]
    c[0, 1:] = 1
    c[1:, 0] = -1 if kind == 1 else 1
    c[1:, 1:] = _jacobsthal(q)
    if kind == 1:  # C skew, C Cᵀ = q I: H = I + C
        return c + torch.eye(q + 1, dtype=torch.int8)
    # C symmetric, C² = q I: H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int8), b)


@lru_cache(maxsize=8)
def _hadamard_int8(n: int) -> torch.Tensor:
    factors = _factors(n)
    if factors is None:
        raise ValueError(
            f"cannot build a Hadamard matrix of order {n}: supported orders are 1, 2 and the "
            "multiples of 4 reachable by Sylvester, Paley I/II and Kronecker products "
            "(see hadamard_orders)"
        )
    h = torch.ones(1, 1, dtype=torch.int8)
    for m in factors:
        h = torch.kron(h, _block(m))
    return h


def hadamard(n: int) -> torch.Tensor:
    """Hadamard matrix of order n: float64 [n, n] of ±1 with H Hᵀ = n I; ValueError if unsupported."""
    return _hadamard_int8(n).to(torch.float64)


def hadamard_orders(max_n: int) -> list[int]:
    """Every order n ≤ max_n for which ``hadamard(n)`` succeeds."""
    return [n for n in range(1, max_n + 1) if _factors(n) is not None]


def random_orthogonal(
    n: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, bool]:
    """Seeded orthogonal [n, n] matrix Q and whether it is a randomized Hadamard matrix.

    Q = H·diag(s)/√n with random signs s when ``hadamard(n)`` exists, else the Q factor of a
    Gaussian matrix with R's diagonal made positive (Haar-distributed). Built in float64.
    """
    gen = torch.Generator().manual_seed(seed)
    if _factors(n) is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        return (hadamard(n) * signs / math.sqrt(n)).to(dtype), True
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype), False
