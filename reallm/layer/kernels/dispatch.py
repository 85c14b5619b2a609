"""Choosing a path for y = x · Q̂ᵀ (the frozen part only) and running it.

Paths, fastest first where several apply:
- "triton": fused dequantize-matmul Triton kernel (CUDA; on CPU only under TRITON_INTERPRET=1,
  the Triton interpreter, for tests), 1–16 tokens;
- "cpu_avx512": the same lookup-table matvec, 16 rows at a time with AVX-512 (C compiled once per
  machine), for tables of ≤ 256 entries and rows of whole scale blocks;
- "cpu": lookup-table matvec compiled with Numba, 1–4 tokens on the CPU;
- "decode": `reallm.weight.pipeline.decode_frozen` then a dense matmul — every stored format, any
  device, any token count (the fallback).

Rotation (QuIP#-style Hadamard) is served by the fused paths exactly: with the stored matrix
X = M_L Q̂ M_Rᵀ (`reallm.ops.hadamard.rotate`), x · Q̂ᵀ = ((x M_Rᵀ) Xᵀ) M_L, i.e. the forward
transform of seed_right on x and the inverse transform of seed_left on the kernel's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.ops.hadamard import orthogonal_transform
from reallm.weight.config import CompressionConfig
from reallm.weight.pipeline import decode_frozen

from . import cpu_avx512, cpu_lut, triton_vq
from .prepare import PreparedFrozen, prepare

__all__ = ["PATHS", "UnsupportedPath", "available_paths", "unsupported_reason", "frozen_matmul"]

PATHS = ("triton", "cpu_avx512", "cpu", "decode")


class UnsupportedPath(ValueError):
    """A forced path that cannot serve the call (the message names the reason in one line)."""


def unsupported_reason(
    path: str,
    config: CompressionConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    n_tokens: int,
    shape: tuple[int, int] | None = None,
) -> str | None:
    """Why `path` cannot serve this call, or None. Arguments as in `available_paths`."""
    if path == "triton":
        return triton_vq.unsupported_reason(config, device, dtype, n_tokens, shape)
    if path == "cpu":
        return cpu_lut.unsupported_reason(config, device, dtype, n_tokens, shape)
    if path == "cpu_avx512":
        return cpu_avx512.unsupported_reason(config, device, dtype, n_tokens, shape)
    if path == "decode":
        return None  # every stored format (autoencoder matrices need their meta, see frozen_matmul)
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS} or 'auto'")


def available_paths(
    config: CompressionConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    n_tokens: int,
    shape: tuple[int, int] | None = None,
) -> list[str]:
    """The paths that can serve x · Q̂ᵀ, fastest first; "decode" is always last.

    Args:
        config: the matrix's compression configuration.
        device: device of x and of the stored tensors.
        dtype: dtype of x.
        n_tokens: number of input rows (tokens) of the call.
        shape: (p, q) of the weight; shape-dependent limits are only checked when given.
    """
    dev = torch.device(device)
    # On CUDA the Triton kernel is the fast path; on the CPU the interpreter is for tests only.
    order = ("triton",) if dev.type == "cuda" else ("cpu_avx512", "cpu", "triton")
    fast = [p for p in order if unsupported_reason(p, config, dev, dtype, n_tokens, shape) is None]
    return fast + ["decode"]


def _decode_matmul(x2: Tensor, stored, config, shape, shared, meta) -> Tensor:
    Q = decode_frozen(stored, meta or {}, config, shape, shared=shared)  # (p, q) fp32
    return (x2.to(torch.float32) @ Q.T.to(x2.device)).to(x2.dtype)


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
        path: "auto" (the first of `available_paths`), or "triton" / "cpu" / "decode" to force one.
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
    if path == "decode" or T == 0:
        return _decode_matmul(x2, stored, config, shape, shared, meta).reshape(*lead, p)
    prep = prepared if prepared is not None else prepare(stored, config, shape, shared)
    if prep.device != x.device:
        raise ValueError(f"x is on {x.device} but the stored tensors are on {prep.device}; move one of them")
    xr = x2
    if prep.rotation_seeds is not None:
        xr = orthogonal_transform(x2, prep.rotation_seeds[1], dim=-1)  # (T, q) fp32: x M_Rᵀ
    if path == "cpu":
        z = cpu_lut.cpu_frozen_matmul(xr, prep, config)  # (T, p) fp32
    elif path == "cpu_avx512":
        z = cpu_avx512.avx512_frozen_matmul(xr, prep, config)  # (T, p) fp32
    else:
        z = triton_vq.triton_frozen_matmul(xr, prep, torch.float32 if prep.rotation_seeds else x.dtype)
    if prep.rotation_seeds is not None:
        z = orthogonal_transform(z, prep.rotation_seeds[0], dim=-1, inverse=True)  # z M_L
    return z.to(x.dtype).reshape(*lead, p)
