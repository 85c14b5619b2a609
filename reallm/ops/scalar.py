"""Scalar quantizers (method.md §3): NormalFloat tables, nearest-level rounding, RTN int-b.

- NF-b: the values (already divided by their absmax block scale, so in [-1, 1]) are rounded to the
  nearest level of QLoRA's NormalFloat table.
- RTN int-b: asymmetric min/max per block, the weak baseline; lo and step are stored in fp16.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

__all__ = ["nf_levels", "nearest_level", "rtn_quantize", "rtn_dequantize"]


@cache
def _nf_table(bits: int) -> Tensor:
    n = 1 << bits
    half = 1 << (bits - 1)
    offset = 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))  # 0.9677083 for bits = 4
    # QLoRA (bitsandbytes create_normal_map): torch.linspace in fp32, normal quantiles in fp64,
    # table in fp32 normalised by its max. Following the fp32 linspace reproduces the published NF4.
    pos_p = torch.linspace(offset, 0.5, half + 1, dtype=torch.float32)[:-1].double()  # (half,)
    neg_p = torch.linspace(offset, 0.5, half, dtype=torch.float32)[:-1].double()  # (half - 1,)
    v1 = torch.special.ndtri(pos_p)  # half positive quantiles
    v3 = -torch.special.ndtri(neg_p)  # half - 1 negative quantiles
    values = torch.cat([v1, torch.zeros(1, dtype=torch.float64), v3]).to(torch.float32)  # (n,)
    values = values.sort().values
    values = values / values.max()
    return values


def nf_levels(bits: int) -> Tensor:
    """NormalFloat-b level table (QLoRA, Dettmers et al. 2023), method.md §3 "NF-b scalar".

    ``2**bits`` sorted fp32 values in [-1, 1] containing 0 (exactly one zero), built with QLoRA's
    asymmetric recipe: ``2**(bits-1)`` positive normal quantiles of ``linspace(offset, 0.5, .)``,
    ``2**(bits-1) - 1`` negative ones and 0, normalised by the maximum, with
    ``offset = 1 - 0.5 * (1 / (2 * 2**bits) + 1 / (2 * (2**bits - 1)))``. For 4 bits this is the
    published NF4 table. Supported for bits 2..8 (1 bit leaves only {0, 1}: not meaningful).

    Returns a fresh CPU tensor ``(2**bits,)``; move it with ``.to(device)``.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"NormalFloat tables are defined here for bits in 2..8, got {bits!r}")
    return _nf_table(bits).clone()


def nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level for every entry of ``x``.

    Args:
        x: any shape.
        levels: ``(L,)`` sorted ascending.

    Returns:
        int64 codes with the shape of ``x`` (searchsorted on the midpoints between consecutive
        levels; a value exactly on a midpoint goes to the lower level).
    """
    lv = levels.to(device=x.device, dtype=torch.float32).reshape(-1)  # (L,)
    mids = 0.5 * (lv[1:] + lv[:-1])  # (L - 1,)
    xf = x.to(torch.float32).contiguous()
    return torch.searchsorted(mids, xf.reshape(-1)).view(x.shape)


def _f16_next(v: Tensor, up: bool) -> Tensor:
    """Next representable fp16 value after ``v`` (fp16, finite) towards +inf (up) or -inf."""
    bits = v.view(torch.int16)
    pos = bits >= 0  # sign bit clear (includes +0)
    zero = (bits == 0) | (bits == -32768)  # +0 / -0
    if up:
        nxt = torch.where(pos, bits + 1, bits - 1)
        nxt = torch.where(zero, torch.ones_like(bits), nxt)  # smallest positive subnormal
    else:
        nxt = torch.where(pos, bits - 1, bits + 1)
        nxt = torch.where(zero, torch.full_like(bits, -32767), nxt)  # smallest negative subnormal
    return nxt.view(torch.float16)


def rtn_quantize(blocks: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest int-b with asymmetric min/max per block (method.md §3 "RTN int-b").

    ``lo`` = block min rounded *down* to fp16, ``step`` = (max - lo) / (2**bits - 1) rounded *up* to
    fp16, so the stored grid ``lo + k * step`` (k = 0..2**bits-1) covers the whole block. Codes are
    computed against these fp16 values, so :func:`rtn_dequantize` reproduces exactly the quantized
    values. A constant block gets step 0 and codes 0.

    Args:
        blocks: ``(n_blocks, B)``.
        bits: 1..16.

    Returns:
        codes int64 ``(n_blocks, B)``, lo fp16 ``(n_blocks,)``, step fp16 ``(n_blocks,)``.
    """
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be (n_blocks, B), got shape {tuple(blocks.shape)}")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    x = blocks.to(torch.float32)  # (n_blocks, B)
    levels = (1 << bits) - 1
    lo, hi = torch.aminmax(x, dim=1)  # (n_blocks,)
    lo16 = lo.to(torch.float16)
    lo16 = torch.where(lo16.float() > lo, _f16_next(lo16, up=False), lo16)
    step = (hi - lo16.float()) / levels  # (n_blocks,)
    step16 = step.to(torch.float16)
    step16 = torch.where((step16.float() < step) & (step > 0), _f16_next(step16, up=True), step16)
    lo_f, step_f = lo16.float().unsqueeze(1), step16.float().unsqueeze(1)  # (n_blocks, 1)
    safe = torch.where(step_f > 0, step_f, torch.ones_like(step_f))
    codes = torch.round((x - lo_f) / safe).clamp_(0, levels)  # (n_blocks, B)
    codes = torch.where(step_f > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int64), lo16, step16


def rtn_dequantize(codes: Tensor, lo: Tensor, step: Tensor) -> Tensor:
    """Inverse of :func:`rtn_quantize`: ``lo + codes * step`` per block, fp32 ``(n_blocks, B)``."""
    return lo.to(torch.float32).unsqueeze(1) + codes.to(torch.float32) * step.to(torch.float32).unsqueeze(1)
