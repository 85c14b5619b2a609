"""Greedy nearest-neighbour column permutation per row block (method.md §2, paper Algorithm 1).

Within each block of ``row_block`` rows, columns are reordered greedily: start at column 0, then
repeatedly place, among the columns not yet placed, the nearest neighbour (L2 distance over the
block's rows) of the last placed column; ties go to the lowest column index. The permutation of each
row block is stored (``index_bits(q)`` bits per column); decoding restores the exact original order.

:func:`greedy_column_permutation` is the vectorised version: the pairwise squared distances of a
chunk of row blocks are precomputed by one batched matmul, then all blocks of the chunk advance
together in a single Python loop of q steps (a gather + masked arg-min per step).
:func:`greedy_column_permutation_reference` is the straightforward loop of the released code, kept
for tests and benchmarks.

Distances are computed in fp32, or in fp64 when the input is fp64 (so that tests on fp64 data can
compare against the fp64 reference without near-ties decided by rounding).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "greedy_column_permutation",
    "greedy_column_permutation_reference",
    "permute_columns",
    "unpermute_columns",
    "index_bits",
]

# Memory bound for the precomputed (blocks, q, q) distance matrices of one chunk of row blocks.
_MAX_DIST_BYTES = 1 << 30


def _compute_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _row_blocks(W: Tensor, row_block: int) -> Tensor:
    """``(n_row_blocks, row_block, q)`` view of W, the last block zero-padded.

    Zero rows change no column distance and no gathered value outside the padding.
    """
    p, q = W.shape
    nb = -(-p // row_block)
    pad = nb * row_block - p
    if pad:
        W = torch.cat([W, W.new_zeros(pad, q)], dim=0)
    return W.reshape(nb, row_block, q)


def index_bits(q: int) -> int:
    """Bits per stored column index: ceil(log2 q), at least 1."""
    if q < 1:
        raise ValueError(f"q must be >= 1, got {q}")
    return max(1, (q - 1).bit_length())


def greedy_column_permutation(W: Tensor, row_block: int = 128) -> Tensor:
    """Greedy nearest-neighbour column order per block of ``row_block`` rows (paper Algorithm 1).

    Args:
        W: ``(p, q)`` matrix.
        row_block: rows per block; the last block may be shorter.

    Returns:
        int64 ``(n_row_blocks, q)`` with ``n_row_blocks = ceil(p / row_block)``;
        ``perm[b, j]`` is the original column placed at position j in row block b.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    if row_block < 1:
        raise ValueError(f"row_block must be >= 1, got {row_block}")
    device = W.device
    dtype = _compute_dtype(W)
    p, q = W.shape
    blocks = _row_blocks(W.to(dtype), row_block)  # (nb, rb, q)
    nb = blocks.shape[0]
    perm = torch.empty(nb, q, dtype=torch.int64, device=device)
    if q == 1:
        perm.zero_()
        return perm
    elem = torch.finfo(dtype).bits // 8
    chunk = max(1, min(nb, _MAX_DIST_BYTES // (q * q * elem)))
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    for b0 in range(0, nb, chunk):
        blk = blocks[b0 : b0 + chunk]  # (c, rb, q)
        c = blk.shape[0]
        norms = blk.pow(2).sum(dim=1)  # (c, q)
        # Squared distances ||a||^2 + ||b||^2 - 2 a.b (the row's own ||a||^2 is constant for the
        # arg-min, but keeping it makes the matrix the true distance and costs nothing per step).
        dist = torch.bmm(blk.transpose(1, 2), blk).mul_(-2.0)  # (c, q, q)
        dist.add_(norms.unsqueeze(2)).add_(norms.unsqueeze(1))
        flat = dist.view(c * q, q)  # row b * q + i: distances from column i in block b
        placed = torch.zeros(c, q, dtype=torch.bool, device=device)  # (c, q)
        rows = torch.arange(c, device=device)  # (c,)
        row_base = rows * q  # (c,)
        last = torch.zeros(c, dtype=torch.int64, device=device)  # start at column 0
        d = torch.empty(c, q, dtype=dtype, device=device)  # reused buffer
        out = perm[b0 : b0 + c]
        out[:, 0] = 0
        placed[:, 0] = True
        for j in range(1, q):
            torch.index_select(flat, 0, row_base + last, out=d)  # (c, q) from the last placed column
            d.masked_fill_(placed, inf)
            last = d.argmin(dim=1)  # (c,) first minimum: ties -> lowest index
            out[:, j] = last
            placed[rows, last] = True
        del dist, flat
    return perm


def greedy_column_permutation_reference(W: Tensor, row_block: int = 128) -> Tensor:
    """Reference loop (one block at a time, one step at a time, numpy distances recomputed each step).

    Same result as :func:`greedy_column_permutation`; O(q^2 * row_block) Python-driven numpy work per
    block, as in the released paper code. For tests and benchmarks only.
    """
    A = W.detach().cpu().numpy().astype(np.float64 if W.dtype == torch.float64 else np.float32)
    p, q = A.shape
    nb = -(-p // row_block)
    perm = np.empty((nb, q), dtype=np.int64)
    for b in range(nb):
        blk = A[b * row_block : (b + 1) * row_block]  # (rb, q)
        remaining = np.arange(1, q)  # sorted, so argmin ties go to the lowest index
        last = 0
        perm[b, 0] = 0
        for j in range(1, q):
            diff = blk[:, remaining] - blk[:, last : last + 1]  # (rb, len(remaining))
            dists = (diff * diff).sum(axis=0)
            k = int(np.argmin(dists))
            last = int(remaining[k])
            perm[b, j] = last
            remaining = np.delete(remaining, k)
    return torch.from_numpy(perm).to(W.device)


def permute_columns(W: Tensor, perm: Tensor, row_block: int) -> Tensor:
    """Apply the per-row-block column order: ``out[rows of b, j] = W[rows of b, perm[b, j]]``."""
    p, q = W.shape
    blocks = _row_blocks(W, row_block)  # (nb, rb, q)
    if perm.shape != (blocks.shape[0], q):
        raise ValueError(f"perm must be ({blocks.shape[0]}, {q}), got {tuple(perm.shape)}")
    index = perm.to(device=W.device, dtype=torch.int64).unsqueeze(1).expand_as(blocks)  # (nb, rb, q)
    return torch.gather(blocks, 2, index).reshape(-1, q)[:p]


def unpermute_columns(W_perm: Tensor, perm: Tensor, row_block: int) -> Tensor:
    """Exact inverse of :func:`permute_columns`: ``out[rows of b, perm[b, j]] = W_perm[rows of b, j]``."""
    p, q = W_perm.shape
    blocks = _row_blocks(W_perm, row_block)  # (nb, rb, q)
    if perm.shape != (blocks.shape[0], q):
        raise ValueError(f"perm must be ({blocks.shape[0]}, {q}), got {tuple(perm.shape)}")
    index = perm.to(device=W_perm.device, dtype=torch.int64).unsqueeze(1).expand_as(blocks)  # (nb, rb, q)
    out = torch.empty_like(blocks).scatter_(2, index, blocks)
    return out.reshape(-1, q)[:p]
