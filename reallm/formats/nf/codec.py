"""`nf`: NormalFloat-b scalar quantisation of absmax-normalised blocks (QLoRA, LQ-LoRA; method.md §3)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from reallm.formats.base import Codec, Encoded
from reallm.formats.registry import register
from reallm.ops.lut import decode_codes
from reallm.ops.packing import pack_bits
from reallm.ops.scalar import nearest_level, nf_levels


@register
class NormalFloat(Codec):
    name = "nf"
    summary = "NormalFloat-b levels per value, absmax block scales (QLoRA, LQ-LoRA)"
    bit_items = {"codes": "codes"}
    table_kernels = True

    def kernel_table(self, stored: dict[str, Tensor], config, shared) -> Tensor:
        return nf_levels(config.bits).to(stored["codes"].device).view(-1, 1)  # (2^b, 1)

    def validate(self, config) -> None:
        if not 1 <= config.bits <= 8:
            raise ValueError(f"nf supports 1..8 bits, got bits={config.bits}")

    def encode(self, X: Tensor, config, *, shared=None, state=None) -> Encoded:
        codes = nearest_level(X, nf_levels(config.bits).to(X.device))  # (n_blocks, B0)
        return Encoded({"codes": pack_bits(codes.reshape(-1), config.bits)})

    def decode_range(self, stored: dict[str, Tensor], meta: dict[str, Any], config, shape, shared, start: int,
                     stop: int) -> Tensor:
        B = config.block_size
        levels = nf_levels(config.bits).to(stored["codes"].device)[:, None]  # (2^b, 1)
        return decode_codes(stored["codes"], config.bits, (stop - start) * B, levels, start=start * B).view(-1, B)
