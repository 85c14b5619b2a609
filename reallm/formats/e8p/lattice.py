"""E8P: QuIP#'s structured E8-lattice codebook of 2^16 points in dimension 8 (zero stored bits).

Written from the definition (QuIP#, Tseng et al. 2024, §4 "E8P"), not from QuIP#'s code.

Lattice. ``E8 = D8 ∪ (D8 + ½·1)`` with ``D8 = {x ∈ Z^8 : Σ x_i even}``. ``D8 + ½·1`` is the set of
half-integer vectors (every coordinate in ``Z + ½``) whose coordinate sum is even (``Σ (y_i + ½) =
Σ y_i + 4``).

Abs table (256 × 8). Every element-wise absolute value ("abs pattern") ``a`` of a half-integer vector
has entries in ``{½, 3/2, 5/2, ...}``. Flipping the sign of one coordinate changes the coordinate sum
by ``2 a_i``, an odd integer, so exactly half of the 256 sign patterns of any abs pattern give an even
sum: every abs pattern is the abs pattern of points of ``D8 + ½``. The table is QuIP#'s (``get_abs_grid``
in ``lib/codebook/latticee8_padded12.py`` of github.com/Cornell-RelaxML/quip-sharp), row for row:

- rows 0..226: the 227 abs patterns of squared norm ≤ 10 (the patterns made of ½ and 3/2 with at most
  four 3/2, and those with one 5/2 and at most one 3/2), in lexicographic order (QuIP# takes them
  from ``torch.unique``, which sorts rows lexicographically);
- rows 227..255: QuIP#'s 29 padding patterns of squared norm 12 (``get_norm12``), all with five 3/2 and
  three ½, in QuIP#'s order (:data:`QUIP_SHARP_NORM12`, copied as data). Of the 224 norm-12 abs patterns (56 with
  five 3/2, 168 with one 5/2, two 3/2 and five ½) QuIP# picked these 29; the choice is not derived
  from the lattice, so it is data, not construction.

Checkpoints written before this table was QuIP#'s (until December 2026) used another padding (the first
29 five-3/2 patterns in lexicographic order, 11 of them in QuIP#'s list) and another row order (by
squared norm, then lexicographic): their matrices carry no ``e8p_table`` entry in their metadata and
decode with that table, :data:`LEGACY_TABLE`; matrices encoded now record ``e8p_table:
"quip-sharp"``. Only the code → codeword map differs, never the layout below.

Code layout (16 bits, an int in ``[0, 65536)``):

- bits 0..7: index of the abs pattern ``a`` in the table;
- bits 8..14: bit ``8 + i`` set means coordinate ``i`` (i = 0..6) is negative;
- the sign of coordinate 7 is not stored: it is negative iff the number of negative coordinates
  among 0..6 plus ``parity(a) = (Σ a_i) mod 2`` is odd. Then the number of negative coordinates
  ``n_neg ≡ Σ a_i (mod 2)``, which is exactly the condition for the signed vector
  ``v = σ ⊙ a`` to have an even sum (``Σ v = Σ a − Σ_{neg} 2a_i ≡ Σ a − n_neg``), i.e. ``v ∈ D8 + ½``;
- bit 15: the shift, 0 adds +¼ to every coordinate, 1 adds −¼.

So the codeword is ``c = σ ⊙ a ± ¼·1`` and ``c ∓ ¼·1 ∈ D8 + ½ ⊂ E8``. (Since ``½·1 ∈ E8``, both
halves lie in the same coset ``E8 + ¼·1``: for the −¼ half, ``c − ¼·1 ∈ D8``.) The 2^16 points are distinct
(abs entries are never 0, so distinct signs give distinct points; a +¼ point never equals a −¼ point
since their difference would be ``½·1 ∉ D8``).

Nearest codeword without enumerating 2^16 points (exact): for each shift ``s ∈ {+¼, −¼}``, ``u = x − s``;
for an abs pattern ``a``, the best signs are ``sign(u)`` (inner product ``<|u|, a>``); if their number
of negatives has the wrong parity for ``a``, the best admissible signs flip the single coordinate
minimising ``|u_i| a_i`` (flipping three or more costs at least as much), which lowers the inner
product by ``2 min_i |u_i| a_i``. Distance = ``‖u‖² − 2·<u, σ⊙a> + ‖a‖²``. That is 2 × 256
candidates per vector.

Scale. The quantizer stores ``codes`` and one scale per matrix: ``x ≈ scale · c(code)``.
:func:`e8p_search_scale` chooses the scale minimising the MSE on a seeded subsample (a log-spaced
grid, then golden-section refinement; see there). QuIP# applies it after the randomised Hadamard
rotation (``reallm.ops.hadamard.rotate``), where the values look Gaussian.

Residual stages (3 and 4 bits): a second stage quantizes the residual of the first with its own
scale. For 3 bits a 1-bit-per-weight stage (:func:`e8_ball256`, 256 lattice points, 8-bit codes);
for 4 bits a second E8P stage. The scales are searched stage by stage, then refined jointly for the
final error (see :func:`e8_residual_quantize`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from reallm.ops.kmeans import assign

__all__ = [
    "DEFAULT_TABLE",
    "E8P_NUM_BASE_PATTERNS",
    "E8P_TABLES",
    "E8_STAGES",
    "E8ResidualResult",
    "LEGACY_TABLE",
    "QUIP_SHARP_NORM12",
    "e8_ball256",
    "e8_residual_dequantize",
    "e8_residual_quantize",
    "e8p_abs_table",
    "e8p_codebook",
    "e8p_decode",
    "e8p_dequantize",
    "e8p_nearest",
    "e8p_quantize",
    "e8p_search_scale",
    "search_scale",
]

E8P_NUM_BASE_PATTERNS = 227  # abs patterns of squared norm <= 10 (rows 0..226 of the table)
_NUM_PATTERNS = 256
_PAD_NORM2_TIMES4 = 48  # padding patterns have squared norm 12, i.e. Σ (2 a_i)^2 = 48
# Vectors per chunk of e8p_nearest: a handful of (chunk, 256) temporaries, about 1 MB each on CPU
# (cache friendly), 32 MB each on an accelerator. A 4096 x 4096 matrix (2M vectors) runs in chunks.
_CPU_CHUNK = 1024
_GPU_CHUNK = 1 << 15


def _device_key(device: torch.device | str | None) -> str:
    return str(torch.device(device) if device is not None else torch.device("cpu"))


#: QuIP#'s 29 padding abs patterns of squared norm 12, as ``2a`` (so 3 is 3/2 and 1 is ½), in QuIP#'s order.
#: Source: ``get_norm12()`` in lib/codebook/latticee8_padded12.py of github.com/Cornell-RelaxML/quip-sharp
#: (commit 79b752f). An earlier revision of that file listed (1, 3, 3, 3, 1, 1, 3, 3) twice, at rows 21 and 27
#: (a codebook of 65280 distinct points); get_norm12 has (1, 1, 3, 3, 1, 3, 3, 3) at row 27.
QUIP_SHARP_NORM12: tuple[tuple[int, ...], ...] = (
    (3, 1, 1, 1, 3, 3, 3, 3), (1, 3, 1, 1, 3, 3, 3, 3), (1, 1, 3, 1, 3, 3, 3, 3), (1, 1, 1, 3, 3, 3, 3, 3),
    (3, 3, 3, 1, 3, 3, 1, 1), (3, 3, 3, 1, 3, 1, 3, 1), (3, 3, 3, 1, 1, 3, 3, 1), (3, 3, 3, 1, 3, 1, 1, 3),
    (3, 3, 3, 1, 1, 3, 1, 3), (3, 3, 3, 1, 1, 1, 3, 3), (3, 3, 1, 3, 3, 3, 1, 1), (3, 3, 1, 3, 3, 1, 3, 1),
    (3, 3, 1, 3, 1, 3, 3, 1), (3, 3, 1, 3, 3, 1, 1, 3), (3, 3, 1, 3, 1, 3, 1, 3), (3, 3, 1, 3, 1, 1, 3, 3),
    (3, 1, 3, 3, 3, 3, 1, 1), (3, 1, 3, 3, 3, 1, 3, 1), (3, 1, 3, 3, 1, 3, 3, 1), (3, 1, 3, 3, 3, 1, 1, 3),
    (3, 1, 3, 3, 1, 3, 1, 3), (1, 3, 3, 3, 1, 1, 3, 3), (1, 3, 3, 3, 3, 3, 1, 1), (1, 3, 3, 3, 3, 1, 3, 1),
    (1, 3, 3, 3, 1, 3, 3, 1), (1, 3, 3, 3, 3, 1, 1, 3), (1, 3, 3, 3, 1, 3, 1, 3), (1, 1, 3, 3, 1, 3, 3, 3),
    (3, 3, 1, 1, 3, 3, 3, 1),
)
#: the table every matrix is encoded with now (QuIP#'s), and the one of checkpoints without an ``e8p_table``
#: entry (module docstring)
DEFAULT_TABLE = "quip-sharp"
LEGACY_TABLE = "lexicographic-2025"
E8P_TABLES = (DEFAULT_TABLE, LEGACY_TABLE)


def _check_table(table: str) -> str:
    if table not in E8P_TABLES:
        raise ValueError(f"unknown E8P table {table!r} (known: {', '.join(E8P_TABLES)})")
    return table


@lru_cache(maxsize=2)
def _abs_table_twice(table: str = DEFAULT_TABLE) -> tuple[tuple[int, ...], ...]:
    """The 256 abs patterns of ``table`` as tuples of ``2a`` (odd integers), in table order (module docstring)."""
    _check_table(table)
    base, pad = [], []
    for t in itertools.product((1, 3, 5), repeat=8):  # lexicographic order of 2a
        n4 = sum(v * v for v in t)  # 4 ‖a‖²
        if n4 <= 40:
            base.append((n4, t))
        elif n4 == _PAD_NORM2_TIMES4 and t.count(3) == 5:
            pad.append(t)
    if len(base) != E8P_NUM_BASE_PATTERNS:  # a property of the lattice, checked by construction
        raise AssertionError(f"expected {E8P_NUM_BASE_PATTERNS} abs patterns of norm² <= 10, got {len(base)}")
    if table == DEFAULT_TABLE:
        return tuple(t for _, t in base) + QUIP_SHARP_NORM12
    return tuple(t for _, t in sorted(base)) + tuple(pad[: _NUM_PATTERNS - len(base)])  # by norm², then 2a


@lru_cache(maxsize=8)
def _tables(device_key: str, table: str = DEFAULT_TABLE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """On the device: abs table (256, 8) fp32, squared norms (256,) fp32, parity (256,) int64, and
    subset masks (3, 256) int64: bit i of ``masks[v, a]`` is set iff ``a_i = (2v + 1) / 2``."""
    twice = torch.tensor(_abs_table_twice(table), dtype=torch.int64)  # (256, 8) = 2a, odd entries
    abs_table = twice.to(torch.float32) / 2  # (256, 8)
    norm2 = (abs_table * abs_table).sum(dim=1)  # (256,)
    parity = (twice.sum(dim=1) // 2) % 2  # (256,) (Σ a_i) mod 2; Σ 2a_i is even (8 odd terms)
    weights = 1 << torch.arange(8)  # (8,)
    masks = torch.stack([((twice == 2 * v + 1).to(torch.int64) * weights).sum(dim=1) for v in range(3)])
    dev = torch.device(device_key)
    return abs_table.to(dev), norm2.to(dev), parity.to(dev), masks.to(dev)


def _subset_min(au: Tensor) -> Tensor:
    """``(c, 8)`` -> ``(c, 256)``: column S is ``min_{i in S} au[:, i]`` (bit i of S), +inf for S = ∅.

    Built by doubling: the subsets of bits 0..k+1 are those of bits 0..k, then the same with bit
    k+1 added. 8 steps and 255 element-wise minima per row, instead of a (c, 256, 8) reduction.
    """
    m = torch.full_like(au[:, :1], math.inf)  # (c, 1): the empty set
    for i in range(8):
        m = torch.cat([m, torch.minimum(m, au[:, i : i + 1])], dim=1)  # (c, 2^(i+1))
    return m


def e8p_abs_table(device: torch.device | str | None = None, table: str = DEFAULT_TABLE) -> Tensor:
    """The 256-row abs table, ``(256, 8)`` fp32 (rows 0..226: norm² <= 10; 227..255: norm² 12); ``table``:
    QuIP#'s (default) or :data:`LEGACY_TABLE`."""
    return _tables(_device_key(device), _check_table(table))[0].clone()


def e8p_decode(codes: Tensor, table: str = DEFAULT_TABLE) -> Tensor:
    """Codewords of 16-bit E8P codes, computed from the abs table (no 2^16 table).

    Args:
        codes: integer tensor ``(N,)`` with values in ``[0, 65536)``.
        table: the abs table the codes index (QuIP#'s, or :data:`LEGACY_TABLE` for old checkpoints).

    Returns:
        ``(N, 8)`` fp32 codewords on ``codes.device``.
    """
    if codes.is_floating_point() or codes.dim() != 1:
        raise ValueError(f"codes must be a 1-D integer tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << 16):
        raise ValueError(f"E8P codes must lie in [0, 65536), got range [{int(c.min())}, {int(c.max())}]")
    abs_table, _, parity, _ = _tables(_device_key(codes.device), _check_table(table))
    idx = c & 255  # (N,)
    bit_pos = torch.arange(8, 15, device=c.device)  # (7,)
    neg7 = (c.unsqueeze(1) >> bit_pos) & 1  # (N, 7) 1 = negative
    neg_last = (neg7.sum(dim=1) + parity[idx]) % 2  # (N,) sign of coordinate 7 fixed by parity
    neg = torch.cat([neg7, neg_last.unsqueeze(1)], dim=1)  # (N, 8)
    shift = 0.25 - 0.5 * ((c >> 15) & 1).to(torch.float32)  # (N,) +1/4 or -1/4
    return abs_table[idx] * (1 - 2 * neg).to(torch.float32) + shift.unsqueeze(1)


@lru_cache(maxsize=8)
def _codebook_cached(device_key: str, table: str) -> Tensor:
    return e8p_decode(torch.arange(1 << 16, device=torch.device(device_key)), table)


def e8p_codebook(device: torch.device | str | None = None, table: str = DEFAULT_TABLE) -> Tensor:
    """All 2^16 E8P codewords in code order, ``(65536, 8)`` fp32; computed once per device and table and
    cached (it is never stored: zero bits). Treat the result as read-only."""
    return _codebook_cached(_device_key(device), _check_table(table))


def _check_vectors(x: Tensor, name: str = "x") -> None:
    if x.dim() != 2 or x.shape[1] != 8:
        raise ValueError(f"{name} must be (N, 8), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got {x.dtype}")


def e8p_nearest(x: Tensor, chunk_size: int | None = None, table: str = DEFAULT_TABLE) -> Tensor:
    """Exact nearest E8P codeword (squared L2) of every row of ``x``, without enumerating 2^16 points.

    Args:
        x: ``(N, 8)`` points (fp64 input is computed in fp64, anything else in fp32).
        chunk_size: vectors per chunk (default 1024 on CPU, 32768 on an accelerator; the
            temporaries are a few ``(chunk, 256)`` arrays).
        table: the abs table (QuIP#'s, or :data:`LEGACY_TABLE`).

    Returns:
        int64 ``(N,)`` codes (layout in the module docstring) on ``x.device``.

    For each shift and each of the 256 abs patterns the best admissible sign pattern is found in
    closed form (module docstring), so 2 × 256 candidate distances per vector.
    """
    _check_vectors(x)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    device = x.device
    abs_table, norm2, parity, masks = _tables(_device_key(device), _check_table(table))
    abs_table, norm2 = abs_table.to(dtype), norm2.to(dtype)
    table_t = abs_table.t().contiguous()  # (8, 256)
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=device)
    chunk = chunk_size or (_CPU_CHUNK if device.type == "cpu" else _GPU_CHUNK)
    sign_weights = 1 << torch.arange(8, 15, device=device)  # (7,) code bits of signs 0..6
    for s in range(0, n, chunk):
        xs = x[s : s + chunk].to(dtype)  # (c, 8)
        best_dist = best_idx = best_u = None
        best_shift = None
        for shift_bit, shift in ((0, 0.25), (1, -0.25)):
            u = xs - shift  # (c, 8)
            au = u.abs()  # (c, 8)
            wrong_parity = ((u < 0).sum(dim=1) % 2).unsqueeze(1) != parity.unsqueeze(0)  # (c, 256)
            score = au @ table_t  # (c, 256) <|u|, a>
            # (c, 256) min_i |u_i| a_i, taken per abs value: min over v of v * min_{i: a_i = v} |u_i|
            sub = _subset_min(au)  # (c, 256)
            flip_cost = torch.minimum(
                torch.minimum(0.5 * sub.index_select(1, masks[0]), 1.5 * sub.index_select(1, masks[1])),
                2.5 * sub.index_select(1, masks[2]),
            )
            score = torch.where(wrong_parity, score - 2 * flip_cost, score)
            dist = norm2 - 2 * score  # (c, 256) squared distance minus ‖u‖²
            dist = dist + (u * u).sum(dim=1, keepdim=True)
            d, i = dist.min(dim=1)  # (c,)
            if best_dist is None:
                best_dist, best_idx, best_u = d, i, u
                best_shift = torch.zeros_like(i)
            else:
                take = d < best_dist  # ties keep shift +1/4 (the lower code)
                best_dist = torch.where(take, d, best_dist)
                best_idx = torch.where(take, i, best_idx)
                best_u = torch.where(take.unsqueeze(1), u, best_u)
                best_shift = torch.where(take, torch.full_like(i, shift_bit), best_shift)
        neg = best_u < 0  # (c, 8)
        a = abs_table[best_idx]  # (c, 8)
        wrong = (neg.sum(dim=1) % 2) != parity[best_idx]  # (c,)
        flip = (best_u.abs() * a).argmin(dim=1)  # (c,) cheapest coordinate to flip
        rows = wrong.nonzero().squeeze(1)
        neg[rows, flip[rows]] = ~neg[rows, flip[rows]]
        sign_bits = (neg[:, :7].to(torch.int64) * sign_weights).sum(dim=1)  # (c,)
        out[s : s + chunk] = best_idx | sign_bits | (best_shift << 15)
    return out


def e8p_quantize(x: Tensor, scale: float, chunk_size: int | None = None) -> Tensor:
    """Codes of ``x ≈ scale · codeword``: the nearest E8P codeword of ``x / scale``.

    Args:
        x: ``(N, 8)`` values (e.g. a rotated matrix's rows cut into 8-vectors).
        scale: positive scale (see :func:`e8p_search_scale`).
        chunk_size: passed to :func:`e8p_nearest`.

    Returns:
        int64 ``(N,)`` 16-bit codes.
    """
    _check_vectors(x)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return e8p_nearest(x / scale, chunk_size)


def e8p_dequantize(codes: Tensor, scale: float) -> Tensor:
    """``scale · e8p_decode(codes)``, ``(N, 8)`` fp32."""
    return e8p_decode(codes) * scale


# -- scale search --------------------------------------------------------------------------------
_GRID = 13  # log-spaced factors in [1/4, 4] around the RMS-matched scale (ratio 4^(1/6) ≈ 1.26)
_GOLDEN_ITERS = 12  # the bracket (two grid steps) shrinks to 0.618^12 ≈ 0.3% of its width


def _subsample(x: Tensor, seed: int, max_points: int) -> Tensor:
    """A seeded random subset of at most ``max_points`` rows of ``x``, fp32."""
    n = x.shape[0]
    if n > max_points:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed))
        x = x[torch.randperm(n, generator=gen, device=x.device)[:max_points]]
    return x.to(torch.float32)


def search_scale(
    x: Tensor,
    nearest: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    codeword_rms: float,
    *,
    seed: int = 0,
    max_points: int = 1 << 13,
) -> float:
    """Scale ``s`` minimising ``mean ‖x − s·decode(nearest(x / s))‖²`` for a fixed codebook.

    Args:
        x: ``(N, d)`` values.
        nearest: maps ``(n, d)`` points to codes of their nearest codeword.
        decode: maps codes to ``(n, d)`` codewords.
        codeword_rms: RMS per coordinate of the codebook, to centre the search.
        seed: seed of the subsample.
        max_points: the search runs on a seeded random subsample of at most this many rows.

    Returns:
        The scale (a Python float).

    Method: ``s0 = rms(x) / codeword_rms``; the MSE is evaluated on 13 log-spaced scales in
    ``[s0/4, 4 s0]``; then a golden-section search (12 steps, in log scale) in the bracket formed by
    the best grid point's two neighbours. The MSE of a nearest-point quantizer is continuous in the
    scale but not guaranteed unimodal, hence the grid first. All zeros gives scale 1.
    """
    xs = _subsample(x, seed, max_points)
    rms = float(xs.pow(2).mean().sqrt())
    if rms == 0.0 or not math.isfinite(rms):
        return 1.0
    s0 = rms / codeword_rms

    def mse(log_s: float) -> float:
        s = math.exp(log_s)
        return float((xs - s * decode(nearest(xs / s))).pow(2).sum(dim=1).mean())

    logs = [math.log(s0) + math.log(4.0) * (2 * i / (_GRID - 1) - 1) for i in range(_GRID)]
    vals = [mse(v) for v in logs]
    b = min(range(_GRID), key=vals.__getitem__)
    lo, hi = logs[max(0, b - 1)], logs[min(_GRID - 1, b + 1)]
    best_log, best_val = _golden_section(mse, lo, hi, _GOLDEN_ITERS)
    return math.exp(best_log if best_val < vals[b] else logs[b])


def _golden_section(f: Callable[[float], float], lo: float, hi: float, iters: int) -> tuple[float, float]:
    """Golden-section search of ``f`` on ``[lo, hi]``: (best point evaluated, its value)."""
    g = (math.sqrt(5) - 1) / 2
    c1, c2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = f(c1), f(c2)
    best = min((f1, c1), (f2, c2))
    for _ in range(iters):
        if f1 <= f2:
            hi, c2, f2 = c2, c1, f1
            c1 = hi - g * (hi - lo)
            f1 = f(c1)
            best = min(best, (f1, c1))
        else:
            lo, c1, f1 = c1, c2, f2
            c2 = lo + g * (hi - lo)
            f2 = f(c2)
            best = min(best, (f2, c2))
    return best[1], best[0]


@lru_cache(maxsize=1)
def _e8p_rms() -> float:
    return float(e8p_codebook().pow(2).mean().sqrt())


def e8p_search_scale(x: Tensor, *, seed: int = 0, max_points: int = 1 << 13) -> float:
    """Per-matrix E8P scale minimising the MSE (:func:`search_scale` on a seeded subsample).

    Args:
        x: ``(N, 8)`` values.
        seed: seed of the subsample.
        max_points: subsample size.
    """
    _check_vectors(x)
    return search_scale(x, e8p_nearest, e8p_decode, _e8p_rms(), seed=seed, max_points=max_points)


# -- 1-bit stage and residual quantization ------------------------------------------------------
@lru_cache(maxsize=1)
def _ball256_cpu() -> Tensor:
    """Origin, the 240 minimal vectors of E8 (norm² 2), and 15 points of norm² 4."""
    pts: list[list[float]] = [[0.0] * 8]
    # 112 integer minimal vectors: ±e_i ± e_j (i < j), in lexicographic (i, j, sign_i, sign_j) order.
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * 8
            v[i], v[j] = si, sj
            pts.append(v)
    # 128 half-integer minimal vectors: (±1/2)^8 with an even number of minus signs.
    for signs in itertools.product((0.5, -0.5), repeat=8):
        if sum(s < 0 for s in signs) % 2 == 0:
            pts.append(list(signs))
    # 15 norm² 4 points: +2e_i and -2e_i for i = 0..6, then +2e_7 (the first 15 of the 16 points ±2e_i).
    for i in range(8):
        for s in (2.0, -2.0):
            if len(pts) < 256:
                v = [0.0] * 8
                v[i] = s
                pts.append(v)
    return torch.tensor(pts, dtype=torch.float32)  # (256, 8)


def e8_ball256(device: torch.device | str | None = None) -> Tensor:
    """The 256-point 1-bit-per-weight lattice codebook, ``(256, 8)`` fp32, all points in E8:

    row 0 the origin; rows 1..112 the integer minimal vectors ``±e_i ± e_j`` (i < j); rows 113..240
    the half-integer minimal vectors ``(±½)^8`` with an even number of minus signs (240 = all the
    norm² 2 vectors of E8); rows 241..255 the norm² 4 points ``+2e_0, −2e_0, ..., +2e_6, −2e_6, +2e_7``
    (a deterministic choice of 15 of the 2160 norm² 4 vectors: the axis points, one left out).
    """
    return _ball256_cpu().to(device if device is not None else "cpu")


@lru_cache(maxsize=1)
def _ball_rms() -> float:
    return float(_ball256_cpu().pow(2).mean().sqrt())


@dataclass(frozen=True)
class _Stage:
    code_bits: int
    nearest: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]
    rms: Callable[[], float]


def _ball_nearest(x: Tensor) -> Tensor:
    return assign(x, e8_ball256(x.device))


def _ball_decode(codes: Tensor) -> Tensor:
    return e8_ball256(codes.device)[codes]


# Stage name -> code bits per 8-vector and its nearest / decode functions.
_STAGES: dict[str, _Stage] = {
    "e8p": _Stage(16, e8p_nearest, e8p_decode, _e8p_rms),
    "e8_1bit": _Stage(8, _ball_nearest, _ball_decode, _ball_rms),
}
E8_STAGES = {name: st.code_bits for name, st in _STAGES.items()}  # bits of one code per 8 weights


@dataclass
class E8ResidualResult:
    """Result of :func:`e8_residual_quantize`.

    Attributes:
        stages: stage names, e.g. ``("e8p", "e8_1bit")`` (3 bits per weight).
        codes: one int64 ``(N,)`` code tensor per stage (16-bit codes for "e8p", 8-bit for "e8_1bit").
        scales: one positive float per stage.
        reconstruction: ``(N, 8)`` fp32, ``Σ_stage scale · decode(codes)``.
        errors: mean squared error per vector (sum over the 8 coordinates) after each stage.
    """

    stages: tuple[str, ...]
    codes: list[Tensor]
    scales: list[float]
    reconstruction: Tensor
    errors: list[float]

    def code_bits_per_weight(self) -> float:
        """Bits of the codes per weight: 2 for an "e8p" stage, 1 for an "e8_1bit" stage."""
        return sum(_STAGES[s].code_bits for s in self.stages) / 8


def _check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    stages = tuple(stages)
    if not stages or any(s not in _STAGES for s in stages):
        raise ValueError(f"stages must be a non-empty sequence of {tuple(_STAGES)}, got {stages}")
    return stages


# Joint refinement of the stage scales: coordinate descent, each scale in turn by golden section
# (in log scale, within a factor 1.5 of its current value) on the final error of all stages.
_JOINT_ROUNDS = 2
_JOINT_SPAN = math.log(1.5)
_JOINT_GOLDEN_ITERS = 10  # bracket width 2 ln 1.5 shrinks to 0.618^10: about 0.6% in scale


def _run_stages(x: Tensor, stages: Sequence[str], scales: Sequence[float]) -> tuple[list[Tensor], Tensor]:
    """Apply the stages in turn to ``x`` (N, 8): (codes per stage, final residual (N, 8))."""
    residual, codes = x, []
    for name, s in zip(stages, scales):
        st = _STAGES[name]
        c = st.nearest(residual / s)  # (N,)
        residual = residual - st.decode(c) * s
        codes.append(c)
    return codes, residual


def _refine_scales_jointly(xs: Tensor, stages: tuple[str, ...], scales: list[float]) -> list[float]:
    """Coordinate descent on the per-stage scales for the error after *all* stages, on ``xs``.

    Greedy scales are not jointly optimal: a first stage with a slightly larger scale leaves a
    residual that the next stage quantizes better. A change is kept only if it lowers the final
    error on ``xs``, so the result is never worse there than the starting scales.
    """
    scales = list(scales)
    best = float(_run_stages(xs, stages, scales)[1].pow(2).sum(dim=1).mean())
    for _ in range(_JOINT_ROUNDS):
        before = xs  # residual entering stage k under the current scales
        for k in range(len(stages)):

            def final_error(log_s: float, k: int = k, before: Tensor = before) -> float:
                trial = scales[k:]
                trial[0] = math.exp(log_s)
                return float(_run_stages(before, stages[k:], trial)[1].pow(2).sum(dim=1).mean())

            centre = math.log(scales[k])
            log_s, val = _golden_section(final_error, centre - _JOINT_SPAN, centre + _JOINT_SPAN, _JOINT_GOLDEN_ITERS)
            if val < best:
                scales[k], best = math.exp(log_s), val
            before = _run_stages(before, stages[k : k + 1], scales[k : k + 1])[1]
    return scales


def e8_residual_quantize(
    x: Tensor,
    stages: Sequence[str] = ("e8p",),
    *,
    scales: Sequence[float] | None = None,
    scale_search: str = "joint",
    seed: int = 0,
    max_points: int = 1 << 13,
) -> E8ResidualResult:
    """Residual lattice quantization: each stage quantizes what the previous stages left.

    Args:
        x: ``(N, 8)`` values.
        stages: ``("e8p",)`` 2 bits, ``("e8p", "e8_1bit")`` 3 bits, ``("e8p", "e8p")`` 4 bits per weight.
        scales: fixed scales per stage (no search).
        scale_search: with ``scales=None``: ``"greedy"`` searches each stage's scale in turn on its
            own input (:func:`search_scale`: stage 1's scale minimises stage 1's error alone);
            ``"joint"`` (default) then refines all scales by coordinate descent on the error after
            the last stage (2 rounds, golden section within a factor 1.5 of each scale), on the
            same kind of seeded subsample. With one stage both are the same.
        seed: seed of the scale-search subsamples (stage k uses seed + k; the joint refinement seed).
        max_points: subsample size of the scale search.

    Returns:
        :class:`E8ResidualResult`.
    """
    _check_vectors(x)
    stages = _check_stages(stages)
    if scale_search not in ("greedy", "joint"):
        raise ValueError(f"scale_search must be 'greedy' or 'joint', got {scale_search!r}")
    x = x.to(torch.float32)
    if scales is None:
        found, residual = [], x
        for k, name in enumerate(stages):
            st = _STAGES[name]
            s = search_scale(residual, st.nearest, st.decode, st.rms(), seed=seed + k, max_points=max_points)
            residual = residual - st.decode(st.nearest(residual / s)) * s
            found.append(s)
        if scale_search == "joint" and len(stages) > 1:
            found = _refine_scales_jointly(_subsample(x, seed, max_points), stages, found)
        scales = found
    if len(scales) != len(stages):
        raise ValueError(f"{len(stages)} stages need {len(stages)} scales, got {len(scales)}")
    scales = [float(s) for s in scales]
    for k, s in enumerate(scales):
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"scale of stage {k} must be positive and finite, got {s}")
    residual = x
    recon = torch.zeros_like(x)
    codes, errors = [], []
    for name, s in zip(stages, scales):
        st = _STAGES[name]
        c = st.nearest(residual / s)  # (N,)
        part = st.decode(c) * s  # (N, 8)
        recon = recon + part
        residual = residual - part
        codes.append(c)
        errors.append(float(residual.pow(2).sum(dim=1).mean()))
    return E8ResidualResult(stages, codes, scales, recon, errors)


def e8_residual_dequantize(codes: Sequence[Tensor], scales: Sequence[float], stages: Sequence[str]) -> Tensor:
    """``Σ_stage scale · decode(codes)``, ``(N, 8)`` fp32 (inverse of :func:`e8_residual_quantize`)."""
    stages = _check_stages(stages)
    if not len(codes) == len(scales) == len(stages):
        raise ValueError(
            f"need one code tensor and one scale per stage, got {len(codes)}, {len(scales)}, {len(stages)}"
        )
    out = None
    for c, s, name in zip(codes, scales, stages):
        part = _STAGES[name].decode(c) * float(s)
        out = part if out is None else out + part
    return out
