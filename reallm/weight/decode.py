"""Decoding the frozen part: one matrix's stored tensors → Q̂ (p, q), fp32, whole.

The encoding pipeline's stages run backwards from the format's `codec.decode` (`reallm.weight.pipeline`
runs them forwards):

    codec.decode → (n_blocks, B0) blocks × dequantised absmax scales (n_blocks, 1) → first p·q values of the
    row-major stream, (p, q) → inverse column permutation per row block → inverse Hadamard rotation → Q̂ (p, q)

A codec that is not `blockwise` ("none") returns Q̂ itself; one without `absmax_scales` (RTN) returns blocks
that need no scale. Decoding by row tiles, reading only the stored values a tile needs, is `reallm.weight.tiling`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from reallm.formats import Codec, get_codec
from reallm.ops.hadamard import unrotate
from reallm.ops.packing import unpack_bits
from reallm.ops.permutation import index_bits, unpermute_columns
from reallm.ops.scales import QuantizedScales
from reallm.weight.config import CompressionConfig

__all__ = ["decode_frozen", "n_blocks_of"]


def n_blocks_of(shape: tuple[int, int], block_size: int) -> int:
    """Blocks of `block_size` values in the row-major flattening of a (p, q) matrix (last one padded)."""
    return -(-shape[0] * shape[1] // block_size)


def decode_frozen(
    stored: dict[str, Tensor],
    meta: dict[str, Any],
    config: CompressionConfig,
    shape: tuple[int, int],
    *,
    shared: dict[str, Tensor] | None = None,
    codec: Codec | None = None,
) -> Tensor:
    """Q̂ (p, q) in fp32 from the stored tensors (the inverse of `reallm.weight.pipeline.encode_frozen`).

    `codec`: the codec of `config.quantizer` when the caller has already resolved it (looked up here otherwise).
    """
    codec = codec if codec is not None else get_codec(config.quantizer)
    p, q = shape
    n_blocks = n_blocks_of(shape, config.block_size)
    X = codec.decode(stored, meta, config, shape, n_blocks, shared or {})
    if not codec.blockwise:
        return X
    if codec.absmax_scales:
        qs = QuantizedScales(
            codes=stored["scale_codes"],
            group_max=stored["scale_group_max"],
            offset=stored["scale_offset"],
            group_size=config.scale_group,
            bits=config.scale_bits,
        )
        X = X * qs.dequantize()[:, None]  # (n_blocks, B0) × (n_blocks, 1)
    X = X.reshape(-1)[: p * q].view(p, q)
    if config.permute:
        n_row_blocks = -(-p // config.permute_rows)
        perm = unpack_bits(stored["perm"], index_bits(q), n_row_blocks * q).view(n_row_blocks, q)
        X = unpermute_columns(X, perm, config.permute_rows)
    if config.rotation == "hadamard":
        seeds = stored["rotation_seeds"].tolist()
        X = unrotate(X, int(seeds[0]), int(seeds[1]))
    return X
