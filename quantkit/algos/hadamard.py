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

import math
from functools import lru_cache

import torch


def _prime_factors(n: int) -> set[int]:
    """The distinct primes dividing n ≥ 1 (trial division)."""
    primes, d = set(), 2
    while d * d <= n:
        while n % d == 0:
            primes.add(d)
            n //= d
        d += 1
    return primes | ({n} - {1})


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    primes = _prime_factors(q) if q >= 2 else set()
    if len(primes) != 1:
        return None
    (p,) = primes
    return p, round(math.log(q, p))


def _paley(m: int) -> tuple[int, int] | None:
    """(q, 1) if Paley I builds order m = q + 1, (q, 2) if Paley II builds m = 2(q + 1), or None."""
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


# GF(p^k) is GF(p)[x] / (f), f = x^k + tail·[1, x, …, x^(k−1)] irreducible; an element is its
# coefficient row [k] (constant first), coded as the integer Σ c_i p^i.


def _digits(p: int, k: int) -> torch.Tensor:
    """Coefficient rows [p^k, k] of the codes 0 … p^k − 1."""
    return torch.arange(p**k)[:, None] // p ** torch.arange(k) % p


def _times_x(c: torch.Tensor, tail: torch.Tensor, p: int) -> torch.Tensor:
    """x·c mod f for a coefficient row c [k]: shift up, then x^k ≡ −tail."""
    return (torch.cat([c.new_zeros(1), c[:-1]]) - c[-1] * tail) % p


def _reduction(p: int, tail: torch.Tensor) -> torch.Tensor:
    """[k·k, k]: row i·k + j holds x^(i+j) mod f."""
    k = len(tail)
    powers = [torch.eye(k, dtype=torch.int64)[0]]  # x^0
    for _ in range(2 * k - 2):
        powers.append(_times_x(powers[-1], tail, p))
    i = torch.arange(k)
    return torch.stack(powers)[(i[:, None] + i[None, :]).flatten()]


def _mul(a: torch.Tensor, b: torch.Tensor, reduction: torch.Tensor, p: int) -> torch.Tensor:
    """a·b mod f for coefficient rows a, b [N, k]: Σ_ij a_i b_j x^(i+j), reduced."""
    return (a[:, :, None] * b[:, None, :]).flatten(1) @ reduction % p


def _power(a: torch.Tensor, e: int, reduction: torch.Tensor, p: int) -> torch.Tensor:
    """a^e mod f for coefficient rows a [N, k] (square and multiply)."""
    result = torch.zeros_like(a)
    result[:, 0] = 1
    while e:
        if e & 1:
            result = _mul(result, a, reduction, p)
        a, e = _mul(a, a, reduction, p), e >> 1
    return result


def _x_is_primitive(p: int, tail: torch.Tensor) -> bool:
    """Whether x has multiplicative order q − 1 = p^k − 1 modulo f.

    Then the q − 1 non-zero residues are all powers of x, hence units, so f is irreducible.
    """
    q, reduction = p ** len(tail), _reduction(p, tail)
    one = torch.eye(len(tail), dtype=torch.int64)[:1]
    x = _times_x(one[0], tail, p)[None]
    return torch.equal(_power(x, q - 1, reduction, p), one) and not any(
        torch.equal(_power(x, (q - 1) // r, reduction, p), one) for r in _prime_factors(q - 1)
    )


@lru_cache(maxsize=None)
def _quadratic_character(q: int) -> torch.Tensor:
    """χ over GF(q), q an odd prime power: int8 [q] indexed by element code.

    f is x + 1 for k = 1 (any linear f is irreducible), else the first f, taking tails in code
    order, for which x is primitive. Then χ(e) = e^((q−1)/2) by Euler's criterion.
    """
    p, k = _prime_power(q)
    digits = _digits(p, k)
    candidates = (digits[c] for c in range(q) if c % p)  # tail[0] = 0 would make x divide f
    tail = next(t for t in candidates if k == 1 or _x_is_primitive(p, t))
    power = _power(digits, (q - 1) // 2, _reduction(p, tail), p)
    one = torch.eye(k, dtype=torch.int64)[0]
    return (power == one).all(1).to(torch.int8) - (power == (p - 1) * one).all(1).to(torch.int8)


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
    """int8 [n, n]: Kronecker product of the blocks of ``_factors(n)`` (cached; callers copy)."""
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
    """Hadamard matrix of order n: float64 [n, n] of ±1, H Hᵀ = n I; ValueError if unbuildable."""
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
