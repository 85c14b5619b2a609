"""`rtn`: asymmetric round-to-nearest int-b with a min and a step per block (a weak baseline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.formats.base import Codec, Encoded
from reallm.formats.registry import register
from reallm.ops.lut import decode_codes
from reallm.ops.packing import pack_bits
from reallm.ops.scalar import rtn_dequantize, rtn_quantize


@register
class RoundToNearest(Codec):
    name = "rtn"
    summary = "asymmetric int-b with min / step per block (baseline)"
    absmax_scales = False  # the block's own min and step replace the absmax scale
    bit_items = {"codes": "codes", "rtn_lo": "scales", "rtn_step": "scales"}
    trainable = {"scales": ("rtn_lo", "rtn_step")}

    def validate(self, config) -> None:
        if not 1 <= config.bits <= 8:
            raise ValueError(f"rtn supports 1..8 bits, got bits={config.bits}")

    def encode(self, X: Tensor, config, *, shared=None, state=None) -> Encoded:
        codes, lo, step = rtn_quantize(X, config.bits)  # X (n_blocks, B0) unnormalised
        return Encoded({"codes": pack_bits(codes.reshape(-1), config.bits), "rtn_lo": lo, "rtn_step": step})

    def decode_range(self, stored: dict[str, Tensor], meta: dict[str, Any], config, shape, shared, start: int,
                     stop: int) -> Tensor:
        B = config.block_size
        index = torch.arange(1 << config.bits, dtype=torch.float32, device=stored["codes"].device)[:, None]
        codes = decode_codes(stored["codes"], config.bits, (stop - start) * B, index, start=start * B)
        return rtn_dequantize(codes.view(-1, B), stored["rtn_lo"][start:stop], stored["rtn_step"][start:stop])

    def stored_layout(self, config, shape, n_blocks, *, shared=False):
        """The packed codes, then each block's fp16 min and step (n_blocks,)."""
        stored, _ = super().stored_layout(config, shape, n_blocks)
        per_block = self.spec((n_blocks,), torch.float16)
        return {**stored, "rtn_lo": per_block, "rtn_step": per_block}, {}
