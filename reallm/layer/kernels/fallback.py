"""Backend "decode": the plain decode of Q̂ then a dense matmul — the fallback, always available.

Serves every stored format (autoencoder matrices need their meta), any device, any dtype, any token count:
`reallm.weight.decode.decode_frozen` builds Q̂ (p, q) in fp32 and x is multiplied with it in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reallm.weight.config import CompressionConfig
from reallm.weight.decode import decode_frozen

from .backend import FrozenOperand, KernelBackend

__all__ = ["BACKEND", "DecodeBackend"]


class DecodeBackend(KernelBackend):
    name = "decode"

    def unsupported_reason(self, config: CompressionConfig, device: torch.device | str, dtype: torch.dtype,
                           n_tokens: int, shape: tuple[int, int] | None = None) -> str | None:
        return None  # every stored format (autoencoder matrices need their meta, see frozen_matmul)

    def matmul(self, x: Tensor, frozen: FrozenOperand) -> Tensor:  # x (T, q) → (T, p)
        Q = decode_frozen(frozen.stored, frozen.meta or {}, frozen.config, frozen.shape,
                          shared=frozen.shared)  # (p, q) fp32
        return (x.to(torch.float32) @ Q.T.to(x.device)).to(x.dtype)


BACKEND = DecodeBackend()
