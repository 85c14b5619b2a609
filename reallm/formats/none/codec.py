"""`none`: the residual kept in fp16 (the LoRA / fp16 rows of method.md's Table 6)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.formats.base import Codec, Encoded
from reallm.formats.registry import register


@register
class Dense16(Codec):
    name = "none"
    summary = "the residual in fp16, unquantised (LoRA / fp16 rows)"
    blockwise = False  # no rotation, permutation or scales: nothing is quantised
    absmax_scales = False
    bit_items = {"dense": "dense"}

    def nominal_bits(self, config) -> float:
        return 16.0

    def code_width(self, config) -> int:
        return 16

    def encode(self, X: Tensor, config, *, shared=None, state=None) -> Encoded:
        return Encoded({"dense": X.to(torch.float16).contiguous()})

    def decode_range(self, stored: dict[str, Tensor], meta: dict[str, Any], config, shape, shared, start: int,
                     stop: int) -> Tensor:
        return stored["dense"][start:stop].float()  # rows (stop − start, q)

    def stored_layout(self, config, shape, n_blocks, *, shared=False):
        return {"dense": self.spec(shape, torch.float16)}, {}  # the residual (p, q) itself
