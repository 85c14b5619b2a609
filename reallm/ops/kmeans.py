"""Data-free vector quantization: batched k-means and chunked nearest-codeword assignment.

method.md §3 "Vector quantization": the normalised values are split into d-dimensional vectors, one
codebook of K = 2**(b*d) codewords is learnt per matrix with k-means (k-means++ or random-point
initialisation, Lloyd iterations to a tolerance), and each vector is stored as the index of its
nearest codeword.

Everything runs in fp32 on the data's device. Squared distances are computed as
``||x||^2 - 2 x.c + ||c||^2`` with one matmul per chunk of points against the codebook
(``[x, ||x||^2, 1] @ [-2c, 1, ||c||^2]^T``), so memory stays at ``chunk * K`` floats.

Inside Lloyd iterations the arg-min is taken with a packed-integer trick: a non-negative fp32
distance, viewed as int32, keeps its order, so replacing its ``ceil(log2 K)`` lowest mantissa bits by
the codeword index and taking ``amin`` gives distance and index in one vectorised reduction (much
faster than ``torch.min(dim)`` with indices on CPU). The distance loses those low bits (relative
precision 2**(ceil(log2 K) - 23), e.g. 3e-5 for K = 256), which only matters for near-ties and is
irrelevant to the centroid updates. :func:`assign`, which produces the stored codes, uses exact
``torch.min`` and re-checks near-ties by direct differences.

Weighted variant (calibration-aware phase 1): with per-coordinate weights ``w`` (N, d) ≥ 0 the
distance of point x to codeword c is ``Σ_j w_j (x_j − c_j)²`` (the layer-output error of the diagonal
approximation of the inputs' second moments, see ``reallm.ops.weighting``), computed per chunk as
``Σ w x² − 2 (w ⊙ x) · c + w · c²`` (two matmuls); Lloyd's update is then the per-coordinate weighted
mean ``c_j = Σ_i w_ij x_ij / Σ_i w_ij`` over the cluster, which minimises the weighted inertia for
fixed assignments, so every iteration still lowers it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KMeansResult", "assign", "kmeans", "kmeanspp_init", "weighted_distances"]

# Target number of distance entries (chunk * K) per chunk. On CPU a chunk that stays in cache is far
# faster than a big one; on an accelerator bigger chunks amortise kernel launches. Both stay well
# under the 64M-float memory bound of the brief (11008 x 4096 with d = 2, K = 64 fits in a few GB).
_CPU_CHUNK_ELEMS = 1 << 20
_GPU_CHUNK_ELEMS = 1 << 26
# k-means++ seeding is sequential in k (one pass over the points per codeword); it is run on a
# seeded subsample of at most max(_INIT_MIN_POINTS, _INIT_POINTS_PER_CODEWORD * k) points.
_INIT_MIN_POINTS = 1 << 16
_INIT_POINTS_PER_CODEWORD = 256
# Up to this many codewords the packed arg-min reduces a (K, chunk) distance block over dim 0.
_TRANSPOSED_MAX_K = 64


@dataclass
class KMeansResult:
    """Result of :func:`kmeans`.

    Attributes:
        codebook: ``(K, d)`` fp32 codewords.
        inertia: mean squared L2 distance of the fitted points to their nearest codeword.
        n_iter: number of Lloyd updates performed.
    """

    codebook: Tensor
    inertia: float
    n_iter: int


def _default_chunk(n_codewords: int, device: torch.device) -> int:
    elems = _GPU_CHUNK_ELEMS if device.type != "cpu" else _CPU_CHUNK_ELEMS
    return max(256, elems // max(1, n_codewords))


def _augment_codebook(c: Tensor) -> Tensor:
    """``[-2c, 1, ||c||^2]``, ``(K, d + 2)``, the codebook side of :func:`_points_layout`."""
    return torch.cat([-2.0 * c, torch.ones_like(c[:, :1]), (c * c).sum(dim=1, keepdim=True)], dim=1)


def _points_layout(x: Tensor, transposed: bool) -> Tensor:
    """Augmented points ``[x, ||x||^2, 1]``: ``(d + 2, N)`` if transposed else ``(N, d + 2)``.

    ``xa @ ca.T`` with :func:`_augment_codebook` is the squared distance matrix. For small K
    (<= _TRANSPOSED_MAX_K) :func:`_assign_packed` computes ``(K, chunk)`` blocks and reduces them
    over dim 0 (a vectorised element-wise min over K rows, fast on CPU), which needs the transposed
    layout; for larger K ``(chunk, K)`` blocks reduced over dim 1. Filled in place (no temporaries
    of the size of the data besides ``x * x``).
    """
    n, d = x.shape
    if transposed:
        xl = torch.empty(d + 2, n, dtype=torch.float32, device=x.device)  # (d + 2, N)
        xl[:d] = x.t()
        torch.sum(x * x, dim=1, out=xl[d])
        xl[d + 1].fill_(1.0)
    else:
        xl = torch.empty(n, d + 2, dtype=torch.float32, device=x.device)  # (N, d + 2)
        xl[:, :d] = x
        xl[:, d] = (x * x).sum(dim=1)
        xl[:, d + 1] = 1.0
    return xl


def _assign_packed(xl: Tensor, c: Tensor, chunk: int, packed: Tensor, idx: Tensor, dist: Tensor) -> float:
    """Approximate (low-bit-truncated) nearest codeword of every point, into preallocated buffers.

    Args:
        xl: augmented points ``[x, ||x||^2, 1]`` in the layout of :func:`_points_layout`.
        c: ``(K, d)`` codebook.
        packed: int32 ``(N,)`` work buffer.
        idx: int64 ``(N,)``, receives the codeword indices.
        dist: fp32 ``(N,)``, receives the squared distances with their ``ceil(log2 K)`` low
            mantissa bits cleared.

    Returns:
        The mean of ``dist`` (inertia of the assignment).

    Buffers are reused across Lloyd iterations: on CPU a fresh N-sized tensor per pass costs page
    faults comparable to the pass itself.
    """
    k = c.shape[0]
    ca = _augment_codebook(c)  # (K, d + 2)
    nbits = max(1, (k - 1).bit_length())
    low = (1 << nbits) - 1
    kidx = torch.arange(k, dtype=torch.int32, device=c.device)  # (K,)
    transposed = k <= _TRANSPOSED_MAX_K
    n = packed.shape[0]
    if transposed:
        kidx = kidx.unsqueeze(1)  # (K, 1)
    else:
        ca = ca.t().contiguous()  # (d + 2, K)
    # One reused output buffer: a fresh multi-MB tensor per chunk costs page faults on CPU.
    rows = min(chunk, n)
    buf = torch.empty(k * rows, dtype=torch.float32, device=c.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        out = buf[: k * (e - s)]
        if transposed:
            dmat = torch.mm(ca, xl[:, s:e], out=out.view(k, e - s))  # (K, c) squared distances
        else:
            dmat = torch.mm(xl[s:e], ca, out=out.view(e - s, k))  # (c, K) squared distances
        # A non-negative fp32 viewed as int32 keeps its order; negative values only come from
        # rounding of distances that are ~0 and stay below every positive one.
        di = dmat.view(torch.int32)
        di.bitwise_and_(~low).bitwise_or_(kidx)
        pk = torch.amin(di, dim=0 if transposed else 1, out=packed[s:e])  # (c,) still in cache
        torch.bitwise_and(pk, low, out=idx[s:e])  # codeword index
        torch.bitwise_and(pk, ~low, out=dist[s:e].view(torch.int32))  # truncated distance
    dist.clamp_min_(0.0)
    return float(dist.sum()) / max(1, n)


def assign(x: Tensor, codebook: Tensor, chunk_size: int | None = None, weights: Tensor | None = None) -> Tensor:
    """Exact nearest codeword (squared L2, or weighted squared L2) of every row of ``x``; ties go to the
    lowest index.

    Args:
        x: ``(N, d)`` points.
        codebook: ``(K, d)``.
        chunk_size: points per chunk (default: ``chunk * K`` about 1M floats on CPU, 64M on GPU).
        weights: ``(N, d)`` non-negative per-coordinate weights: the distance is ``Σ_j w_j (x_j − c_j)²``
            (None: the plain squared L2 distance).

    Returns:
        int64 ``(N,)`` codes on ``x.device``.

    The distances come from one matmul per chunk; rows whose best and second-best distances are
    within the rounding error of that expansion are recomputed from direct differences, so the
    result agrees with an argmin over directly computed distances.
    """
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x (N, d) and codebook (K, d) expected, got {tuple(x.shape)}, {tuple(codebook.shape)}")
    if weights is not None:
        return _assign_weighted(x, codebook, weights, chunk_size)[0]
    device = x.device
    xf = x.to(torch.float32)  # (N, d)
    c = codebook.to(device=device, dtype=torch.float32)  # (K, d)
    n, k = xf.shape[0], c.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return out
    chunk = chunk_size or _default_chunk(k, device)
    c_t = c.t().contiguous()  # (d, K)
    cnorm = (c * c).sum(dim=1)  # (K,)
    cmax = cnorm.max()
    buf = torch.empty(min(chunk, n) * k, dtype=torch.float32, device=device)  # reused (see above)
    for s in range(0, n, chunk):
        xs = xf[s : s + chunk]  # (c, d)
        xnorm = (xs * xs).sum(dim=1)  # (c,)
        dist = torch.addmm(cnorm, xs, c_t, alpha=-2.0, out=buf[: xs.shape[0] * k].view(-1, k))  # (c, K)
        best, idx = dist.min(dim=1)  # (c,)
        # Near-ties: another codeword within the expansion's rounding error of the best one.
        tol = 1e-5 * (xnorm + cmax) + 1e-30  # (c,)
        ambiguous = (dist <= (best + tol).unsqueeze(1)).sum(dim=1) > 1  # (c,)
        if bool(ambiguous.any()):
            rows = ambiguous.nonzero().squeeze(1)  # (r,)
            xr = xs[rows]  # (r, d)
            exact = torch.zeros(rows.numel(), k, dtype=torch.float32, device=device)  # (r, K)
            for j in range(xr.shape[1]):  # direct differences, one coordinate at a time
                exact.add_((xr[:, j : j + 1] - c[:, j]).pow_(2))
            idx[rows] = exact.argmin(dim=1)
        out[s : s + chunk] = idx
    return out


def _check_weights(x: Tensor, weights: Tensor) -> Tensor:
    if weights.shape != x.shape:
        raise ValueError(f"weights must have the shape of x {tuple(x.shape)}, got {tuple(weights.shape)}")
    w = weights.to(device=x.device, dtype=torch.float32)
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite and non-negative")
    return w


def weighted_distances(x: Tensor, codebook: Tensor, weights: Tensor) -> Tensor:
    """``(N, K)`` weighted squared distances ``Σ_j w_ij (x_ij − c_kj)²`` by direct differences (no
    expansion: exact up to fp32 rounding of each term; for small problems and near-tie checks)."""
    c = codebook.to(device=x.device, dtype=torch.float32)  # (K, d)
    diff = x.to(torch.float32).unsqueeze(1) - c.unsqueeze(0)  # (N, K, d)
    return (weights.to(device=x.device, dtype=torch.float32).unsqueeze(1) * diff * diff).sum(dim=2)


def _assign_weighted(x: Tensor, codebook: Tensor, weights: Tensor,
                     chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(codes int64 (N,), weighted squared distance to the chosen codeword fp32 (N,)), exact: the expansion
    ``Σ w x² − 2 (w ⊙ x) cᵀ + w (c²)ᵀ`` per chunk, near-ties re-checked by direct differences."""
    device = x.device
    xf = x.to(torch.float32)  # (N, d)
    w = _check_weights(xf, weights)  # (N, d)
    c = codebook.to(device=device, dtype=torch.float32)  # (K, d)
    n, k = xf.shape[0], c.shape[0]
    codes = torch.empty(n, dtype=torch.int64, device=device)
    best_out = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return codes, best_out
    chunk = chunk_size or max(256, _default_chunk(k, device) // 2)  # two (chunk, K) products per chunk
    c_t = c.t().contiguous()  # (d, K)
    c2_t = (c * c).t().contiguous()  # (d, K)
    cmax = (c * c).sum(dim=1).max()
    for s in range(0, n, chunk):
        xs, ws = xf[s:s + chunk], w[s:s + chunk]  # (c, d)
        wx = ws * xs  # (c, d)
        base = (wx * xs).sum(dim=1)  # (c,) Σ w x²
        dist = torch.addmm(ws @ c2_t, wx, c_t, alpha=-2.0)  # (c, K): w·c² − 2 (w⊙x)·c
        dist.add_(base.unsqueeze(1))
        best, idx = dist.min(dim=1)  # (c,)
        # near-ties within the expansion's rounding error: recomputed exactly
        tol = 1e-5 * (base + ws.sum(dim=1) * cmax) + 1e-30  # (c,)
        ambiguous = (dist <= (best + tol).unsqueeze(1)).sum(dim=1) > 1  # (c,)
        if bool(ambiguous.any()):
            rows = ambiguous.nonzero().squeeze(1)  # (r,)
            exact = torch.zeros(rows.numel(), k, dtype=torch.float32, device=device)  # (r, K)
            for j in range(xs.shape[1]):  # one coordinate at a time: (r, K) memory
                exact.add_((xs[rows, j:j + 1] - c[:, j]).pow_(2).mul_(ws[rows, j:j + 1]))
            idx[rows] = exact.argmin(dim=1)
            best[rows] = exact.gather(1, idx[rows].unsqueeze(1)).squeeze(1)
        codes[s:s + chunk] = idx
        best_out[s:s + chunk] = best.clamp_min(0.0)
    return codes, best_out


def _weighted_lloyd(xf: Tensor, w: Tensor, c: Tensor, iters: int, tol: float,
                    chunk_size: int | None) -> KMeansResult:
    """Lloyd iterations under the weighted distance from the codebook ``c`` (K, d): exact assignment,
    then the per-coordinate weighted mean of each cluster (a coordinate without weight keeps its value);
    an empty cluster is re-seeded to the point of largest weighted distance (deterministic)."""
    n, d = xf.shape
    k = c.shape[0]
    idx, dist = _assign_weighted(xf, c, w, chunk_size)
    inertia = float(dist.double().sum()) / n
    n_iter = 0
    for _ in range(iters):
        wsum = torch.zeros(k, d, dtype=torch.float64, device=xf.device).index_add_(0, idx, w.double())  # (K, d)
        wxsum = torch.zeros(k, d, dtype=torch.float64, device=xf.device).index_add_(0, idx, (w * xf).double())
        counts = torch.bincount(idx, minlength=k)  # (K,)
        c = torch.where(wsum > 0, (wxsum / wsum.clamp_min(1e-300)).float(), c)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            far = torch.topk(dist, min(empty.numel(), n)).indices  # (n_empty,)
            c[empty[: far.numel()]] = xf[far]
        n_iter += 1
        idx, dist = _assign_weighted(xf, c, w, chunk_size)
        new_inertia = float(dist.double().sum()) / n
        rel = (inertia - new_inertia) / inertia if inertia > 0 else 0.0
        inertia = new_inertia
        if tol > 0 and rel < tol and not empty.numel():
            break
    return KMeansResult(codebook=c, inertia=inertia, n_iter=n_iter)


def kmeanspp_init(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding on ``x`` (M, d) -> ``(k, d)``.

    D^2 sampling (Arthur & Vassilvitskii 2007) with ``2 + int(ln k)`` candidates per step, keeping
    the candidate that lowers the potential most (the "greedy k-means++" of scikit-learn).

    Args:
        x: the points (M, d).
        k: number of centres.
        gen: the generator of every draw (on ``x``'s device).
    """
    m = x.shape[0]
    device = x.device
    trials = 2 + int(math.log(k))
    xa_t = _points_layout(x, transposed=True)  # (d + 2, M): (L, d+2) @ (d+2, M) is a fast GEMM
    centers = torch.empty(k, x.shape[1], dtype=torch.float32, device=device)
    first = torch.randint(m, (1,), generator=gen, device=device)  # (1,)
    centers[0] = x[first[0]]
    mind = (x - centers[0]).pow(2).sum(dim=1)  # (M,) squared distance to the nearest center
    uniforms = torch.rand(k, trials, generator=gen, device=device, dtype=torch.float64)  # (k, L)
    for i in range(1, k):
        cum = torch.cumsum(mind, dim=0, dtype=torch.float64)  # (M,)
        # If every point is already a center (total 0), target 0 picks point 0: a duplicate.
        cand = torch.searchsorted(cum, uniforms[i] * cum[-1]).clamp_(max=m - 1)  # (L,)
        d_cand = torch.mm(_augment_codebook(x[cand]), xa_t).clamp_min_(0.0)  # (L, M)
        torch.minimum(d_cand, mind.unsqueeze(0), out=d_cand)
        best = d_cand.sum(dim=1, dtype=torch.float64).argmin()  # 0-dim: lowest potential
        centers[i] = x[cand[best]]
        mind = d_cand[best]
    return centers


def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    init: str = "kmeans++",
    seed: int = 0,
    max_points: int | None = None,
    init_codebook: Tensor | None = None,
    chunk_size: int | None = None,
    weights: Tensor | None = None,
) -> KMeansResult:
    """Batched k-means (Lloyd) on the device of ``x`` (method.md §3 "Vector quantization").

    Args:
        x: ``(N, d)`` points.
        k: number of codewords K.
        iters: maximum number of Lloyd updates.
        tol: stop when the relative decrease of the inertia between two assignments is below tol
            (``tol <= 0`` always runs exactly ``iters`` updates).
        init: ``"kmeans++"`` (D^2 sampling; on a seeded subsample of at most
            ``max(65536, 256 * k)`` points, since it needs one pass per codeword) or ``"random"``
            (k distinct random points).
        seed: seed of the private ``torch.Generator`` (subsample, initialisation).
        max_points: if given and N > max_points, fit on a seeded random subsample of that many rows.
        init_codebook: ``(K, d)`` warm start; replaces ``init``.
        chunk_size: points per assignment chunk.
        weights: ``(N, d)`` non-negative per-coordinate weights (see the module docstring): the
            initialisation is the unweighted one, then Lloyd iterations minimise the weighted inertia
            ``mean_i Σ_j w_ij (x_ij − c_j)²``, which is what ``inertia`` reports. None: plain k-means.

    Returns:
        :class:`KMeansResult` with the ``(K, d)`` fp32 codebook, the mean squared distance of the
        fitted points to their nearest codeword, and the number of Lloyd updates.

    Each iteration: assignment (chunked matmul + packed arg-min), then the update by one
    ``index_add_`` of the augmented points (sums and counts). An empty cluster is re-seeded to the
    point farthest from its codeword (the next farthest for the next empty one, ...), which is
    deterministic. With N <= K the codebook is the points themselves, repeated cyclically to K rows
    (inertia 0).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (N, d), got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    device = x.device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    xf = x.to(torch.float32)
    n, d = xf.shape
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    w = _check_weights(xf, weights) if weights is not None else None
    if max_points is not None and n > max_points:
        sel = torch.randperm(n, generator=gen, device=device)[:max_points]
        xf = xf[sel]
        w = w[sel] if w is not None else None
        n = max_points
    xf = xf.contiguous()  # (N, d)

    if init_codebook is not None:
        if init_codebook.shape != (k, d):
            raise ValueError(f"init_codebook must be ({k}, {d}), got {tuple(init_codebook.shape)}")
        c = init_codebook.to(device=device, dtype=torch.float32).clone()  # (K, d)
    elif n <= k:
        c = xf[torch.arange(k, device=device) % n].clone()  # (K, d): every point is a codeword
        return KMeansResult(codebook=c, inertia=0.0, n_iter=0)
    elif init == "random":
        c = xf[torch.randperm(n, generator=gen, device=device)[:k]].clone()
    else:
        m = min(n, max(_INIT_MIN_POINTS, _INIT_POINTS_PER_CODEWORD * k))
        pool = xf if m == n else xf[torch.randperm(n, generator=gen, device=device)[:m]]
        c = kmeanspp_init(pool, k, gen)
    if w is not None:
        return _weighted_lloyd(xf, w.contiguous(), c, iters, tol, chunk_size)

    chunk = chunk_size or _default_chunk(k, device)
    transposed = k <= _TRANSPOSED_MAX_K
    xl = _points_layout(xf, transposed)  # (d + 2, N) or (N, d + 2)
    packed = torch.empty(n, dtype=torch.int32, device=device)  # (N,) work buffers, reused
    idx = torch.empty(n, dtype=torch.int64, device=device)  # (N,) nearest codeword
    dist = torch.empty(n, dtype=torch.float32, device=device)  # (N,) its squared distance
    inertia = _assign_packed(xl, c, chunk, packed, idx, dist)
    n_iter = 0
    for _ in range(iters):
        # One scatter pass over the augmented points gives the sums and (ones column) the counts.
        if transposed:
            stats = torch.zeros(d + 2, k, dtype=torch.float32, device=device).index_add_(1, idx, xl).t()
        else:
            stats = torch.zeros(k, d + 2, dtype=torch.float32, device=device).index_add_(0, idx, xl)
        sums = stats[:, :d]  # (K, d)
        # fp32 counts are exact below 2**24 points
        counts = stats[:, d + 1] if n < (1 << 24) else torch.bincount(idx, minlength=k).float()  # (K,)
        nonempty = counts > 0
        c = torch.where(nonempty.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), c)
        n_empty = int((~nonempty).sum())
        if n_empty:
            far = torch.topk(dist, min(n_empty, n)).indices  # (n_empty,) farthest points
            empty = (~nonempty).nonzero().squeeze(1)[: far.numel()]
            c[empty] = xf[far]
        n_iter += 1
        new_inertia = _assign_packed(xl, c, chunk, packed, idx, dist)
        rel = (inertia - new_inertia) / inertia if inertia > 0 else 0.0
        inertia = new_inertia
        if tol > 0 and rel < tol and not n_empty:
            break
    # Exact inertia of the returned codebook (the packed distances are truncated).
    step = 1 << 16
    gbuf = torch.empty(min(step, n), d, dtype=torch.float32, device=device)  # reused
    total = torch.zeros((), dtype=torch.float64, device=device)
    for s in range(0, n, step):
        e = min(n, s + step)
        g = torch.index_select(c, 0, idx[s:e], out=gbuf[: e - s])  # (c, d) assigned codewords
        total += g.sub_(xf[s:e]).pow_(2).sum()
    return KMeansResult(codebook=c, inertia=float(total) / n, n_iter=n_iter)
