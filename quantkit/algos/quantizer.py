"""The uniform integer grid: per-group scale and zero point, quantize, dequantize.

A weight w in a group with scale s and zero z is stored as the code q = clamp(round(w/s) + z, 0, 2^b − 1)
and read back as s·(q − z). Symmetric grids fix z = 2^(b−1) (the GPTQ convention); asymmetric
grids fit [min(w, 0), max(w, 0)] onto [0, 2^b − 1].

``BlockGrid`` is llama.cpp's family of block grids (the GGUF types): blocks of 32 with one fp16
scale (and min), and the k-quants, whose super-blocks of 256 hold 16- or 32-column sub-blocks with
integer sub-block scales (and mins) times one fp16 scale — fitted together when the super-block
starts, so what the solver rounds to is exactly what llama.cpp reads. Inside GPTQ those scales (and
mins) are searched by the error weighted with the Hessian's diagonal, as llama.cpp's imatrix
quantizers weight theirs (``BlockGrid.fit_weighted``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """bits ∈ {2, 3, 4, 8}; group_size = columns sharing a scale (-1 = whole row); sym; min_zero = lowest
    allowed zero point (1 for GPTQ v1 checkpoints, which store zero − 1 in b bits)."""

    bits: int
    group_size: int = 128
    sym: bool = True
    min_zero: int = 0

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def width(self, in_features: int) -> int:
        """Columns per group for a Linear with ``in_features`` inputs (the whole row when per-channel)."""
        return in_features if self.group_size == -1 else self.group_size

    def groups(self, in_features: int) -> int:
        return in_features // self.width(in_features)

    def span(self, in_features: int) -> int:
        """Columns whose groups are fitted together (one group here; a super-block for BlockGrid)."""
        return self.width(in_features)

    def for_columns(self, in_features: int) -> "Grid":
        """The grid a Linear with ``in_features`` inputs is quantized on (this one)."""
        return self

    offset = False  # zeros are integer zero points: w = s·(q − z)

    def fit_span(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros of w [N, span]: ([N, 1], [N, 1])."""
        scale, zero = self.fit(w)
        return scale[:, None], zero[:, None]

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes q [N] (or [N, C]) read back with per-row scale/zero [N] (or broadcastable)."""
        return scale * (q - zero)

    def fit(self, w: torch.Tensor, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero for rows of w [N, C] (one group per row): ([N], [N]), zero integral.

        ``shrink`` ≤ 1 narrows the range (clip search)."""
        wmin = w.min(dim=1).values.clamp(max=0) * shrink
        wmax = w.max(dim=1).values.clamp(min=0) * shrink
        if self.sym:
            wmax = torch.maximum(-wmin, wmax)
            wmin = -wmax
        flat = wmax == wmin
        wmin, wmax = torch.where(flat, -1.0, wmin), torch.where(flat, 1.0, wmax)
        # checkpoints store fp16 scales: use exactly those, so the export equals what was optimised
        scale = ((wmax - wmin) / self.maxq).clamp(min=2**-16).to(torch.float16).to(w.dtype)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            zero = torch.round(-wmin / scale).clamp(self.min_zero, self.maxq)
        return scale, zero

    def search(self, w: torch.Tensor, steps: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
        """``fit`` with each row's range shrunk by the p ∈ {1, 1 − 1/steps, …} (max_shrink·steps candidates,
        down to 0.21) that minimises Σ |w − Q(w)|^norm over the row: ([N], [N]). The MSE grid search of
        the reference GPTQ quantizer (IST-DASLab/gptq quant.py, mse=True) that RSQ's --w_clip runs, on the
        scales and zeros ``fit`` gives (fp16 scales as stored, zeros clamped to the grid)."""
        def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
            return (self.fake_quantize(w, scale, zero) - w).abs_().pow_(norm).sum(1)

        best_scale, best_zero = self.fit(w)
        best_err = error(best_scale, best_zero)
        for i in range(1, int(max_shrink * steps)):
            scale, zero = self.fit(w, 1 - i / steps)
            err = error(scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        return best_scale, best_zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes of w [N, C] with per-row scale/zero [N] (or broadcastable [N, C])."""
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        return (w / scale).round_().add_(zero).clamp_(0, self.maxq)

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Round w [N, C] to the grid and return it dequantized (same shape and dtype)."""
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        return self.quantize(w, scale, zero).sub_(zero).mul_(scale)


@dataclass(frozen=True)
class BlockSpec:
    """One GGUF block type as a grid: ``bits`` per code, ``sub`` columns per scale, ``span`` columns
    per block (256 for a k-quant super-block), ``scale_bits`` of the integer sub-block scales (and
    mins; 0 = one fp16 scale per block), ``zero`` the code of 0 for symmetric types, ``offset`` for
    scale + min types (w = s·q + m)."""

    bits: int
    sub: int
    span: int
    scale_bits: int = 0
    zero: int = 0
    offset: bool = False


# Layouts and dequantization as llama.cpp's ggml-quants.c defines them (see quantkit.formats.gguf).
BLOCK_TYPES = {
    "Q4_0": BlockSpec(4, 32, 32, zero=8),  # d·(q − 8)
    "Q5_0": BlockSpec(5, 32, 32, zero=16),  # d·(q − 16)
    "Q8_0": BlockSpec(8, 32, 32, zero=128),  # d·(q − 128), q − 128 an int8
    "Q4_1": BlockSpec(4, 32, 32, offset=True),  # d·q + m
    "Q2_K": BlockSpec(2, 16, 256, scale_bits=4, offset=True),  # d·sc_j·q − dmin·m_j, sc/m 4-bit
    "Q3_K": BlockSpec(3, 16, 256, scale_bits=6, zero=4),  # d·(sc_j − 32)·(q − 4), sc 6-bit
    "Q4_K": BlockSpec(4, 32, 256, scale_bits=6, offset=True),  # d·sc_j·q − dmin·m_j, sc/m 6-bit
    "Q6_K": BlockSpec(6, 16, 256, scale_bits=8, zero=32),  # d·sc_j·(q − 32), sc int8
}
# What llama.cpp's quantizer writes when a row (in_features) is not a multiple of 256
K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, back in x's dtype; 0 (or underflow) becomes 1, so no scale is 0."""
    h = x.to(torch.float16).to(x.dtype)
    return torch.where(h == 0, torch.ones_like(h), h)


def _fp16_keep_zero(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, back in x's dtype (for mins, which may be 0)."""
    return x.to(torch.float16).to(x.dtype)


def _extreme(w: torch.Tensor) -> torch.Tensor:
    """The signed element of largest magnitude along the last dim: [..., C] -> [...]."""
    return w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))[..., 0]


# Candidate scales of the weighted searches: the block's extreme onto its anchor code times 1 + i/80,
# i = −9..9 (llama.cpp's make_qx_quants steps of 0.1 codes at Q4_0's anchor −8).
_STRETCH = [i / 80 for i in range(-9, 10)]


def _codes(x: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """clamp(round(x / s), lo, hi) for x [..., n] and scales s [...]; 0 where s is 0."""
    s = s[..., None]
    return torch.where(s == 0, torch.zeros_like(x), (x / torch.where(s == 0, 1.0, s)).round().clamp(lo, hi))


def _sym_error(x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Σ_j h_j (x_j − s·l_j)² over the last dim, l = the codes of x on scale s: [..., n] -> [...]."""
    return (h * (x - s[..., None] * _codes(x, s, lo, hi)).square()).sum(-1)


def _best_scale(x: torch.Tensor, h: torch.Tensor, lo: int, hi: int, anchor: int, cast, error) -> torch.Tensor:
    """The scale s [...] of x [..., n] (values s·l, codes l in lo..hi) that minimises ``error(s)`` [...]
    among the plain fit (x's extreme onto code ``anchor``) and llama.cpp's make_qx_quants candidates:
    the extreme onto anchor·(1 + i/80), each refitted by weighted least squares on its codes,
    s = Σ h x l / Σ h l² (h [..., n] ≥ 0). ``cast`` rounds a scale as it is stored (fp16)."""
    ext = _extreme(x)
    best = cast(ext / anchor)
    best_err = error(best)
    for f in _STRETCH:
        s = ext / (anchor * (1 + f))
        l = _codes(x, s, lo, hi)
        den = (h * l * l).sum(-1)
        s = cast(torch.where(den > 0, (h * x * l).sum(-1) / den.clamp(min=1e-30), s))
        err = error(s)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def _offset_error(x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, m: torch.Tensor, maxq: int) -> torch.Tensor:
    """Σ_j h_j (x_j − (s·q_j + m))² over the last dim, q = clamp(round((x − m)/s), 0, maxq):
    [..., n] -> [...]."""
    q = _codes(x - m[..., None], s, 0, maxq)
    return (h * (x - s[..., None] * q - m[..., None]).square()).sum(-1)


def _best_scale_min(x: torch.Tensor, h: torch.Tensor, maxq: int, clamp_min: bool,
                    stored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and min m [...] of x [..., n] (values s·q + m, q in 0..maxq) minimising Σ h (x − s·q − m)²
    (``stored``: both rounded to fp16 first, as stored) among the plain fit ([min, max] onto [0, maxq])
    and llama.cpp's make_qkx3_quants candidates: [min, max] onto maxq − 0.9 + 0.05·i codes (i = 0..36),
    each refitted by weighted least squares on its codes. ``clamp_min``: m ≤ 0 (k-quants store −m)."""
    lo, top = x.amin(-1), x.amax(-1)
    if clamp_min:
        lo = lo.clamp(max=0)
    span = (top - lo).clamp(min=1e-30)
    cast_s, cast_m = (_fp16, _fp16_keep_zero) if stored else (lambda v: v, lambda v: v)
    best_s, best_m = cast_s(span / maxq), cast_m(lo)
    best_err = _offset_error(x, h, best_s, best_m, maxq)
    sw, sx = h.sum(-1), (h * x).sum(-1)
    for i in range(37):
        q = ((x - lo[..., None]) * ((maxq - 0.9 + 0.05 * i) / span)[..., None]).round().clamp(0, maxq)
        sl, sl2, sxl = (h * q).sum(-1), (h * q * q).sum(-1), (h * x * q).sum(-1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        s = (sw * sxl - sx * sl) / torch.where(ok, det, 1.0)
        m = (sl2 * sx - sl * sxl) / torch.where(ok, det, 1.0)
        if clamp_min:
            pos = m > 0
            s, m = torch.where(pos, sxl / sl2.clamp(min=1e-30), s), torch.where(pos, 0.0, m)
        ok &= s > 0
        s, m = cast_s(torch.where(ok, s, best_s)), cast_m(torch.where(ok, m, best_m))
        err = _offset_error(x, h, s, m, maxq)
        better = err < best_err
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)
    return best_s, best_m


@dataclass(frozen=True)
class BlockGrid:
    """llama.cpp's block grid ``type`` (a key of BLOCK_TYPES) with the Grid interface.

    Groups are the sub-blocks (``group_size`` columns); ``fit_span`` fits a whole block at once:
    symmetric types map each group's largest-magnitude weight to code 0 (scale = extreme / −zero,
    as llama.cpp does), scale + min types fit [min(w, 0), max(w)] (Q4_1: [min, max]); k-quants then
    round the sub-block scales (and mins) to ``scale_bits``-bit integers times one fp16 scale, so the
    scales returned are exactly d·sc_j and the mins −dmin·m_j. Given an importance per column (GPTQ
    passes diag H), ``fit_weighted`` searches the scales as llama.cpp's imatrix quantizers do."""

    type: str

    @property
    def spec(self) -> BlockSpec:
        return BLOCK_TYPES[self.type]

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.sub

    @property
    def sym(self) -> bool:
        return not self.spec.offset

    @property
    def offset(self) -> bool:
        return self.spec.offset

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def width(self, in_features: int) -> int:
        return self.spec.sub

    def groups(self, in_features: int) -> int:
        return in_features // self.spec.sub

    def span(self, in_features: int) -> int:
        return self.spec.span

    def for_columns(self, in_features: int) -> "BlockGrid":
        """llama.cpp's fallback when rows do not fill whole super-blocks (Q4_K -> Q5_0, Q3_K/Q2_K -> Q4_0,
        Q6_K -> Q8_0); this grid otherwise."""
        if in_features % self.spec.span and self.type in K_FALLBACK:
            return BlockGrid(K_FALLBACK[self.type])
        return self

    def fit_span(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros (offset types: mins) of w [N, span]: ([N, span/sub], [N, span/sub]).

        ``importance`` [span] (or [N, span]), ≥ 0: how much each weight's error costs (GPTQ passes the
        diagonal of H, what llama.cpp's imatrix holds); the fit is then ``fit_weighted``'s."""
        if importance is not None:
            return self.fit_weighted(w, importance)
        spec = self.spec
        sub = w.reshape(w.shape[0], -1, spec.sub)
        if spec.offset:
            lo = sub.amin(-1) if spec.scale_bits == 0 else sub.amin(-1).clamp(max=0)
            scale, mins = (sub.amax(-1) - lo) / self.maxq, -lo
        elif self.type == "Q8_0":
            scale = sub.abs().amax(-1) / 127  # ±127 of the int8 range, as llama.cpp
        else:
            scale = _extreme(sub) / -spec.zero
        if spec.scale_bits == 0:
            scale = _fp16(scale)
            return scale, (lo.to(torch.float16).to(w.dtype) if spec.offset else torch.full_like(scale, spec.zero))
        top = 2**spec.scale_bits - 1 if spec.offset else 2 ** (spec.scale_bits - 1)  # 63 / 15, or 32 / 128 signed
        if spec.offset:
            d = _fp16(scale.amax(-1, keepdim=True) / top)
            sc = (scale / d).round().clamp(1, top)
            dmin = (mins.amax(-1, keepdim=True) / top).to(torch.float16).to(w.dtype)
            m = torch.where(dmin > 0, mins / dmin.clamp(min=2**-24), torch.zeros_like(mins)).round().clamp(0, top)
            return d * sc, -(dmin * m)
        d = _fp16(_extreme(scale)[:, None] / -top)  # the largest sub-block scale becomes sc = −top
        ratio = scale / d
        sc = ratio.round().clamp(-top, top - 1)
        sc = torch.where(sc == 0, torch.where(ratio >= 0, 1.0, -1.0), sc)  # a scale of 0 would lose the sub-block
        return d * sc, torch.full_like(sc, spec.zero)

    def fit_weighted(self, w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``fit_span`` by weighted error: w [N, span], importance h [span] or [N, span] -> ([N, J], [N, J]).

        Each weight counts h·sqrt(σ² + w²) (σ² = 2·mean w² over the row's span), as in llama.cpp's
        imatrix quantizers. Each block's (sub-block's) scale, and min, minimise Σ h (w − Q(w))² over
        llama.cpp's candidates (``_best_scale``, ``_best_scale_min``: make_qx_quants / make_qkx3_quants),
        and a k-quant's super-block scale d (and dmin) then minimises the same error of the whole
        super-block with its sub-block scales rounded to sc_j (the mins at first unrounded). Blocks whose
        h is all 0 are weighted uniformly. The result is on the same stored grid as the plain fit."""
        spec, n = self.spec, w.shape[0]
        x = w.reshape(n, -1, spec.sub)
        sigma2 = 2 * w.square().mean(1, keepdim=True)
        h = (importance.float().expand(w.shape) * (sigma2 + w.square()).sqrt()).reshape(x.shape)
        h = torch.where(h.sum(-1, keepdim=True) > 0, h, torch.ones_like(h))
        stored = spec.scale_bits == 0  # one fp16 scale (and min) per block
        if spec.offset:
            s, m = _best_scale_min(x, h, self.maxq, clamp_min=not stored, stored=stored)
            if stored:
                return s, m
            top, sw = 2**spec.scale_bits - 1, h.sum(-1)

            def with_scale(d: torch.Tensor) -> torch.Tensor:
                return d[:, None] * _codes(s, d, 1, top)

            d = _best_scale(s, sw, 1, top, top, _fp16,
                            lambda d: _offset_error(x, h, with_scale(d), m, self.maxq).sum(-1))
            s = with_scale(d)

            def with_min(d: torch.Tensor) -> torch.Tensor:
                return -(d[:, None] * _codes(-m, d, 0, top))

            dmin = _best_scale(-m, sw, 0, top, top, _fp16_keep_zero,
                               lambda d: _offset_error(x, h, s, with_min(d), self.maxq).sum(-1))
            return s, with_min(dmin)
        lo, hi = -spec.zero, self.maxq - spec.zero
        s = _best_scale(x, h, lo, hi, lo, _fp16 if stored else (lambda v: v), lambda s: _sym_error(x, h, s, lo, hi))
        if not stored:
            top, sw = 2 ** (spec.scale_bits - 1), h.sum(-1)

            def with_scale(d: torch.Tensor) -> torch.Tensor:
                ratio = s / d[:, None]
                sc = ratio.round().clamp(-top, top - 1)
                return d[:, None] * torch.where(sc == 0, torch.where(ratio >= 0, 1.0, -1.0), sc)  # no sub-block lost

            d = _best_scale(s, sw, -top, top - 1, -top, _fp16,
                            lambda d: _sym_error(x, h, with_scale(d), lo, hi).sum(-1))
            s = with_scale(d)
        return s, torch.full_like(s, spec.zero)

    def fit(self, w: torch.Tensor, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One block per row of w [M, span]: ([M], [M]) for one-scale types (the Grid interface)."""
        if shrink != 1.0 or self.spec.span != self.spec.sub:
            raise ValueError(f"{self.type}: fit one block with fit_span (no range shrink)")
        scale, zero = self.fit_span(w)
        return scale[:, 0], zero[:, 0]

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes of w [N, C] with per-row scale/zero(or min) [N] (or broadcastable [N, C])."""
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        if self.offset:
            return ((w - zero) / scale).round_().clamp_(0, self.maxq)
        return (w / scale).round_().add_(zero).clamp_(0, self.maxq)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """s·q + m for offset types (llama.cpp's order), s·(q − z) otherwise."""
        return scale * q + zero if self.offset else scale * (q - zero)

    def fake_quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        return self.dequantize(self.quantize(w, scale, zero), scale, zero)


@dataclass
class QuantizedWeight:
    """A quantized Linear weight: codes [N, K] (ints as float or int), scales/zeros [N, K/G], g_idx [K].

    ``offset``: the zeros are value offsets (llama.cpp's mins), w = scales·codes + zeros;
    otherwise integer zero points, w = scales·(codes − zeros)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    offset: bool = False

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in the scales' dtype."""
        g = self.g_idx.long()
        codes = self.codes.to(self.scales.dtype)
        if self.offset:
            return self.scales[:, g] * codes + self.zeros[:, g]
        return self.scales[:, g] * (codes - self.zeros[:, g])

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """The weights of Linears stacked along N (sizes: each one's out_features), apart again
        (copies: no part shares memory with another, as safetensors requires of saved tensors)."""
        parts = zip(*(t.split(sizes) for t in (self.codes, self.scales, self.zeros)))
        return [QuantizedWeight(c.clone(), s.clone(), z.clone(), self.g_idx.clone(), self.bits, self.group_size, self.offset)
                for c, s, z in parts]


def round_to_nearest(w: torch.Tensor, grid: Grid | BlockGrid, clip_search: bool = False) -> QuantizedWeight:
    """Round-to-nearest: w [N, K] -> QuantizedWeight on ``grid`` (K divisible by its span);
    ``clip_search``: each group's range from ``Grid.search`` instead of its min/max."""
    n, k = w.shape
    grid = grid.for_columns(k)
    g, span = grid.width(k), grid.span(k)
    if clip_search:
        scale, zero = grid.search(w.float().reshape(n * (k // g), g))
    else:
        scale, zero = grid.fit_span(w.float().reshape(n * (k // span), span))
    scale, zero = scale.reshape(-1), zero.reshape(-1)
    codes = grid.quantize(w.float().reshape(n * (k // g), g), scale, zero).reshape(n, k)
    g_idx = torch.arange(k, device=w.device) // g
    return QuantizedWeight(codes, scale.reshape(n, -1), zero.reshape(n, -1), g_idx.int(), grid.bits, g, grid.offset)
