"""Cut a weight matrix into image patches for the patch autoencoder, and put it back (method.md §4).

A matrix ``M`` of shape ``(p, q)`` is zero-padded at the bottom and on the right up to multiples of the
patch size and cut into non-overlapping patches in row-major order (patch ``(i, j)`` has index
``i * n_cols + j``). The padding is cropped again by :func:`patches_to_matrix`, which is the exact
inverse (no arithmetic is done on the values, so the round trip is bit-exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["matrix_to_patches", "patches_to_matrix", "patch_grid"]


def _pair(patch: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(patch, int):
        p0 = p1 = patch
    else:
        p0, p1 = (int(v) for v in patch)
    if p0 <= 0 or p1 <= 0:
        raise ValueError(f"patch size must be positive, got {patch}")
    return p0, p1


def patch_grid(shape: tuple[int, int], patch: int | tuple[int, int]) -> tuple[int, int]:
    """Number of patch rows and columns ``(ceil(p / P0), ceil(q / P1))`` for a ``(p, q)`` matrix."""
    p0, p1 = _pair(patch)
    p, q = shape
    return -(-p // p0), -(-q // p1)


def matrix_to_patches(M: Tensor, patch: int | tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """``(p, q)`` matrix -> ``(n_patches, 1, P0, P1)`` patches (zero-padded) and the original shape.

    ``patch`` is ``P`` (square patches) or ``(P0, P1)``. Patches are in row-major order. Keeps dtype
    and device of ``M``.
    """
    if M.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(M.shape)}")
    p0, p1 = _pair(patch)
    p, q = M.shape
    nr, nc = patch_grid((p, q), (p0, p1))
    pad_r, pad_c = nr * p0 - p, nc * p1 - q
    if pad_r or pad_c:
        M = torch.nn.functional.pad(M, (0, pad_c, 0, pad_r))  # (nr*P0, nc*P1), zeros bottom/right
    x = M.reshape(nr, p0, nc, p1).permute(0, 2, 1, 3)  # (nr, nc, P0, P1)
    x = x.reshape(nr * nc, 1, p0, p1).contiguous()  # (n_patches, 1, P0, P1)
    return x, (p, q)


def patches_to_matrix(x: Tensor, shape: tuple[int, int], patch: int | tuple[int, int]) -> Tensor:
    """Exact inverse of :func:`matrix_to_patches`: ``(n_patches, 1, P0, P1)`` -> ``(p, q)``, padding
    cropped."""
    p0, p1 = _pair(patch)
    p, q = (int(s) for s in shape)
    nr, nc = patch_grid((p, q), (p0, p1))
    if x.dim() == 3:  # tolerate (n_patches, P0, P1)
        x = x.unsqueeze(1)
    if tuple(x.shape) != (nr * nc, 1, p0, p1):
        raise ValueError(f"expected patches of shape {(nr * nc, 1, p0, p1)} for a {p}x{q} matrix, got {tuple(x.shape)}")
    M = x.reshape(nr, nc, p0, p1).permute(0, 2, 1, 3).reshape(nr * p0, nc * p1)  # padded matrix
    return M[:p, :q].contiguous()
