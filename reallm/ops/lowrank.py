"""Low-rank + quantized decomposition, data-free (method.md §1).

Find Q, L1, L2 that approximately minimise ``||W - (Q + L1 L2^T)||_F``:

- ``"svd"`` (paper Algorithm 2): L1 L2^T = best rank-r approximation of W; Q = quant(W - L1 L2^T).
- ``"alternating"`` (LQ-LoRA, what the released code runs): Q_0 = 0; repeat
  L1 L2^T = rank-r SVD of (W - Q); Q = quant(W - L1 L2^T); keep the best iterate by Frobenius error,
  stop when it stops improving or after ``iters``. Its first iterate is exactly ``"svd"``.
- ``"zero"`` (QLoRA): L1 = 0, L2 = small seeded random values (LoRA's A init), Q = quant(W).

Singular values are split evenly: L1 = U sqrt(S), L2 = V sqrt(S). Computation is in fp32 (fp64 for
fp64 input) on W's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["low_rank_svd", "LowRankResult", "lowrank_decompose"]

_OVERSAMPLE = 10
_POWER_ITERS = 2
# "alternating" stops when the relative improvement of the best error falls below this.
_IMPROVE_TOL = 1e-4


def _compute_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _randomized_svd(W: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Halko-Martinsson-Tropp randomised SVD with a seeded Generator on W's device.

    Oversampling 10, 2 power iterations with QR re-orthonormalisation. Returns U (p, r), S (r,), V (q, r).
    """
    p, q = W.shape
    ell = min(rank + _OVERSAMPLE, p, q)
    gen = torch.Generator(device=W.device)
    gen.manual_seed(int(seed))
    omega = torch.randn(q, ell, generator=gen, device=W.device, dtype=W.dtype)  # (q, l)
    Y = W @ omega  # (p, l)
    Qy, _ = torch.linalg.qr(Y)  # (p, l)
    for _ in range(_POWER_ITERS):
        Z, _ = torch.linalg.qr(W.t() @ Qy)  # (q, l)
        Qy, _ = torch.linalg.qr(W @ Z)  # (p, l)
    B = Qy.t() @ W  # (l, q)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)  # (l, l), (l,), (l, q)
    U = Qy @ Ub[:, :rank]  # (p, r)
    return U, S[:rank], Vh[:rank].t()


def low_rank_svd(
    W: Tensor, rank: int, *, randomized: bool | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation ``W ≈ L1 @ L2.T`` with singular values split evenly.

    Args:
        W: ``(p, q)``.
        rank: r >= 0. Ranks above min(p, q) are padded with zero columns (the product is then W).
        randomized: exact ``torch.linalg.svd`` (False) or seeded randomised SVD (True); None picks
            randomised when ``min(p, q) > 1024`` and ``rank < min(p, q) // 4``.
        seed: seed of the randomised SVD's Gaussian sketch.

    Returns:
        ``L1 = U sqrt(S)`` of shape ``(p, r)`` and ``L2 = V sqrt(S)`` of shape ``(q, r)``.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    dtype = _compute_dtype(W)
    Wf = W.to(dtype)
    p, q = Wf.shape
    L1 = Wf.new_zeros(p, rank)
    L2 = Wf.new_zeros(q, rank)
    r = min(rank, p, q)
    if r == 0:
        return L1, L2
    if randomized is None:
        randomized = min(p, q) > 1024 and rank < min(p, q) // 4
    if randomized:
        U, S, V = _randomized_svd(Wf, r, seed)
    else:
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
        U, S, V = U[:, :r], S[:r], Vh[:r].t()
    root = S.clamp_min(0).sqrt()  # (r,)
    L1[:, :r] = U * root
    L2[:, :r] = V * root
    return L1, L2


@dataclass
class LowRankResult:
    """Result of :func:`lowrank_decompose`.

    Attributes:
        L1: ``(p, r)``; L2: ``(q, r)``; the low-rank part is ``L1 @ L2.T``.
        q_hat: ``(p, q)`` quantized residual as reconstructed (first output of ``quantize``).
        q_state: the opaque state returned by ``quantize`` for the kept iterate.
        errors: relative Frobenius error ``||W - q_hat - L1 L2^T|| / ||W||`` of every iterate.
        best_iter: index in ``errors`` of the kept iterate.
    """

    L1: Tensor
    L2: Tensor
    q_hat: Tensor
    q_state: Any
    errors: list[float] = field(default_factory=list)
    best_iter: int = 0


def _rel_error(W: Tensor, q_hat: Tensor, L1: Tensor, L2: Tensor, w_norm: float) -> float:
    return float(torch.linalg.norm(W - q_hat - L1 @ L2.t())) / w_norm


def lowrank_decompose(
    W: Tensor,
    rank: int,
    method: str,
    quantize: Callable[[Tensor], tuple[Tensor, Any]],
    *,
    iters: int = 20,
    randomized: bool | None = None,
    seed: int = 0,
    round_factors: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> LowRankResult:
    """Low-rank + quantized decomposition of W (method.md §1).

    Args:
        W: ``(p, q)``.
        rank: r.
        method: ``"svd"``, ``"alternating"`` or ``"zero"`` (see the module docstring).
        quantize: ``R -> (R_hat, state)`` with ``R_hat`` the residual as it would be reconstructed.
        iters: maximum iterations of ``"alternating"`` (>= 1).
        randomized: passed to :func:`low_rank_svd`.
        seed: seed of the randomised SVD (same sketch every iteration) and of the ``"zero"`` init.
        round_factors: ``(L1, L2) -> (L1, L2)`` rounded to the precision they are stored at; applied to
            every iterate before its residual is formed and its error measured, so that the quantizer
            sees (and the best iterate is chosen on) the residual against the factors as stored.

    Returns:
        :class:`LowRankResult`; for ``"alternating"`` the iterate with the lowest error
        (iteration 0 equals ``"svd"``, so it is never worse). Iterations stop when the best error
        improves by less than 1e-4 (relative) or after ``iters``.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    dtype = _compute_dtype(W)
    Wf = W.to(dtype)
    p, q = Wf.shape
    w_norm = float(torch.linalg.norm(Wf)) or 1.0
    rounded = round_factors or (lambda a, b: (a, b))

    if method == "zero":
        gen = torch.Generator(device=Wf.device)
        gen.manual_seed(int(seed))
        bound = 1.0 / math.sqrt(q)  # LoRA's A init: kaiming_uniform(a=sqrt(5)) on fan_in = q
        L1 = Wf.new_zeros(p, rank)
        L2 = (torch.rand(q, rank, generator=gen, device=Wf.device, dtype=dtype) * 2 - 1) * bound
        L1, L2 = rounded(L1, L2)
        q_hat, state = quantize(Wf)
        err = _rel_error(Wf, q_hat, L1, L2, w_norm)
        return LowRankResult(L1=L1, L2=L2, q_hat=q_hat, q_state=state, errors=[err], best_iter=0)

    if method == "svd":
        L1, L2 = rounded(*low_rank_svd(Wf, rank, randomized=randomized, seed=seed))
        q_hat, state = quantize(Wf - L1 @ L2.t())
        err = _rel_error(Wf, q_hat, L1, L2, w_norm)
        return LowRankResult(L1=L1, L2=L2, q_hat=q_hat, q_state=state, errors=[err], best_iter=0)

    if method != "alternating":
        raise ValueError(f"method must be 'svd', 'alternating' or 'zero', got {method!r}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    errors: list[float] = []
    best: LowRankResult | None = None
    Q = torch.zeros_like(Wf)  # Q_0 = 0
    for t in range(iters):
        L1, L2 = rounded(*low_rank_svd(Wf - Q, rank, randomized=randomized, seed=seed))
        Q, state = quantize(Wf - L1 @ L2.t())
        err = _rel_error(Wf, Q, L1, L2, w_norm)
        errors.append(err)
        if best is None:
            best = LowRankResult(L1=L1, L2=L2, q_hat=Q, q_state=state, best_iter=0)
            continue
        best_err = errors[best.best_iter]
        improved = err < best_err
        if improved:
            best = LowRankResult(L1=L1, L2=L2, q_hat=Q, q_state=state, best_iter=t)
        if not improved or (best_err - err) < _IMPROVE_TOL * best_err:
            break
    assert best is not None
    best.errors = errors
    return best
