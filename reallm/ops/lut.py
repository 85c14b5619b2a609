"""Decoding packed codes straight into values through a lookup table over whole bit fields.

`unpack_bits` then `table[codes]` makes several passes over int64 copies of the codes (one per code of a
group); this module reads the packed stream in fields of up to 12 bits that hold whole codes and maps
each field to the values of all its codes with one gather from a table built from the codebook (or level
table) itself:

    width 1, 2, 4, 8  → one byte = 8, 4, 2, 1 codes         table (256, codes·d)
    width 3, 6, 12    → three bytes = two 12-bit fields      table (4096, codes·d)
    width 16          → two bytes = one code                 table = the codebook

So a decode is a few passes over the packed bytes plus one gather that writes the values: the resident
runtime decodes every frozen weight at every forward, which makes this its hot loop. Other widths fall
back to `unpack_bits`. Results equal `table[unpack_bits(...)]` exactly (tests/test_quant_packing.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reallm.ops.packing import code_group, unpack_bits

__all__ = ["decode_codes"]

_FIELD_BITS = {1: 8, 2: 8, 4: 8, 8: 8, 3: 12, 6: 12, 12: 12}  # field size holding whole codes


def _field_table(table: Tensor, width: int, field_bits: int) -> Tensor:
    """(2^field_bits, codes·d): the values of every possible field (code i at bits [i·w, (i+1)·w))."""
    per = field_bits // width
    fields = torch.arange(1 << field_bits, device=table.device)
    codes = torch.stack([(fields >> (i * width)) & ((1 << width) - 1) for i in range(per)], dim=1)  # (F, per)
    return table[codes].reshape(1 << field_bits, -1)  # (F, per·d)


def decode_codes(packed: Tensor, width: int, n: int, table: Tensor, start: int = 0) -> Tensor:
    """`table[unpack_bits(packed, width, n, start)]`, (n, d) in table's dtype, without the int64 codes.

    Args:
        packed: the uint8 stream of `reallm.ops.packing.pack_bits`.
        width: bits per code.
        n: codes to decode, from code index `start`.
        table: (2^width, d) values of each code (a VQ codebook, NF levels as (2^b, 1)).
    """
    d = table.shape[1]
    field = _FIELD_BITS.get(width)
    if field is None and width != 16:  # widths whose groups span more than 3 bytes
        return table[unpack_bits(packed, width, n, start=start)]
    g, gbytes = code_group(width)
    lead = start % g  # start at a group boundary (byte aligned)
    first = start - lead
    total = lead + n
    n_groups = -(-total // g)
    b0 = first * width // 8
    stream = packed.reshape(-1)[b0: b0 + n_groups * gbytes]
    if stream.numel() < n_groups * gbytes:  # the last group may be cut short by the stream's end
        stream = torch.cat([stream, stream.new_zeros(n_groups * gbytes - stream.numel())])
    if width == 16:
        pairs = stream.view(-1, 2).to(torch.int32)
        codes = pairs[:, 0] | (pairs[:, 1] << 8)  # (n_groups,)
        out = table[codes]  # (n_groups, d)
    elif field == 8:  # a byte holds 8 / width whole codes
        out = _field_table(table, width, 8)[stream.to(torch.int64)]  # (bytes, per·d)
    else:  # three bytes = two 12-bit fields
        b = stream.view(-1, 3).to(torch.int32)
        word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)  # (n_groups·gbytes/3,) 24-bit words
        fields = torch.stack([word & 0xFFF, word >> 12], dim=1).reshape(-1)  # (2·words,) in stream order
        out = _field_table(table, width, 12)[fields.long()]  # (2·words, per·d)
    return out.reshape(-1, d)[lead: lead + n]
