"""Bit packing of integer codes of any width 1..16 into a uint8 stream.

Stored code tensors (VQ indices, NF / RTN codes, permutation indices) are kept as one packed byte
stream so that the bit accounting of ``docs/protocol.md`` ("Bit accounting") equals the real byte size
up to the padding of the last byte.

Bit order (little-endian throughout): code ``i`` occupies stream bits ``[i*width, (i+1)*width)``,
least significant bit first, and stream bit ``k`` is bit ``k % 8`` (value ``1 << (k % 8)``) of byte
``k // 8``. For ``width == 8`` the stream is therefore just the codes as bytes; for ``width == 4`` code
``2j`` is the low nibble and code ``2j + 1`` the high nibble of byte ``j``. The unused high bits of the
last byte are zero.

Everything runs on the codes' device with torch ops, in chunks of ``_CHUNK_CODES`` codes so that
e.g. 22.5M codes of width 8 never need more than a few hundred MB of temporaries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["code_group", "pack_bits", "packed_nbytes", "unpack_bits"]

# Number of codes processed at once; a multiple of 8 so that every chunk starts on a byte boundary
# (chunk * width bits is then a whole number of bytes). Temporaries are a few int64 copies of a
# chunk: tens of MB.
_CHUNK_CODES = 1 << 20


def _check_width(width: int) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 16:
        raise ValueError(f"width must be an int in 1..16, got {width!r}")


def packed_nbytes(n: int, width: int) -> int:
    """Number of bytes of the packed stream of ``n`` codes of ``width`` bits: ceil(n * width / 8)."""
    _check_width(width)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (n * width + 7) // 8


def code_group(width: int) -> tuple[int, int]:
    """Codes per group and bytes per group: a group of g codes spans lcm(width, 8) bits."""
    lcm = width * 8 // math.gcd(width, 8)
    return lcm // width, lcm // 8


def pack_bits(codes: Tensor, width: int) -> Tensor:
    """Pack integer ``codes`` (any shape, flattened row-major) of ``width`` bits into a uint8 stream.

    Args:
        codes: integer (or bool) tensor with values in ``[0, 2**width)``.
        width: bits per code, 1..16.

    Returns:
        1-D uint8 tensor of length ``packed_nbytes(codes.numel(), width)`` on ``codes.device``,
        little-endian bit order (see the module docstring).

    Raises:
        ValueError: width outside 1..16 or a code outside ``[0, 2**width)``.
        TypeError: floating point or complex codes.

    Implementation: ``g`` consecutive codes fill exactly ``lcm(width, 8) <= 128`` bits; they are
    OR-ed at their bit offsets into one or two int64 words per group, which are then cut into bytes.
    """
    _check_width(width)
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    out = torch.empty(packed_nbytes(n, width), dtype=torch.uint8, device=flat.device)
    if n == 0:
        return out
    limit = 1 << width
    g, gbytes = code_group(width)
    for start in range(0, n, _CHUNK_CODES):
        chunk = flat[start : start + _CHUNK_CODES].to(torch.int64)  # (c,)
        lo, hi = torch.aminmax(chunk)
        if int(lo) < 0 or int(hi) >= limit:
            raise ValueError(
                f"codes must lie in [0, {limit}) for width {width}; got range [{int(lo)}, {int(hi)}]"
            )
        c = chunk.numel()
        pad = (-c) % g  # only the last chunk can be ragged (chunks are multiples of 8, g divides 8)
        if pad:
            chunk = torch.cat([chunk, chunk.new_zeros(pad)])
        grp = chunk.view(-1, g)  # (M, g) codes of each group
        word_lo = torch.zeros_like(grp[:, 0])  # (M,) stream bits 0..63 of the group
        word_hi = torch.zeros_like(grp[:, 0])  # (M,) stream bits 64..127
        for i in range(g):
            o = i * width
            if o >= 64:
                word_hi |= grp[:, i] << (o - 64)
            else:
                word_lo |= grp[:, i] << o  # bits past 63 fall off
                if o + width > 64:
                    word_hi |= grp[:, i] >> (64 - o)
        parts = [((word_lo if j < 8 else word_hi) >> (8 * (j % 8))) & 255 for j in range(gbytes)]
        packed = torch.stack(parts, dim=1).reshape(-1)  # (M * gbytes,)
        b0 = start * width // 8  # start is a multiple of 8: byte aligned
        nb = (c * width + 7) // 8
        out[b0 : b0 + nb] = packed[:nb].to(torch.uint8)
    return out


def unpack_bits(packed: Tensor, width: int, n: int, start: int = 0) -> Tensor:
    """Exact inverse of :func:`pack_bits`: ``n`` codes of ``width`` bits from code index ``start`` on
    (default: the first ``n``), int64 ``(n,)``. Reads only the bytes those codes occupy."""
    _check_width(width)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    packed = packed.reshape(-1)
    if start:
        g, _ = code_group(width)
        aligned = start - start % g  # groups of g codes start on a byte boundary
        b0 = aligned * width // 8
        lead = start - aligned
        if packed.numel() < b0 + packed_nbytes(lead + n, width):
            raise ValueError(f"packed stream has {packed.numel()} bytes, too few for codes {start}..{start + n}")
        return unpack_bits(packed[b0:], width, lead + n)[lead:]
    need = packed_nbytes(n, width)
    if packed.numel() < need:
        raise ValueError(f"packed stream has {packed.numel()} bytes, {need} needed for {n} codes")
    out = torch.empty(n, dtype=torch.int64, device=packed.device)
    if n == 0:
        return out
    g, gbytes = code_group(width)
    mask = (1 << width) - 1
    for start in range(0, n, _CHUNK_CODES):
        c = min(_CHUNK_CODES, n - start)
        b0 = start * width // 8
        b1 = b0 + (c * width + 7) // 8
        bytes_ = packed[b0:b1].to(torch.int64)  # (nb,)
        pad = (-bytes_.numel()) % gbytes
        if pad:
            bytes_ = torch.cat([bytes_, bytes_.new_zeros(pad)])
        grp = bytes_.view(-1, gbytes)  # (M, gbytes)
        word_lo = torch.zeros_like(grp[:, 0])  # (M,)
        word_hi = torch.zeros_like(grp[:, 0])  # (M,)
        for j in range(gbytes):
            if j < 8:
                word_lo |= grp[:, j] << (8 * j)
            else:
                word_hi |= grp[:, j] << (8 * (j - 8))
        parts = []
        for i in range(g):
            o = i * width
            if o >= 64:
                parts.append((word_hi >> (o - 64)) & mask)
            elif o + width <= 64:
                parts.append((word_lo >> o) & mask)
            else:  # straddles the two words
                low_bits = 64 - o
                part = (word_lo >> o) & ((1 << low_bits) - 1)
                part |= (word_hi & ((1 << (width - low_bits)) - 1)) << low_bits
                parts.append(part)
        out[start : start + c] = torch.stack(parts, dim=1).reshape(-1)[:c]
    return out
