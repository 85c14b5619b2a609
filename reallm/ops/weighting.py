"""Calibration-aware weighting of the quantisation error (AQLM-style output error), pure tensor functions.

A linear layer y = W x sees inputs with second moments H = E[x xᵀ] (q, q); the mean squared error of its
output is

    E‖(W − Ŵ) x‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)                                   (AQLM, eq. 1)

and with only the diagonal h = diag(H) (q,) known, its diagonal approximation Σ_ij h_j (W − Ŵ)_ij².
`output_error_sq` computes the former (full H) or the latter (h), chunked over rows; `relative_output_error`
divides by tr(W H Wᵀ).

The encoding pipeline (`reallm.weight.pipeline`) rotates, permutes and blocks the residual before a format
quantises it; `rotated_column_weights` carries the column weights through the right-hand rotation
(W ↦ W Bᵀ turns H into B H Bᵀ: its diagonal exactly when H is known, (B ∘ B) h from the diagonal alone),
and `position_weights` through the per-row-block column permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reallm.ops.hadamard import orthogonal_transform

__all__ = ["check_moments", "output_error_sq", "position_weights", "relative_output_error",
           "rotated_column_weights", "rotated_moments"]

_CHUNK_ELEMS = 1 << 22  # values per chunk of a (rows, q) product: 16 MB in fp32


def check_moments(moments: Tensor, q: int) -> Tensor:
    """The inputs' second moments as fp32: the diagonal (q,) or the full matrix (q, q); ValueError otherwise."""
    if moments.dim() == 1 and moments.shape[0] == q:
        return moments.float()
    if moments.dim() == 2 and tuple(moments.shape) == (q, q):
        return moments.float()
    raise ValueError(f"input second moments must be (q,) or (q, q) with q = {q}, got {tuple(moments.shape)}")


def output_error_sq(E: Tensor, moments: Tensor) -> float:
    """tr(E H Eᵀ) for E (p, q) and H (q, q), or Σ_ij h_j E_ij² for the diagonal h (q,); float64 sum, row chunks.

    Args:
        E: the weight error W − Ŵ (p, q), any float dtype.
        moments: the inputs' second moments E[x xᵀ] (q, q) or their diagonal E[x²] (q,).
    """
    p, q = E.shape
    H = check_moments(moments, q).to(E.device)
    rows = max(1, _CHUNK_ELEMS // max(1, q))
    total = torch.zeros((), dtype=torch.float64, device=E.device)
    for r in range(0, p, rows):
        e = E[r:r + rows].float()  # (c, q)
        if H.dim() == 1:
            total += (e * e * H).sum(dtype=torch.float64)
        else:
            total += ((e @ H) * e).sum(dtype=torch.float64)  # Σ_i e_i H e_iᵀ
    return float(total)


def relative_output_error(W: Tensor, W_hat: Tensor, moments: Tensor) -> float:
    """‖(W − Ŵ) X‖ / ‖W X‖ over the calibration inputs X: sqrt(tr(E H Eᵀ) / tr(W H Wᵀ)), E = W − Ŵ.

    Args:
        W: the original weight (p, q).
        W_hat: its reconstruction (p, q).
        moments: E[x xᵀ] (q, q) or E[x²] (q,) (the diagonal approximation).
    """
    W = W.detach().float()
    ref = output_error_sq(W, moments)
    return (output_error_sq(W - W_hat.to(W), moments) / max(ref, 1e-300)) ** 0.5


def rotated_moments(H: Tensor, seed: int) -> Tensor:
    """B H Bᵀ (q, q) fp32: the second moments of the inputs B x that W_rot = A W Bᵀ sees (`reallm.ops.hadamard`,
    the right-hand side of `rotate` with this seed).

    Args:
        H: E[x xᵀ] (q, q).
        seed: the right-hand rotation seed.
    """
    H = H.float()
    return orthogonal_transform(orthogonal_transform(H, seed, dim=1), seed, dim=0)


def rotated_column_weights(moments: Tensor, seed: int) -> Tensor:
    """diag(B H Bᵀ) (q,) for the seeded orthonormal transform B of `reallm.ops.hadamard` (the right-hand
    side of `rotate`: W_rot = A W Bᵀ, so the output error of W_rot is measured with B H Bᵀ).

    Args:
        moments: E[x xᵀ] (q, q) (exact) or its diagonal (q,) ((B ∘ B) h: exact for a diagonal H).
        seed: the right-hand rotation seed.
    """
    if moments.dim() == 2:
        return torch.diagonal(rotated_moments(moments, seed)).clone()
    h = moments.float()
    q = h.shape[0]
    out = torch.zeros(q, dtype=torch.float32, device=h.device)
    step = max(1, _CHUNK_ELEMS // max(1, q))
    for j in range(0, q, step):
        k = min(q, j + step)
        eye = torch.zeros(k - j, q, dtype=torch.float32, device=h.device)
        eye[torch.arange(k - j), torch.arange(j, k)] = 1.0
        cols = orthogonal_transform(eye, seed, dim=1)  # (c, q): row i is (B e_{j+i})ᵀ
        out += (cols * cols * h[j:k, None]).sum(dim=0)
    return out


def position_weights(column_weights: Tensor, p: int, perm: Tensor | None, row_block: int) -> Tensor:
    """(p, q) weight of every position of the (permuted) matrix: column j of row block b holds original column
    perm[b, j] (`reallm.ops.permutation.permute_columns`), so its weight is column_weights[perm[b, j]].

    Args:
        column_weights: (q,) weight of each original column.
        p: rows.
        perm: (n_row_blocks, q) column order per row block, or None (no permutation).
        row_block: rows per permutation block.
    """
    q = column_weights.shape[0]
    if perm is None:
        return column_weights.view(1, q).expand(p, q).contiguous()
    per_block = column_weights[perm.to(device=column_weights.device, dtype=torch.int64)]  # (n_row_blocks, q)
    return per_block.repeat_interleave(row_block, dim=0)[:p]  # (p, q)
