"""NormalFloat tables, nearest-level rounding, RTN int-b and double-quantised block scales."""

import pytest
import torch

from reallm.ops.scalar import nearest_level, nf_levels, rtn_dequantize, rtn_quantize
from reallm.ops.scales import QuantizedScales, block_absmax, quantize_scales

# QLoRA's published NF4 table (bitsandbytes / QLoRA paper appendix).
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_nf4_equals_published_table():
    table = nf_levels(4)
    assert table.dtype == torch.float32 and table.shape == (16,)
    assert torch.allclose(table, torch.tensor(NF4_PUBLISHED), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_nf_tables_shape(bits):
    t = nf_levels(bits)
    assert t.shape == (1 << bits,)
    assert t[0] == -1.0 and t[-1] == 1.0
    assert (t[1:] > t[:-1]).all()
    assert int((t == 0).sum()) == 1
    # asymmetric: 2**(bits-1) positive levels, 2**(bits-1) - 1 negative ones
    assert int((t > 0).sum()) == 1 << (bits - 1)
    assert int((t < 0).sum()) == (1 << (bits - 1)) - 1


def test_nf_bits_validation():
    with pytest.raises(ValueError):
        nf_levels(1)
    with pytest.raises(ValueError):
        nf_levels(9)


def test_nearest_level_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    levels = nf_levels(3)
    x = torch.rand(37, 41, generator=g) * 2.2 - 1.1
    codes = nearest_level(x, levels)
    assert codes.shape == x.shape and codes.dtype == torch.int64
    brute = (x.unsqueeze(-1) - levels).abs().argmin(-1)
    assert torch.equal(codes, brute)
    # exactly on a midpoint -> the lower level
    mid = 0.5 * (levels[3] + levels[4])
    assert int(nearest_level(mid.view(1), levels)) == 3


def _nf_blocks_error(x: torch.Tensor, bits: int) -> float:
    blocks = x.reshape(-1, 64)
    scale = block_absmax(blocks.reshape(-1), 64).unsqueeze(1)
    levels = nf_levels(bits)
    xhat = levels[nearest_level(blocks / scale, levels)] * scale
    return float(((xhat - blocks) ** 2).mean())


def _rtn_blocks_error(x: torch.Tensor, bits: int, block: int = 64) -> float:
    blocks = x.reshape(-1, block)
    codes, lo, step = rtn_quantize(blocks, bits)
    return float(((rtn_dequantize(codes, lo, step) - blocks) ** 2).mean())


def test_nf3_beats_rtn3_on_gaussian_at_equal_bits():
    """NF3 with absmax blocks of 64 costs 3 + 8/64 + 32/(64*256) = 3.127 bits per weight.

    RTN3 with min/max blocks of B stores two fp16 values per block: 3 + 32/B bits, i.e. 3.5 bits at
    B = 64, 3.25 at B = 128 and 3.125 at B = 256. At the same (or a larger) bit cost NF3 has a clearly
    lower MSE on Gaussian data. At the *same block size* 64, RTN3 spends 0.37 more bits per weight
    and its two-parameter grid is slightly better (measured: MSE 0.0369 vs 0.0390 for NF3): the
    NormalFloat advantage is an advantage per stored bit, not per block.
    """
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    nf3 = _nf_blocks_error(x, 3)
    rtn3_b256 = _rtn_blocks_error(x, 3, 256)  # 3.125 bits per weight
    rtn3_b128 = _rtn_blocks_error(x, 3, 128)  # 3.25 bits per weight
    rtn3_b64 = _rtn_blocks_error(x, 3, 64)  # 3.5 bits per weight
    assert nf3 < 0.8 * rtn3_b256, (nf3, rtn3_b256)
    assert nf3 < 0.9 * rtn3_b128, (nf3, rtn3_b128)
    assert 0.9 * nf3 < rtn3_b64 < nf3, (nf3, rtn3_b64)  # documented above
    # more bits always help
    assert _nf_blocks_error(x, 4) < nf3 < _nf_blocks_error(x, 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_roundtrip_exact_and_bounded(bits):
    g = torch.Generator().manual_seed(bits)
    blocks = torch.randn(500, 64, generator=g) * 0.02 + 0.001
    blocks[3] = 0.5  # constant block
    codes, lo, step = rtn_quantize(blocks, bits)
    assert codes.dtype == torch.int64 and codes.shape == blocks.shape
    assert lo.dtype == torch.float16 and step.dtype == torch.float16 and lo.shape == (500,)
    assert int(codes.min()) >= 0 and int(codes.max()) <= (1 << bits) - 1
    deq = rtn_dequantize(codes, lo, step)
    assert deq.dtype == torch.float32
    # exactly what the stored fp16 lo/step give
    expected = lo.float()[:, None] + codes.float() * step.float()[:, None]
    assert torch.equal(deq, expected)
    # the fp16 grid covers every block: error at most half a step (+ fp32 rounding)
    err = (deq - blocks).abs()
    assert (err <= step.float()[:, None] / 2 + 1e-6).all()
    assert float(err[3].max()) <= 1e-3  # the constant block: lo is 0.5 rounded down to fp16


def test_block_absmax():
    x = torch.arange(-64.0, 64.0)
    s = block_absmax(x, 64)
    assert s.dtype == torch.float32 and s.tolist() == [64.0, 63.0]
    with pytest.raises(ValueError):
        block_absmax(torch.zeros(65), 64)


def test_quantize_scales_never_below_and_accurate():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 1024, generator=g) * 0.02
    s = block_absmax(w.reshape(-1), 64)  # 4800 blocks: 19 groups, last one partial
    qs = quantize_scales(s, group_size=256, bits=8)
    assert isinstance(qs, QuantizedScales)
    assert qs.codes.dtype == torch.uint8 and qs.codes.shape == s.shape
    assert qs.group_max.dtype == torch.float32 and qs.group_max.shape == (19,)
    assert qs.offset.dim() == 0 and qs.offset.dtype == torch.float32
    deq = qs.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == s.shape
    assert (deq >= s * (1 - 1e-6)).all()
    # 8-bit codes: at most one code step above the true value
    step = qs.group_max.repeat_interleave(256)[: s.numel()] / 255
    assert (deq - s <= step * (1 + 1e-4) + 1e-9).all()
    assert qs.nbits() == 8 * 4800 + 32 * 19 + 32


def test_quantize_scales_degenerate_inputs():
    flat = torch.full((512,), 0.3)
    qs = quantize_scales(flat)
    deq = qs.dequantize()
    assert torch.isfinite(deq).all() and torch.allclose(deq, flat)
    s = torch.cat([torch.full((256,), 0.1), torch.linspace(0.1, 0.5, 256)])  # first group has max 0
    deq = quantize_scales(s, group_size=256, bits=4).dequantize()
    assert torch.isfinite(deq).all() and (deq >= s * (1 - 1e-6)).all()
    zeros = quantize_scales(torch.zeros(10)).dequantize()
    assert torch.equal(zeros, torch.zeros(10))
    qs = quantize_scales(torch.rand(100), group_size=256, bits=3)
    assert qs.nbits() == 3 * 100 + 32 + 32
