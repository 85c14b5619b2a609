"""Choosing a backend for y = x · Q̂ᵀ (the frozen part only) and running it.

The registered backends (`BACKENDS`, each following `reallm.layer.kernels.backend.KernelBackend`), in the
order they are tried; the first whose `unsupported_reason` is None serves an "auto" call:

- "cpu_avx512" (`cpu_avx512.py`): the lookup-table matvec, 16 rows at a time with AVX-512 (C compiled
  once per machine), for tables of ≤ 256 entries and rows of whole scale blocks, 1–4 tokens on the CPU;
- "cpu" (`cpu_lut.py`): the lookup-table matvec compiled with Numba, 1–4 tokens on the CPU;
- "triton" (`triton_vq.py`): fused dequantize-matmul Triton kernel, 1–16 tokens, on CUDA (where the CPU
  backends decline); on CPU only under TRITON_INTERPRET=1, the Triton interpreter, for tests — hence after
  the CPU backends;
- "decode" (`fallback.py`): `reallm.weight.decode.decode_frozen` then a dense matmul — every stored format,
  any device, any token count (the fallback, always last).

Rotation (QuIP#-style Hadamard) is served by the fused backends exactly (`backend.FusedBackend`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.weight.config import CompressionConfig

from . import cpu_avx512, cpu_lut, fallback, triton_vq
from .backend import FrozenOperand, KernelBackend
from .prepare import PreparedFrozen

__all__ = ["BACKENDS", "PATHS", "UnsupportedPath", "available_paths", "frozen_matmul", "get_backend",
           "unsupported_reason"]

# tried in this order; "decode" serves every call and stays last
BACKENDS: tuple[KernelBackend, ...] = (cpu_avx512.BACKEND, cpu_lut.BACKEND, triton_vq.BACKEND, fallback.BACKEND)
_BY_NAME = {b.name: b for b in BACKENDS}

PATHS = ("triton", "cpu_avx512", "cpu", "decode")  # every backend's name (the order messages list them in)


class UnsupportedPath(ValueError):
    """A forced path that cannot serve the call (the message names the reason in one line)."""


def get_backend(path: str) -> KernelBackend:
    """The registered backend named `path` (ValueError for an unknown name)."""
    try:
        return _BY_NAME[path]
    except KeyError:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS} or 'auto'") from None


def unsupported_reason(
    path: str,
    config: CompressionConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    n_tokens: int,
    shape: tuple[int, int] | None = None,
) -> str | None:
    """Why `path` cannot serve this call, or None. Arguments as in `available_paths`."""
    return get_backend(path).unsupported_reason(config, device, dtype, n_tokens, shape)


def available_paths(
    config: CompressionConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    n_tokens: int,
    shape: tuple[int, int] | None = None,
) -> list[str]:
    """The paths that can serve x · Q̂ᵀ, in the order of `BACKENDS` (fastest first); "decode" is always last.

    Args:
        config: the matrix's compression configuration.
        device: device of x and of the stored tensors.
        dtype: dtype of x.
        n_tokens: number of input rows (tokens) of the call.
        shape: (p, q) of the weight; shape-dependent limits are only checked when given.
    """
    dev = torch.device(device)
    return [b.name for b in BACKENDS if b.unsupported_reason(config, dev, dtype, n_tokens, shape) is None]


def frozen_matmul(
    x: Tensor,
    stored: dict[str, Tensor],
    config: CompressionConfig,
    shape: tuple[int, int],
    shared: dict[str, Tensor] | None = None,
    *,
    path: str = "auto",
    prepared: PreparedFrozen | None = None,
    meta: dict[str, Any] | None = None,
) -> Tensor:
    """y = x · Q̂ᵀ for the frozen part Q̂ (p, q) of one matrix, without low-rank, DoRA or bias.

    Args:
        x: (..., q) input, fp32 / bf16 / fp16; the result has x's dtype (accumulated in fp32).
        stored: the frozen tensors (`ReALLMWeight.frozen`).
        config: the configuration the matrix was compressed with.
        shape: (p, q) of the weight.
        shared: shared tensors (`ReALLMWeight.shared`: a model-wide codebook).
        path: "auto" (the first of `available_paths`), or a backend's name ("triton" / "cpu_avx512" / "cpu" /
            "decode") to force it.
        prepared: `prepare(stored, config, shape, shared)` kept by the caller (built per call
            when None; only the fused paths use it).
        meta: the matrix's metadata (`ReALLMWeight.meta`), needed by "decode" for autoencoder
            matrices only.

    Returns:
        (..., p) tensor in x's dtype on x's device.

    Raises:
        ValueError: x's last dimension is not q, x and the stored tensors on different devices
            (fused paths), or an unknown path name.
        UnsupportedPath: a forced path that cannot serve this call (one line naming why).
    """
    p, q = shape
    if x.shape[-1] != q:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, the weight expects q = {q}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, q)  # (T, q)
    T = x2.shape[0]
    if path == "auto":
        path = available_paths(config, x.device, x.dtype, T, shape)[0]
    else:
        reason = unsupported_reason(path, config, x.device, x.dtype, T, shape)
        if reason is not None:
            raise UnsupportedPath(f"path {path!r} cannot serve this call: {reason}")
    chosen = fallback.BACKEND if T == 0 else get_backend(path)
    frozen = FrozenOperand(stored, config, shape, shared, meta, prepared)
    return chosen.matmul(x2, frozen).reshape(*lead, p)  # (..., p)
