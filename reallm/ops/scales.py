"""Absmax block scales with 8-bit double quantisation (method.md §2 "Scales").

The matrix is flattened row-major into blocks of ``B0 = 64`` consecutive values; the first-level scale
of a block is its absmax. Those scales are quantised again: one fp32 offset per matrix (the minimum
scale) is subtracted, then every shifted scale is stored as a ``bits``-bit code relative to one fp32
maximum per group of ``B1 = 256`` scales. Cost: ``bits * n_blocks + 32 * n_groups + 32`` bits, i.e.
8/64 + 32/(64*256) = 0.127 bit per weight plus 32 bits per matrix.

Codes are rounded *up*, so a dequantised scale is never below the true absmax of its block (up to
fp32 rounding of the last ulp): dividing the block by its dequantised scale puts every value in
[-1, 1] and no value is clipped by the quantizer that follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["block_absmax", "QuantizedScales", "quantize_scales"]


def block_absmax(x_flat: Tensor, block_size: int = 64) -> Tensor:
    """First-level scales: absmax of each block of ``block_size`` consecutive values.

    Args:
        x_flat: 1-D tensor (a matrix flattened row-major) whose numel is divisible by block_size.

    Returns:
        ``(n_blocks,)`` fp32 absmax per block, on ``x_flat.device``.
    """
    if x_flat.dim() != 1:
        raise ValueError(f"x_flat must be 1-D, got shape {tuple(x_flat.shape)}")
    if block_size < 1 or x_flat.numel() % block_size:
        raise ValueError(f"numel {x_flat.numel()} is not divisible by block_size {block_size}")
    blocks = x_flat.reshape(-1, block_size)  # (n_blocks, block_size)
    return blocks.abs().amax(dim=1).to(torch.float32)  # (n_blocks,)


@dataclass
class QuantizedScales:
    """Double-quantised block scales.

    Attributes:
        codes: uint8 ``(n_blocks,)``, code of each shifted scale in ``[0, 2**bits - 1]``.
        group_max: fp32 ``(n_groups,)``, maximum of the shifted scales of each group of
            ``group_size`` consecutive blocks (the last group may be shorter).
        offset: fp32 0-dim, the minimum scale of the matrix.
        group_size: scales per group (B1).
        bits: bits per scale code.
    """

    codes: Tensor
    group_max: Tensor
    offset: Tensor
    group_size: int
    bits: int

    def dequantize(self) -> Tensor:
        """Dequantised scales, fp32 ``(n_blocks,)``: offset + code / (2**bits - 1) * group_max."""
        n = self.codes.numel()
        levels = float((1 << self.bits) - 1)
        gmax = self.group_max.to(torch.float32).repeat_interleave(self.group_size)[:n]  # (n_blocks,)
        return self.offset.to(torch.float32) + self.codes.to(torch.float32) / levels * gmax

    def nbits(self) -> int:
        """Stored bits: bits * n_blocks + 32 * n_groups + 32 (the offset)."""
        return self.bits * self.codes.numel() + 32 * self.group_max.numel() + 32


def quantize_scales(scales: Tensor, group_size: int = 256, bits: int = 8) -> QuantizedScales:
    """Double-quantise first-level scales (method.md §2 "Scales").

    offset = min(scales); shifted = scales - offset; per group of ``group_size`` scales,
    ``group_max`` = max(shifted) (fp32); code = ceil(shifted / group_max * (2**bits - 1)), clamped to
    ``[0, 2**bits - 1]``; codes are then bumped by one where fp32 rounding would still leave the
    dequantised value below the true scale. Groups whose ``group_max`` is 0 (all scales equal to the
    offset) get code 0 and dequantise exactly to the offset; no NaN can appear.

    Args:
        scales: ``(n_blocks,)`` non-negative scales (e.g. from :func:`block_absmax`).
        group_size: B1, scales per fp32 group maximum.
        bits: bits per code, 1..8 (codes are stored as uint8).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (uint8 codes), got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    s = scales.reshape(-1).to(torch.float32)  # (n_blocks,)
    n = s.numel()
    if n == 0:
        raise ValueError("quantize_scales needs at least one scale")
    levels = (1 << bits) - 1
    offset = s.min()  # 0-dim
    shifted = (s - offset).clamp_min(0.0)  # (n_blocks,)
    n_groups = -(-n // group_size)
    padded = shifted.new_zeros(n_groups * group_size)
    padded[:n] = shifted
    group_max = padded.view(n_groups, group_size).amax(dim=1)  # (n_groups,)
    gmax = group_max.repeat_interleave(group_size)[:n]  # (n_blocks,)
    safe = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    codes = torch.ceil(shifted / safe * levels).clamp_(0, levels)  # (n_blocks,)
    codes = torch.where(gmax > 0, codes, torch.zeros_like(codes))
    # fp32 rounding: make sure offset + code / levels * gmax >= s wherever a larger code exists.
    deq = offset + codes / levels * gmax
    codes = torch.where((deq < s) & (codes < levels), codes + 1, codes)
    return QuantizedScales(
        codes=codes.to(torch.uint8),
        group_max=group_max,
        offset=offset.clone(),
        group_size=group_size,
        bits=bits,
    )
