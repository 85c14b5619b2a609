"""Randomised Hadamard rotation from seeds, any size, exact inverse (method.md §2).

QuIP#'s incoherence processing: ``W -> H_p S_p W S_q H_q`` with random sign vectors S and
Hadamard-like orthonormal H; only the two seeds are stored and the inverse is applied after decoding.

Transform of a vector of length ``n = 2**k * m`` (m odd), indexed ``i * m + j``:

    x  ->  H (S x),     H = H_{2^k} ⊗ Q_m

- S: random ±1 diagonal drawn from ``seed``;
- H_{2^k}: the normalised Sylvester Walsh–Hadamard matrix (``H / sqrt(2^k)``, symmetric, its own
  inverse), applied as a Kronecker product of small dense Hadamard factors (at most
  ``2**_MAX_FACTOR_LOG2``) through reshapes, i.e. O(n log n)-style work done by small matmuls
  instead of log2(n) memory-bound butterfly passes;
- Q_m: when n is not a power of two (m > 1, e.g. 11008 = 2^8 * 43), a seeded random orthogonal
  m x m matrix (QR of a Gaussian with the signs of diag(R) folded in, i.e. Haar distributed). This
  plays the role of QuIP#'s small non-power-of-two Hadamard factors (12, 20, 28, ...), which do not
  exist for every odd m. It is a dense m x m product, meant for the small odd parts of layer sizes.

The signs and Q_m are drawn with a *CPU* ``torch.Generator`` seeded with ``seed`` and then moved to
the data's device, so the same seed gives the same rotation on every device (a matrix compressed on
a GPU decodes on a CPU). They are cached per (seed, n).

Computation is in fp32 (fp64 when the input is fp64) on the input's device.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["orthogonal_transform", "rotate", "unrotate"]

_MAX_FACTOR_LOG2 = 6


def _split_pow2(n: int) -> tuple[int, int]:
    """``n = 2**k * m`` with m odd -> (k, m)."""
    if n < 1:
        raise ValueError(f"transform length must be >= 1, got {n}")
    k = (n & -n).bit_length() - 1
    return k, n >> k


@lru_cache(maxsize=64)
def _params(seed: int, n: int) -> tuple[Tensor, Tensor | None]:
    """(signs (n,), Q_m (m, m) or None), float64 on CPU, drawn from a CPU generator seeded by seed."""
    _, m = _split_pow2(n)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1  # (n,)
    q = None
    if m > 1:
        g = torch.randn(m, m, generator=gen, dtype=torch.float64)  # (m, m)
        q, r = torch.linalg.qr(g)
        d = torch.sign(torch.diagonal(r))
        d[d == 0] = 1.0
        q = (q * d.unsqueeze(0)).contiguous()  # (m, m) orthogonal, Haar distributed
    return signs, q


@lru_cache(maxsize=16)
def _sylvester(log2: int) -> Tensor:
    """Unnormalised Sylvester Hadamard matrix of size 2**log2 (entries ±1), float64 CPU."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(log2):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _apply_along_middle(x: Tensor, mat: Tensor) -> Tensor:
    """``x`` (A, r, B) -> ``mat @ x`` along the middle axis, (A, r, B)."""
    a, r, b = x.shape
    if b == 1:
        return (x.reshape(a, r) @ mat.t()).reshape(a, r, 1)
    if a == 1:
        return (mat @ x.reshape(r, b)).reshape(1, r, b)
    return torch.matmul(mat, x)


def _factor_logs(k: int) -> list[int]:
    """Split k into near-equal parts of at most _MAX_FACTOR_LOG2."""
    if k == 0:
        return []
    parts = -(-k // _MAX_FACTOR_LOG2)
    base, extra = divmod(k, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _walsh_hadamard(x: Tensor, k: int) -> Tensor:
    """Normalised WHT along the middle axis of ``x`` (A, 2**k, B), as a Kronecker product of factors."""
    a, n, b = x.shape
    before = 1
    for lg in _factor_logs(k):
        size = 1 << lg
        after = n // (before * size)
        h = _sylvester(lg).to(device=x.device, dtype=x.dtype)  # (size, size)
        x = _apply_along_middle(x.reshape(a * before, size, after * b), h)
        before *= size
    return x.reshape(a, n, b) * (2.0 ** (-k / 2))


def orthogonal_transform(x: Tensor, seed: int, dim: int = -1, inverse: bool = False) -> Tensor:
    """Apply the seeded orthonormal map ``v -> H (S v)`` to every vector along ``dim``.

    Args:
        x: any shape; the transform acts along ``dim`` (length n >= 1, any n).
        seed: seed of the sign vector S and of the orthogonal factor Q_m (see the module docstring:
            ``H = H_{2^k} ⊗ Q_m`` for ``n = 2^k m``, m odd).
        dim: axis to transform.
        inverse: apply the exact inverse ``v -> S H^T v`` instead.

    Returns:
        Tensor of x's shape, fp32 (fp64 for fp64 input), on x's device.
    """
    dim = dim % x.dim() if x.dim() else 0
    shape = x.shape
    n = shape[dim]
    k, m = _split_pow2(n)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    signs, q = _params(int(seed), n)
    signs = signs.to(device=x.device, dtype=dtype)  # (n,)
    pre = 1
    for s in shape[:dim]:
        pre *= s
    post = x.numel() // max(1, pre * n)
    y = x.to(dtype).reshape(pre, n, post)  # (pre, n, post)
    if not inverse:
        y = y * signs.view(1, n, 1)
    # The two Kronecker factors act on different axes and commute.
    if q is not None:
        qm = q.to(device=x.device, dtype=dtype)  # (m, m)
        y = _apply_along_middle(y.reshape(pre * (n // m), m, post), qm.t() if inverse else qm)
    y = _walsh_hadamard(y.reshape(pre, 1 << k, m * post), k)  # symmetric: its own inverse
    y = y.reshape(pre, n, post)
    if inverse:
        y = y * signs.view(1, n, 1)
    return y.reshape(shape)


def rotate(W: Tensor, seed_left: int, seed_right: int) -> Tensor:
    """``H_p S_p W S_q H_q``: the transform of seed_left along the rows' axis (dim 0, i.e. applied to
    every column) and the transform of seed_right along dim 1 (applied to every row).

    In matrix form ``W_rot = (H_p S_p) W (H_q S_q)^T``; for powers of two ``H_q^T = H_q``.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    return orthogonal_transform(orthogonal_transform(W, seed_left, dim=0), seed_right, dim=1)


def unrotate(W_rot: Tensor, seed_left: int, seed_right: int) -> Tensor:
    """Exact inverse of :func:`rotate`."""
    if W_rot.dim() != 2:
        raise ValueError(f"W_rot must be 2-D, got shape {tuple(W_rot.shape)}")
    Y = orthogonal_transform(W_rot, seed_right, dim=1, inverse=True)
    return orthogonal_transform(Y, seed_left, dim=0, inverse=True)
