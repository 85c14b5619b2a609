"""Runtime row tiling: rows [r0, r1) of the frozen part Q̂ (p, q), decoded from only the stored values they need.

A compressed linear decodes Q̂ tile by tile in its forward pass instead of keeping a dense (p, q) copy:

    plan = tile_plan(stored, config, shape)            # once per pass: scales (n_blocks,), inverse permutation
    for r0, r1 in row_tiles(shape, config):            # tiles of ~max_elems values, aligned to permute_rows
        Q_tile = decode_frozen_rows(stored, meta, config, shape, r0, r1, plan=plan)   # (r1 − r0, q) fp32

Each tile equals `decode_frozen(...)[r0:r1]` (`reallm.weight.decode`). A Hadamard rotation mixes every row into
every other, so a rotated matrix is one tile, decoded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reallm.formats import Codec, get_codec
from reallm.ops.lut import decode_codes
from reallm.ops.permutation import index_bits
from reallm.weight.config import CompressionConfig
from reallm.weight.decode import decode_frozen, n_blocks_of

__all__ = ["TilePlan", "decode_frozen_rows", "row_tileable", "row_tiles", "tile_plan"]


def _block_scales(stored: dict[str, Tensor], config: CompressionConfig, b0: int, b1: int) -> Tensor:
    """Dequantised absmax scales of blocks [b0, b1), fp32 (b1 − b0,) (`QuantizedScales.dequantize` on a range)."""
    levels = float((1 << config.scale_bits) - 1)
    group = torch.arange(b0, b1, device=stored["scale_codes"].device) // config.scale_group
    gmax = stored["scale_group_max"].to(torch.float32)[group]
    return stored["scale_offset"].to(torch.float32) + stored["scale_codes"][b0:b1].to(torch.float32) / levels * gmax


def row_tileable(config: CompressionConfig) -> bool:
    """Whether Q̂ can be decoded in row tiles (a two-sided rotation mixes every row into every other)."""
    return config.rotation != "hadamard"


def row_tiles(
    shape: tuple[int, int], config: CompressionConfig, max_elems: int = 1 << 22, *, codec: Codec | None = None
) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) that `decode_frozen_rows` decodes, each of at most ~`max_elems` values (at least
    one permutation row block); one range covering all rows when the format cannot be tiled.
    `codec`: the codec of `config.quantizer` if already resolved."""
    p, q = shape
    if not row_tileable(config):
        return [(0, p)]
    codec = codec if codec is not None else get_codec(config.quantizer)
    if not codec.decodes_ranges:
        return [(0, p)]
    align = config.permute_rows if config.permute else 1
    rows = max(align, (max_elems // max(1, q)) // align * align)
    return [(r, min(p, r + rows)) for r in range(0, p, rows)]


@dataclass
class TilePlan:
    """What every row tile of one decode shares, computed once per pass over the tiles (all small): the
    matrix's codec, the dequantised block scales (n_blocks,) and the inverse column permutation (n_row_blocks, q)."""

    scales: Tensor | None = None
    inv_perm: Tensor | None = None
    codec: Codec | None = None


def tile_plan(
    stored: dict[str, Tensor], config: CompressionConfig, shape: tuple[int, int], *, codec: Codec | None = None
) -> TilePlan:
    """The `TilePlan` of one matrix's stored tensors (`codec`: the codec of `config.quantizer` if already resolved)."""
    p, q = shape
    codec = codec if codec is not None else get_codec(config.quantizer)
    plan = TilePlan(codec=codec)
    if codec.blockwise and codec.absmax_scales:
        plan.scales = _block_scales(stored, config, 0, n_blocks_of(shape, config.block_size))
    if config.permute:
        n_row_blocks = -(-p // config.permute_rows)
        index = torch.arange(1 << index_bits(q), device=stored["perm"].device)[:, None]
        perm = decode_codes(stored["perm"], index_bits(q), n_row_blocks * q, index).view(n_row_blocks, q)
        plan.inv_perm = torch.argsort(perm, dim=1)  # out[:, perm[j]] = X[:, j]  ⇔  out = X[:, inv_perm]
    return plan


def decode_frozen_rows(
    stored: dict[str, Tensor],
    meta: dict[str, Any],
    config: CompressionConfig,
    shape: tuple[int, int],
    r0: int,
    r1: int,
    *,
    shared: dict[str, Tensor] | None = None,
    plan: TilePlan | None = None,
    codec: Codec | None = None,
) -> Tensor:
    """Rows [r0, r1) of Q̂, fp32 (r1 − r0, q), reading only the stored values they need (equal to
    `decode_frozen(...)[r0:r1]`). With a column permutation, r0 must be a multiple of `permute_rows`.
    `plan` (`tile_plan`) saves recomputing the shared parts, the codec among them, when decoding several
    tiles; `codec`: the codec of `config.quantizer` if already resolved (without a plan)."""
    p, q = shape
    if codec is None:
        codec = plan.codec if plan is not None and plan.codec is not None else get_codec(config.quantizer)
    if not row_tileable(config):
        return decode_frozen(stored, meta, config, shape, shared=shared, codec=codec)[r0:r1]
    if not codec.blockwise:
        return codec.decode_range(stored, meta, config, shape, shared or {}, r0, r1)
    plan = plan or tile_plan(stored, config, shape, codec=codec)
    B = config.block_size
    lo, hi = r0 * q, r1 * q  # the rows' span of the row-major stream
    b0, b1 = lo // B, -(-hi // B)  # blocks covering it (a block may straddle two tiles)
    X = codec.decode_range(stored, meta, config, shape, shared or {}, b0, b1)  # (b1 − b0, B)
    if plan.scales is not None:
        X = X.mul_(plan.scales[b0:b1, None])
    X = X.reshape(-1)[lo - b0 * B: hi - b0 * B].view(r1 - r0, q)
    if plan.inv_perm is not None:
        rows = config.permute_rows
        if r0 % rows:
            raise ValueError(f"row tile start {r0} is not a multiple of permute_rows={rows}")
        k0, k1 = r0 // rows, -(-r1 // rows)  # permutation row blocks of the tile
        n = r1 - r0
        pad = (k1 - k0) * rows - n
        Xb = X if not pad else torch.cat([X, X.new_zeros(pad, q)])
        index = plan.inv_perm[k0:k1].unsqueeze(1).expand(-1, rows, -1)  # (blocks, rows, q)
        X = torch.gather(Xb.view(k1 - k0, rows, q), 2, index).view(-1, q)[:n]
    return X
