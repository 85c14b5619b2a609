"""pack_bits / unpack_bits: exact round trip for every width, bit order, errors."""

import pytest
import torch

from reallm.ops.packing import pack_bits, packed_nbytes, unpack_bits

pytestmark = pytest.mark.usefixtures("single_thread")


def _reference_pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Bit-by-bit little-endian packing (code LSB first, stream bit k = bit k % 8 of byte k // 8)."""
    bits = ((codes.long().unsqueeze(1) >> torch.arange(width)) & 1).reshape(-1)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)])
    return ((bits.view(-1, 8) << torch.arange(8)).sum(1)).to(torch.uint8)


@pytest.mark.parametrize("width", list(range(1, 17)))
def test_roundtrip_every_width(width):
    g = torch.Generator().manual_seed(width)
    for n in [0, 1, 7, 8, 9, 1001, (1 << 20) + 13]:  # includes a second, ragged chunk
        codes = torch.randint(0, 1 << width, (n,), generator=g)
        packed = pack_bits(codes, width)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == packed_nbytes(n, width) == -(-n * width // 8)
        if n <= 1001:
            assert torch.equal(packed, _reference_pack(codes, width))
        out = unpack_bits(packed, width, n)
        assert out.dtype == torch.int64
        assert torch.equal(out, codes)
    extremes = torch.tensor([0, (1 << width) - 1] * 5)
    assert torch.equal(unpack_bits(pack_bits(extremes, width), width, 10), extremes)


def test_bit_order_documented():
    # width 4: code 2j is the low nibble of byte j; width 8: identity; width 2: LSB first.
    assert pack_bits(torch.tensor([1, 2, 3, 0xF]), 4).tolist() == [0x21, 0xF3]
    assert pack_bits(torch.tensor([200, 7]), 8).tolist() == [200, 7]
    assert pack_bits(torch.tensor([1, 2, 3, 0, 1]), 2).tolist() == [0b00111001, 0b01]
    assert pack_bits(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


def test_full_matrix_width6_llama_mlp():
    # codes of an 11008 x 4096 matrix with d = 2 VQ at 6 bits (b = 3): 22.5M codes
    n = 11008 * 4096 // 2
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, 6)
    assert packed.numel() == n * 6 // 8
    assert torch.equal(unpack_bits(packed, 6, n), codes.long())


def test_any_int_dtype_and_shape():
    codes = torch.arange(60, dtype=torch.int16).view(3, 4, 5) % 32
    assert torch.equal(unpack_bits(pack_bits(codes, 5), 5, 60), codes.reshape(-1).long())
    assert torch.equal(unpack_bits(pack_bits(codes.to(torch.uint8), 5), 5, 60), codes.reshape(-1).long())


def test_errors():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1]), 8)
    for bad in (0, 17):
        with pytest.raises(ValueError):
            pack_bits(torch.tensor([0]), bad)
        with pytest.raises(ValueError):
            packed_nbytes(3, bad)
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 8, 3)


@pytest.mark.parametrize("width", list(range(1, 17)))
def test_lut_decode_equals_table_of_unpacked_codes(width):
    """decode_codes reads whole bit fields through a table; it must equal table[unpack_bits(...)] for
    every width (fast widths and the fallback), any start, any length, any vector dimension."""
    from reallm.ops.lut import decode_codes

    g = torch.Generator().manual_seed(width)
    codes = torch.randint(0, 1 << width, (3001,), generator=g)
    packed = pack_bits(codes, width)
    for d in (1, 2, 4):
        table = torch.randn(1 << width, d, generator=g)
        for start, n in ((0, 3001), (1, 100), (7, 2990), (2999, 2), (1234, 0)):
            assert torch.equal(decode_codes(packed, width, n, table, start=start), table[codes[start:start + n]])
