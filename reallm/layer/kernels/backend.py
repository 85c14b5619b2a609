"""The one protocol every kernel backend follows (`KernelBackend`), and what a backend computes on.

A backend is one way to compute y = x · Q̂ᵀ for the frozen part Q̂ (p, q) of one matrix. It declares

- `name`: the path name callers force it with ("triton", "cpu_avx512", "cpu", "decode");
- `unavailable_reason()` / `available()`: whether this process and machine can run it at all (a library,
  the CPU's instruction set, a compiler), whatever the matrix;
- `unsupported_reason(config, device, dtype, n_tokens, shape)`: why it cannot serve one call (the format,
  the device, x's dtype, the token count, the shape; its availability too), or None;
- `matmul(x, frozen)`: x (T, q) → y (T, p) in x's dtype.

`reallm.layer.kernels.dispatch` holds the registered backends in the order it tries them. The fused
backends (`FusedBackend`: Triton, AVX-512 C, Numba) read the packed codes through a `PreparedFrozen` and
only implement `kernel`; the Hadamard rotation is applied around it here, exactly: with the stored matrix
X = M_L Q̂ M_Rᵀ (`reallm.ops.hadamard.rotate`), x · Q̂ᵀ = ((x M_Rᵀ) Xᵀ) M_L, i.e. the forward transform of
seed_right on x and the inverse transform of seed_left on the kernel's output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from reallm.ops.hadamard import orthogonal_transform
from reallm.weight.config import CompressionConfig

from .prepare import PreparedFrozen, prepare

__all__ = ["FrozenOperand", "FusedBackend", "KernelBackend"]


@dataclass
class FrozenOperand:
    """The frozen part of one matrix as a backend receives it.

    Attributes:
        stored: the frozen tensors (`ReALLMWeight.frozen`).
        config: the configuration the matrix was compressed with.
        shape: (p, q) of the weight.
        shared: shared tensors (`ReALLMWeight.shared`: a model-wide codebook), or None.
        meta: the matrix's metadata (`ReALLMWeight.meta`; the decode backend needs it for autoencoder
            matrices only), or None.
        prepared: `prepare(stored, config, shape, shared)` kept by the caller, or None (built when a fused
            backend needs it).
    """

    stored: dict[str, Tensor]
    config: CompressionConfig
    shape: tuple[int, int]
    shared: dict[str, Tensor] | None = None
    meta: dict[str, Any] | None = None
    prepared: PreparedFrozen | None = None

    def prepare(self) -> PreparedFrozen:
        """The caller's `PreparedFrozen`, or one built now."""
        if self.prepared is not None:
            return self.prepared
        return prepare(self.stored, self.config, self.shape, self.shared)


class KernelBackend(ABC):
    """One way to compute y = x · Q̂ᵀ (see the module docstring for the protocol)."""

    name: ClassVar[str]

    def unavailable_reason(self) -> str | None:
        """Why this process / machine cannot run this backend at all, or None."""
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

    @abstractmethod
    def unsupported_reason(
        self,
        config: CompressionConfig,
        device: torch.device | str,
        dtype: torch.dtype,
        n_tokens: int,
        shape: tuple[int, int] | None = None,
    ) -> str | None:
        """Why this backend cannot serve the call, or None.

        Args:
            config: the matrix's compression configuration.
            device: device of x and of the stored tensors.
            dtype: dtype of x.
            n_tokens: rows of x (tokens in the batch).
            shape: (p, q) of the weight; shape-dependent limits are only checked when given.
        """

    @abstractmethod
    def matmul(self, x: Tensor, frozen: FrozenOperand) -> Tensor:
        """y = x · Q̂ᵀ: x (T, q) → (T, p) in x's dtype, on x's device."""


class FusedBackend(KernelBackend):
    """A backend whose kernel reads the packed codes (a `PreparedFrozen`) without decoding Q̂."""

    @abstractmethod
    def kernel(self, x: Tensor, prep: PreparedFrozen, config: CompressionConfig, out_dtype: torch.dtype) -> Tensor:
        """z = x · X̂ᵀ (T, p), X̂ the stored (rotated) matrix with its permutation undone.

        Args:
            x: (T, q) on the prepared tensors' device, already rotated when the matrix is.
            prep: the prepared frozen part.
            config: its configuration.
            out_dtype: the dtype the caller wants (fp32 for a rotated matrix, else x's); a backend may
                return fp32 instead (the result is cast).
        """

    def matmul(self, x: Tensor, frozen: FrozenOperand) -> Tensor:
        prep = frozen.prepare()
        if prep.device != x.device:
            raise ValueError(f"x is on {x.device} but the stored tensors are on {prep.device}; move one of them")
        xr = x
        if prep.rotation_seeds is not None:
            xr = orthogonal_transform(x, prep.rotation_seeds[1], dim=-1)  # (T, q) fp32: x M_Rᵀ
        z = self.kernel(xr, prep, frozen.config, torch.float32 if prep.rotation_seeds else x.dtype)  # (T, p)
        if prep.rotation_seeds is not None:
            z = orthogonal_transform(z, prep.rotation_seeds[0], dim=-1, inverse=True)  # z M_L
        return z.to(x.dtype)
