"""GPTQ-style error feedback for formats whose codes index a value table (pure tensor functions).

Plain assignment picks, for every d-vector of a matrix, the nearest table entry on its own. With the
inputs' second moments H = E[x xᵀ] (q, q) known, the layer's output error tr((W − Ŵ) H (W − Ŵ)ᵀ) also
depends on how the errors of different columns combine; GPTQ (Frantar et al., 2023; its vector form is
GPTVQ, van Baalen et al., 2024) quantises the columns one group at a time, left to right, and after each
group moves the columns not yet quantised so that they compensate its error, optimally for H:

    Hinv = (H + λ·mean(diag H)·I)⁻¹ = Uᵀ U          (U upper triangular, Cholesky)
    for each group g of d columns (a vector's columns), in order:
        Q_g  = scale · table[nearest(W_g / scale)]            (p, d)
        E_g  = (W_g − Q_g) U_gg⁻¹                              (p, d)
        W_r −= E_g U_{g,r}                                    for every later column r

(U's row block g equals the Cholesky factor of the inverse Hessian of the columns still free, which is
why one factorisation serves every step.) Updates to columns beyond the current batch of columns are
applied once per batch ("lazy batches"), so the work is a few (p, batch) × (batch, q) products.

The scales are fixed beforehand (the absmax scales of the original values) and the table too (a codebook
fitted on the original values, or NF levels), so the stored format, its bits and its decoder are unchanged:
only which code each vector holds differs. The nearest entry of a vector is taken under the diagonal of
the metric (Hinv_gg)⁻¹ of its own columns (exact for d = 1, where the metric does not matter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reallm.ops.kmeans import assign

__all__ = ["feedback_codes", "inverse_hessian_factor"]


def inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """U (q, q) upper triangular with Uᵀ U = (H + λ·mean(diag H)·I)⁻¹, in float64 (small q) for stability.

    Args:
        H: the inputs' second moments E[x xᵀ] (q, q), symmetric positive semi-definite.
        damp: λ, the relative dampening added to the diagonal (GPTQ's 0.01); a matrix that is all zero
            (inputs never seen) becomes the identity.
    """
    H = H.to(torch.float64)
    q = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(q, dtype=torch.float64, device=H.device)
    if not mean_diag > 0:
        return eye
    H = H + (damp * mean_diag) * eye
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


@torch.no_grad()
def feedback_codes(X: Tensor, scales: Tensor, table: Tensor, H: Tensor, *, damp: float = 0.01,
                   batch: int = 128) -> Tensor:
    """Codes of every d-vector of X chosen with GPTQ's error feedback (module docstring).

    Args:
        X: (p, q) the values to store (after rotation and permutation: the columns in the order the format
            cuts its vectors), q a multiple of d. Computed in fp32 (fp64 when X is fp64).
        scales: (p, q // d) the fixed scale of each vector (≥ 0; a zero scale stores zeros whatever the code).
        table: (K, d) the value each code stands for, before scaling.
        H: (q, q) the inputs' second moments in X's column order.
        damp: GPTQ's relative dampening λ.
        batch: columns per lazy batch (rounded down to a multiple of d).

    Returns:
        int64 (p, q // d): the code of vector (i, j) is that of columns [j·d, (j + 1)·d) of row i.
    """
    p, q = X.shape
    d = table.shape[1]
    if q % d:
        raise ValueError(f"error feedback needs whole vectors per row: q = {q} is not a multiple of d = {d}")
    if tuple(scales.shape) != (p, q // d) or tuple(H.shape) != (q, q):
        raise ValueError(f"scales (p, q/d) = {(p, q // d)} and H (q, q) = {(q, q)} expected, got "
                         f"{tuple(scales.shape)} and {tuple(H.shape)}")
    device = X.device
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32  # fp32 unless given fp64
    U = inverse_hessian_factor(H.to(device), damp).to(dtype)  # (q, q)
    W = X.detach().to(dtype).clone()  # (p, q), updated in place as columns are fixed
    table = table.to(device=device, dtype=dtype)
    s = scales.to(device=device, dtype=dtype)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # (p, q/d)
    codes = torch.empty(p, q // d, dtype=torch.int64, device=device)
    step = max(d, batch // d * d)
    for b0 in range(0, q, step):
        b1 = min(q, b0 + step)
        err = torch.zeros(p, b1 - b0, dtype=dtype, device=device)  # E_g U_gg⁻¹ of the batch's groups
        for j in range(b0, b1, d):
            v = j // d
            U_gg = U[j:j + d, j:j + d]  # (d, d) upper
            metric = torch.linalg.inv(U_gg.T @ U_gg).diagonal().clamp_min(0)  # diag((Hinv_gg)⁻¹) (d,)
            x = W[:, j:j + d]  # (p, d)
            c = assign(x / safe[:, v:v + 1], table, weights=metric.expand(p, d))
            codes[:, v] = c
            q_val = table[c] * s[:, v:v + 1]  # (p, d); zero where the scale is zero
            e = torch.linalg.solve_triangular(U_gg, x - q_val, upper=True, left=False)  # (p, d): (x − q) U_gg⁻¹
            err[:, j - b0:j - b0 + d] = e
            if j + d < b1:
                W[:, j + d:b1] -= e @ U[j:j + d, j + d:b1]
        if b1 < q:
            W[:, b1:] -= err @ U[b0:b1, b1:]
    return codes
