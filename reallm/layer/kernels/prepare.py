"""Per-matrix preprocessing shared by the fused kernels (`PreparedFrozen`, `prepare`).

Everything here depends only on the stored tensors of one frozen part (see
`reallm.weight.pipeline.encode_frozen`), so a layer can compute it once and keep it:

- the packed code stream is *referenced*, never copied or unpacked (the kernels read it as stored);
- the value table: the NF level table (2^b, 1) or the VQ codebook (K, d), in fp32;
- the double-quantised scales are referenced as stored (uint8 codes, fp32 group maxima, offset):
  the kernels dequantise them on the fly, so they read 8 bits per block of B0 values, not 32;
- the column permutation, unpacked to int16 (int32 when q > 32767): (n_row_blocks, q);
- the two rotation seeds, when the matrix was rotated.

Bytes held beyond the stored tensors, per weight of a p × q matrix: 2 / permute_rows for the
permutation (0.0156 byte = 0.125 bit at 128 rows; 4 / permute_rows when q > 32767), plus the table
(4·K·d bytes per matrix: 1 KB for VQ b3 d2, 4 KB for b2 d4, 2 MB for b2 d8) — far below the
2 bytes per weight of a dense fp16 copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reallm.formats import get_codec
from reallm.ops.packing import packed_nbytes, unpack_bits
from reallm.ops.permutation import index_bits
from reallm.weight.config import CompressionConfig

__all__ = ["KERNEL_DTYPES", "PreparedFrozen", "common_reason", "fused_format", "prepare", "values_per_code"]

def fused_format(config: CompressionConfig) -> bool:
    """Whether the fused kernels read this stored format directly (its codec has `table_kernels`:
    packed codes indexing a value table, with absmax block scales); others are decoded."""
    return get_codec(config.quantizer).table_kernels


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # input dtypes every fused path takes


def common_reason(config: CompressionConfig, dtype: torch.dtype, n_tokens: int, max_tokens: int,
                  path: str) -> str | None:
    """The checks every fused path makes (format, input dtype, token count, scale codes in uint8): why
    `path` cannot serve the call, or None."""
    if not fused_format(config):
        return f"format {config.quantizer!r} is not read by the fused kernels (no value table)"
    if dtype not in KERNEL_DTYPES:
        return f"x dtype {dtype} is not one of float32, bfloat16, float16"
    if not 1 <= n_tokens <= max_tokens:
        return f"the {path} path serves 1..{max_tokens} tokens, got {n_tokens}"
    if config.scale_bits > 8:
        return f"scale_bits {config.scale_bits} > 8"
    return None


def values_per_code(config: CompressionConfig) -> int:
    """1 for a scalar table (NF levels: the kernels may look up several codes at once), d for vectors."""
    return get_codec(config.quantizer).vector_dim(config)


@dataclass
class PreparedFrozen:
    """One frozen part in the form the fused kernels read (see the module docstring for its size).

    Attributes:
        quantizer: the stored format (one whose codec has `table_kernels`: NF, VQ).
        shape: (p, q) of the weight (out × in).
        bits: b, bits per coordinate.
        values_per_code: 1 for NF (one level per code), d for VQ (one d-vector per code).
        code_width: bits of one stored code (b for NF, b·d for VQ).
        codes: the packed uint8 code stream exactly as stored (little-endian bit order).
        table: fp32 (2^code_width, values_per_code): NF levels or the VQ codebook.
        block_size: B0, values per absmax scale block (row-major flattening, blocks cross rows).
        scale_codes: uint8 (n_blocks,), scale_group_max: fp32 (n_groups,), scale_offset: fp32 0-dim.
        scale_group: B1, scale blocks per group maximum; scale_bits: bits of the scale codes.
        perm: (n_row_blocks, q) int16/int32 column order per row block, or None;
            perm[b, j] = original column stored at position j in row block b.
        permute_rows: rows per permutation block.
        rotation_seeds: (seed_left, seed_right) of the Hadamard rotation, or None.
        cache: derived tables of at most a few KB that a path builds once (held_bytes counts them).
    """

    quantizer: str
    shape: tuple[int, int]
    bits: int
    values_per_code: int
    code_width: int
    codes: Tensor
    table: Tensor
    block_size: int
    scale_codes: Tensor
    scale_group_max: Tensor
    scale_offset: Tensor
    scale_group: int
    scale_bits: int
    perm: Tensor | None
    permute_rows: int
    rotation_seeds: tuple[int, int] | None
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Small derived tables a path builds on first use (e.g. the CPU path's NF product table)."""

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def n_blocks(self) -> int:
        p, q = self.shape
        return -(-p * q // self.block_size)

    def held_bytes(self) -> int:
        """Bytes this object holds beyond the stored tensors it references (table + permutation)."""
        extra = self.table.numel() * self.table.element_size()
        extra += sum(t.numel() * t.element_size() for t in self.cache.values() if isinstance(t, Tensor))
        if self.perm is not None:
            extra += self.perm.numel() * self.perm.element_size()
        return extra

    def read_bytes(self) -> int:
        """Bytes of the frozen part one matmul reads (codes, table, scales, permutation)."""
        n = self.codes.numel() + self.scale_codes.numel()
        n += self.scale_group_max.numel() * 4 + self.held_bytes()
        return n


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"cannot prepare the frozen part: {msg}")


def prepare(
    stored: dict[str, Tensor],
    config: CompressionConfig,
    shape: tuple[int, int],
    shared: dict[str, Tensor] | None = None,
) -> PreparedFrozen:
    """Build the `PreparedFrozen` of one NF or VQ frozen part.

    Args:
        stored: the frozen tensors as written by `encode_frozen` (codes, scale_codes, ...).
        config: the configuration the matrix was compressed with.
        shape: (p, q) of the weight.
        shared: tensors shared across matrices (a model-wide VQ codebook under "codebook").

    Raises:
        ValueError: a quantizer the kernels do not read, or stored tensors missing / of the
            wrong size (one line naming what).
    """
    _check(fused_format(config), f"format {config.quantizer!r} has no fused kernel (its codec has no table_kernels)")
    p, q = shape
    B = config.block_size
    n_blocks = -(-p * q // B)
    for key in ("codes", "scale_codes", "scale_group_max", "scale_offset"):
        _check(key in stored, f"stored tensor {key!r} is missing")
    codes = stored["codes"].reshape(-1)
    _check(codes.dtype == torch.uint8, f"codes must be uint8, got {codes.dtype}")
    codec = get_codec(config.quantizer)
    vpc, width = codec.vector_dim(config), codec.code_width(config)
    try:
        table = codec.kernel_table(stored, config, shared or {})  # (2^width, vpc) fp32
    except KeyError as e:
        raise ValueError(f"cannot prepare the frozen part: {e.args[0]}") from None
    _check(tuple(table.shape) == (1 << width, vpc),
           f"value table must be ({1 << width}, {vpc}), got {tuple(table.shape)}")
    n_codes = n_blocks * B // vpc
    _check(codes.numel() >= packed_nbytes(n_codes, width),
           f"codes hold {codes.numel()} bytes, {packed_nbytes(n_codes, width)} needed")
    scale_codes = stored["scale_codes"].reshape(-1)
    _check(scale_codes.numel() == n_blocks and scale_codes.dtype == torch.uint8,
           f"scale_codes must be uint8 ({n_blocks},), got {scale_codes.dtype} {tuple(scale_codes.shape)}")
    _check(config.scale_bits <= 8, f"scale_bits {config.scale_bits} > 8 cannot be stored in uint8")
    perm = None
    if config.permute:
        _check("perm" in stored, "stored tensor 'perm' is missing (config.permute is on)")
        n_row_blocks = -(-p // config.permute_rows)
        idx = unpack_bits(stored["perm"], index_bits(q), n_row_blocks * q).view(n_row_blocks, q)
        perm = idx.to(torch.int16 if q <= 32767 else torch.int32).contiguous()  # (n_row_blocks, q)
    seeds = None
    if config.rotation == "hadamard":
        _check("rotation_seeds" in stored, "stored tensor 'rotation_seeds' is missing")
        left, right = (int(s) for s in stored["rotation_seeds"].tolist())
        seeds = (left, right)
    return PreparedFrozen(
        quantizer=config.quantizer,
        shape=(p, q),
        bits=config.bits,
        values_per_code=vpc,
        code_width=width,
        codes=codes,
        table=table,
        block_size=B,
        scale_codes=scale_codes,
        scale_group_max=stored["scale_group_max"].reshape(-1).to(torch.float32),
        scale_offset=stored["scale_offset"].reshape(()).to(torch.float32),
        scale_group=config.scale_group,
        scale_bits=config.scale_bits,
        perm=perm,
        permute_rows=config.permute_rows,
        rotation_seeds=seeds,
    )
