"""E8P lattice codebook (QuIP#): construction, bit layout, exact nearest point, scale, residual stages.

The lattice checks below are written from the definition of E8, independently of the construction
in reallm/formats/e8p/lattice.py.
"""

import itertools

import pytest
import torch

from reallm.formats.e8p.lattice import (
    E8_STAGES,
    E8P_NUM_BASE_PATTERNS,
    LEGACY_TABLE,
    e8_ball256,
    e8_residual_dequantize,
    e8_residual_quantize,
    e8p_abs_table,
    e8p_codebook,
    e8p_decode,
    e8p_dequantize,
    e8p_nearest,
    e8p_quantize,
    e8p_search_scale,
)
from reallm.ops.kmeans import kmeans
from reallm.ops.packing import pack_bits, unpack_bits

pytestmark = pytest.mark.usefixtures("single_thread")


def _on_half_grid(y: torch.Tensor) -> torch.Tensor:
    """2y as int64, after checking that y is on the half-integer grid."""
    t = y * 2
    assert torch.equal(t, t.round()), "not on the half-integer grid"
    return t.round().to(torch.int64)


def _in_d8(y: torch.Tensor) -> torch.Tensor:
    """(N, 8) -> bool (N,): integer coordinates with an even sum."""
    t = _on_half_grid(y)
    return (t % 2 == 0).all(dim=1) & (t.sum(dim=1) % 4 == 0)


def _in_d8_half(y: torch.Tensor) -> torch.Tensor:
    """(N, 8) -> bool (N,): in D8 + 1/2, i.e. every coordinate in Z + 1/2 and an even sum."""
    t = _on_half_grid(y)
    return (t % 2 == 1).all(dim=1) & (t.sum(dim=1) % 4 == 0)


def _in_e8(y: torch.Tensor) -> torch.Tensor:
    """E8 = D8 ∪ (D8 + 1/2)."""
    return _in_d8(y) | _in_d8_half(y)


def _brute_nearest(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """argmin over all 65536 codewords of the fp64 squared distances (x and cb fp64)."""
    d = (x * x).sum(dim=1, keepdim=True) - 2 * x @ cb.t() + (cb * cb).sum(dim=1)  # (N, 65536)
    return d.argmin(dim=1)


def test_abs_table_227_patterns_then_norm12_padding():
    table = e8p_abs_table()
    assert table.shape == (256, 8) and table.dtype == torch.float32
    norm2 = table.pow(2).sum(dim=1)
    assert int((norm2 <= 10).sum()) == E8P_NUM_BASE_PATTERNS == 227
    assert bool((norm2[:227] <= 10).all()) and bool((norm2[227:] == 12).all())
    assert torch.unique(table, dim=0).shape[0] == 256
    # Independent reference: all points of D8 + 1/2 with coordinates in ±{1/2, 3/2, 5/2} (enough for
    # norm² <= 10), even sum, norm² <= 10; their distinct abs patterns must be the first 227 rows.
    vals = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    grid = torch.cartesian_prod(*[vals] * 8)  # (6^8, 8)
    pts = grid[(grid.pow(2).sum(dim=1) <= 10) & _in_e8(grid)]
    ref = {tuple(r) for r in pts.abs().tolist()}
    assert len(ref) == 227
    assert {tuple(r) for r in table[:227].tolist()} == ref


# QuIP#'s E8P12 padding rows, as 2a, copied separately from the module (reference data): `get_norm12()` in
# lib/codebook/latticee8_padded12.py of github.com/Cornell-RelaxML/quip-sharp (commit 79b752f).
QUIP_NORM12_REFERENCE = [
    [3, 1, 1, 1, 3, 3, 3, 3], [1, 3, 1, 1, 3, 3, 3, 3], [1, 1, 3, 1, 3, 3, 3, 3], [1, 1, 1, 3, 3, 3, 3, 3],
    [3, 3, 3, 1, 3, 3, 1, 1], [3, 3, 3, 1, 3, 1, 3, 1], [3, 3, 3, 1, 1, 3, 3, 1], [3, 3, 3, 1, 3, 1, 1, 3],
    [3, 3, 3, 1, 1, 3, 1, 3], [3, 3, 3, 1, 1, 1, 3, 3], [3, 3, 1, 3, 3, 3, 1, 1], [3, 3, 1, 3, 3, 1, 3, 1],
    [3, 3, 1, 3, 1, 3, 3, 1], [3, 3, 1, 3, 3, 1, 1, 3], [3, 3, 1, 3, 1, 3, 1, 3], [3, 3, 1, 3, 1, 1, 3, 3],
    [3, 1, 3, 3, 3, 3, 1, 1], [3, 1, 3, 3, 3, 1, 3, 1], [3, 1, 3, 3, 1, 3, 3, 1], [3, 1, 3, 3, 3, 1, 1, 3],
    [3, 1, 3, 3, 1, 3, 1, 3], [1, 3, 3, 3, 1, 1, 3, 3], [1, 3, 3, 3, 3, 3, 1, 1], [1, 3, 3, 3, 3, 1, 3, 1],
    [1, 3, 3, 3, 1, 3, 3, 1], [1, 3, 3, 3, 3, 1, 1, 3], [1, 3, 3, 3, 1, 3, 1, 3], [1, 1, 3, 3, 1, 3, 3, 3],
    [3, 3, 1, 1, 3, 3, 3, 1],
]


def test_abs_table_is_quip_sharp_row_for_row():
    """QuIP#'s `get_abs_grid()`: torch.unique (lexicographic) of the abs values of D8 + 1/2 within norm² 10,
    then get_norm12, built here as QuIP# builds it (integer grid -4..3 plus 1/2)."""
    d8 = torch.cartesian_prod(*[torch.arange(-4, 4)] * 8).float() + 0.5  # (8^8, 8)
    keep = (d8.sum(dim=1) % 2 == 0) & (d8.pow(2).sum(dim=1) <= 10)
    base = torch.unique(d8[keep].abs(), dim=0)  # (227, 8), rows sorted lexicographically
    reference = torch.cat([base, torch.tensor(QUIP_NORM12_REFERENCE, dtype=torch.float32) / 2])
    assert torch.equal(e8p_abs_table(), reference)
    # the padding: 29 distinct norm² 12 patterns with five 3/2 and three 1/2 (QuIP#'s docstring)
    pad = e8p_abs_table()[227:]
    assert torch.unique(pad, dim=0).shape[0] == 29 and bool((pad.pow(2).sum(dim=1) == 12).all())
    assert bool(((pad == 1.5).sum(dim=1) == 5).all())


def test_legacy_table_kept_for_old_checkpoints():
    """Checkpoints written before QuIP#'s table: the same 227 base patterns ordered by norm², and the first 29
    five-3/2 norm-12 patterns in lexicographic order as padding (11 of them are QuIP#'s)."""
    legacy, quip = e8p_abs_table(table=LEGACY_TABLE), e8p_abs_table()
    assert {tuple(r) for r in legacy[:227].tolist()} == {tuple(r) for r in quip[:227].tolist()}
    n2 = legacy[:227].pow(2).sum(dim=1)
    assert bool((n2[1:] >= n2[:-1]).all())
    five = sorted(t for t in itertools.product((1, 3), repeat=8) if t.count(3) == 5)
    assert legacy[227:].mul(2).to(torch.int64).tolist() == [list(t) for t in five[:29]]
    assert len({tuple(r) for r in legacy[227:].tolist()} & {tuple(r) for r in quip[227:].tolist()}) == 11
    codes = torch.arange(1 << 16)
    assert not torch.equal(e8p_decode(codes, LEGACY_TABLE), e8p_decode(codes))
    with pytest.raises(ValueError, match="unknown E8P table"):
        e8p_decode(codes[:4], "quip")


def test_codebook_distinct_points_on_shifted_lattice():
    cb = e8p_codebook()
    assert cb.shape == (65536, 8) and cb.dtype == torch.float32
    assert torch.unique(cb, dim=0).shape[0] == 65536
    # Every codeword c = v ± 1/4 with v in D8 + 1/2 (the code's shift bit). Since 1/2·1 is in E8,
    # all of them lie in E8 + 1/4: c - 1/4 is in D8 + 1/2 (shift +1/4) or in D8 (shift -1/4).
    half, integer = _in_d8_half(cb - 0.25), _in_d8(cb - 0.25)
    assert bool((half ^ integer).all())
    assert int(half.sum()) == 32768
    assert bool(_in_d8_half(cb[half] - 0.25).all()) and bool(_in_d8_half(cb[~half] + 0.25).all())
    # Independent construction: every abs pattern with every even-sum sign pattern, shifted by ±1/4.
    table = e8p_abs_table()
    signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=8)))  # (256, 8)
    signed = (table[:, None, :] * signs[None]).reshape(-1, 8)  # (65536, 8)
    signed = signed[_in_e8(signed)]  # half of them
    ref = torch.cat([signed + 0.25, signed - 0.25])
    assert ref.shape == (65536, 8)
    assert torch.equal(torch.unique(ref, dim=0), torch.unique(cb, dim=0))


def test_decode_follows_documented_bit_layout():
    """Python reference decode of the layout in the module docstring, on random and edge codes."""
    table = e8p_abs_table().tolist()
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randint(0, 1 << 16, (500,), generator=g), torch.tensor([0, 255, 0x7FFF, 0x8000, 0xFFFF])])
    got = e8p_decode(codes)
    for code, row in zip(codes.tolist(), got.tolist()):
        a = table[code & 255]
        neg = [(code >> (8 + i)) & 1 for i in range(7)]
        parity = int(round(sum(a))) % 2
        neg.append((sum(neg) + parity) % 2)
        shift = -0.25 if code >> 15 else 0.25
        assert row == [(-v if n else v) + shift for v, n in zip(a, neg)]
    assert torch.equal(e8p_decode(codes), e8p_codebook()[codes])
    # 16-bit codes pack exactly: 2 bits per weight
    assert torch.equal(unpack_bits(pack_bits(codes, 16), 16, codes.numel()), codes)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0, 100.0])
def test_nearest_equals_brute_force(scale):
    """Random points at several scales (100: far outside the codebook, whose norms are <= 3.6)."""
    g = torch.Generator().manual_seed(int(scale * 100))
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) * scale
    cb = e8p_codebook().double()
    brute = _brute_nearest(x, cb)
    assert torch.equal(e8p_nearest(x), brute)  # fp64: no near-ties among random points
    assert torch.equal(e8p_nearest(x, chunk_size=37), brute)
    # fp32 input: the chosen codeword is at the minimum distance (up to fp32 rounding)
    x32 = x.float()
    d_got = (x32.double() - cb[e8p_nearest(x32)]).pow(2).sum(dim=1)
    d_min = (x32.double() - cb[_brute_nearest(x32.double(), cb)]).pow(2).sum(dim=1)
    assert bool((d_got <= d_min + 1e-5 * (1 + d_min)).all())


def test_nearest_of_codewords_and_near_codewords():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 1 << 16, (2000,), generator=g)
    cb = e8p_codebook()
    assert torch.equal(e8p_nearest(cb[codes]), codes)
    # points within a quarter of the packing radius of a codeword map to it (min distance is 1/2
    # between points of D8 + 1/2 + s, and sqrt(1/2) across the two shifts)
    noise = torch.randn(2000, 8, generator=g)
    noise = noise / noise.norm(dim=1, keepdim=True) * 0.2
    assert torch.equal(e8p_nearest(cb[codes] + noise), codes)


def test_quantizer_beats_kmeans_at_two_bits_on_gaussian():
    """2^18 Gaussian weights. Measured (seed 0): E8P 0.0914 MSE per weight; k-means on the same
    data, its codebook fitted to it (so extra codebook bits on top of 2): d = 4 (K 256) 0.0940,
    d = 2 (K 16) 0.1087."""
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))
    x8 = x.view(-1, 8)
    s = e8p_search_scale(x8)
    codes = e8p_quantize(x8, s)
    assert codes.dtype == torch.int64 and int(codes.max()) < 1 << 16
    mse_e8p = float((x8 - e8p_dequantize(codes, s)).pow(2).mean())
    mse_d4 = kmeans(x.view(-1, 4), 256, seed=0).inertia / 4
    mse_d2 = kmeans(x.view(-1, 2), 16, seed=0).inertia / 2
    assert mse_e8p < 0.985 * mse_d4, (mse_e8p, mse_d4)
    assert mse_e8p < 0.9 * mse_d2, (mse_e8p, mse_d2)


def test_scale_search_finds_the_minimum_of_a_fine_grid():
    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(2)) * 0.03
    s = e8p_search_scale(x)

    def mse(scale):
        return float((x - e8p_dequantize(e8p_quantize(x, scale), scale)).pow(2).mean())

    grid = torch.logspace(-2, -1, 50).tolist()  # 0.01 .. 0.1 in steps of 4.7%
    assert mse(s) <= min(mse(v) for v in grid) * 1.002
    assert 0.01 < s < 0.1


def test_ball256_is_a_lattice_codebook():
    ball = e8_ball256()
    assert ball.shape == (256, 8) and torch.unique(ball, dim=0).shape[0] == 256
    assert bool(_in_e8(ball).all())
    norm2 = ball.pow(2).sum(dim=1)
    assert int((norm2 == 0).sum()) == 1 and int((norm2 == 2).sum()) == 240 and int((norm2 == 4).sum()) == 15


def test_residual_stages_lower_the_error():
    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(3))
    # max_points = N: the scale searches see all of x, so the joint refinement cannot be worse on x
    three_g = e8_residual_quantize(x, ("e8p", "e8_1bit"), scale_search="greedy", max_points=2048)
    four_g = e8_residual_quantize(x, ("e8p", "e8p"), scale_search="greedy", max_points=2048)
    three = e8_residual_quantize(x, ("e8p", "e8_1bit"), max_points=2048)
    four = e8_residual_quantize(x, ("e8p", "e8p"), max_points=2048)
    two = e8_residual_quantize(x, ("e8p",), scales=three_g.scales[:1])
    assert (two.code_bits_per_weight(), three.code_bits_per_weight(), four.code_bits_per_weight()) == (2, 3, 4)
    assert E8_STAGES == {"e8p": 16, "e8_1bit": 8}
    assert three_g.errors[0] == two.errors[0] == four_g.errors[0]  # greedy: the same first stage
    assert three_g.errors[1] < 0.4 * two.errors[0]
    assert four_g.errors[1] < 0.15 * two.errors[0]
    # joint scales: never worse than greedy on the searched points; clearly better at 4 bits
    # (measured on 2^15 Gaussian vectors: 0.00964 -> 0.00835 MSE per weight)
    assert three.errors[-1] <= three_g.errors[-1] * (1 + 1e-6)
    assert four.errors[-1] < 0.95 * four_g.errors[-1]
    for r in (two, three_g, four_g, three, four):
        assert r.errors == sorted(r.errors, reverse=True)
        mse = float((x - r.reconstruction).pow(2).sum(dim=1).mean())
        assert abs(mse - r.errors[-1]) <= 1e-5 * mse
        assert torch.equal(e8_residual_dequantize(r.codes, r.scales, r.stages), r.reconstruction)
    assert int(three.codes[1].max()) < 256
    # fixed scales reproduce the searched ones exactly
    again = e8_residual_quantize(x, three.stages, scales=three.scales)
    assert all(torch.equal(a, b) for a, b in zip(again.codes, three.codes))


def test_cached_codebook_per_device_and_bad_input():
    assert e8p_codebook() is e8p_codebook("cpu")
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        e8p_nearest(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="65536"):
        e8p_decode(torch.tensor([1 << 16]))
    with pytest.raises(ValueError, match="positive"):
        e8p_quantize(torch.zeros(2, 8), 0.0)
    with pytest.raises(ValueError, match="stages"):
        e8_residual_quantize(torch.zeros(2, 8), ("e8p", "nf4"))
    with pytest.raises(ValueError, match="scale_search"):
        e8_residual_quantize(torch.zeros(2, 8), scale_search="best")
    with pytest.raises(ValueError, match="2 scales"):
        e8_residual_quantize(torch.zeros(2, 8), ("e8p", "e8p"), scales=[1.0])
