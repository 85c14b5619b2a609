"""Additive (residual) multi-codebook vector quantization, data-free (AQLM-like).

Each d-vector ``v`` is stored as M codes, one per codebook of K = 2^k codewords, and decoded as the
sum ``v ≈ Σ_m C_m[code_m]`` (AQLM's "MxK" schemes: "2x8" = M 2, k 8, d 8 is 2 bits per weight;
"1x16" = M 1, k 16). Unlike AQLM this fits the plain reconstruction MSE of the weights (no
calibration data, no output-aware loss).

Fit (:func:`additive_fit`):

1. Initialisation by residual k-means (``reallm.ops.kmeans``): codebook 1 on the vectors, codebook 2
   on what codebook 1 leaves, ...; codes by nearest codeword at each stage.
2. Refinement, ``iters`` times or until the relative improvement of the error falls below ``tol``:
   a. codeword update by least squares over all codebooks jointly given the codes
      (:func:`additive_lstsq_update`: normal equations of the one-hot design);
   b. code search by beam search (:func:`additive_encode`), then one pass of codebook-by-codebook
      re-optimisation (each code in turn set to the nearest codeword of what the others leave).
   The error never goes up: an update that raises it (only possible through the fp16 rounding of
   the codebooks) is rejected, and after a code search every vector keeps the better of its old and
   new codes.

Codebooks are kept rounded to fp16 (their storage precision) throughout, so the codes are searched
against exactly the stored codebooks. Everything runs in fp32 on the input's device, chunked over
vectors. Stored bits: codes ``M·k`` per d-vector (:func:`additive_pack_codes`), codebooks
``M·K·d·16`` (:func:`additive_bits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from reallm.ops.kmeans import kmeans
from reallm.ops.packing import pack_bits, unpack_bits

__all__ = [
    "AdditiveResult",
    "additive_bits",
    "additive_decode",
    "additive_encode",
    "additive_errors",
    "additive_fit",
    "additive_lstsq_update",
    "additive_pack_codes",
    "additive_unpack_codes",
]

# Distance entries (chunk * beam * K) per chunk of the beam search: 16 MB of fp32 on CPU (close to
# cache), 256 MB on an accelerator; the top-k indices of the same size are int64.
_CPU_CHUNK_ELEMS = 1 << 22
_GPU_CHUNK_ELEMS = 1 << 26
# Joint least squares solves a dense (M·K)^2 system in fp64 up to this M·K (128 MB); beyond it the
# codebooks are updated one at a time (block coordinate descent, exact per codebook).
_DENSE_LSTSQ_MAX = 4096
# k-means++ seeding is sequential in K; above this K the initial codebooks start from random points.
_KMEANSPP_MAX_K = 4096
_FP16_MAX = 65504.0


@dataclass
class AdditiveResult:
    """Result of :func:`additive_fit`.

    Attributes:
        codebooks: ``(M, K, d)`` fp32, every value exactly representable in fp16 (the stored dtype).
        codes: ``(N, M)`` int64, the codes of *all* input vectors.
        errors: mean over the fitted vectors of the squared L2 error ``‖v − Σ_m C_m[code_m]‖²``:
            after the initialisation, then after each refinement iteration (non-increasing).
        n_iter: number of refinement iterations run.
    """

    codebooks: Tensor
    codes: Tensor
    errors: list[float] = field(default_factory=list)
    n_iter: int = 0


def _check_vectors(vectors: Tensor) -> None:
    if vectors.dim() != 2 or not vectors.is_floating_point():
        raise ValueError(f"vectors must be a floating point (N, d) tensor, got {vectors.dtype} {tuple(vectors.shape)}")
    if vectors.shape[0] and not bool(torch.isfinite(vectors).all()):
        raise ValueError("vectors contain NaN or Inf values")


def _check_codebooks(codebooks: Tensor, d: int | None = None) -> None:
    if codebooks.dim() != 3 or not codebooks.is_floating_point():
        raise ValueError(f"codebooks must be a floating point (M, K, d) tensor, got {tuple(codebooks.shape)}")
    if d is not None and codebooks.shape[2] != d:
        raise ValueError(f"codebooks have dimension {codebooks.shape[2]}, vectors {d}")


def _check_codes(codes: Tensor, codebooks: Tensor) -> None:
    m, k = codebooks.shape[:2]
    if codes.dim() != 2 or codes.shape[1] != m or codes.is_floating_point():
        raise ValueError(f"codes must be an integer (N, {m}) tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"codes must lie in [0, {k}), got range [{int(codes.min())}, {int(codes.max())}]")


def _to_fp16_grid(c: Tensor) -> Tensor:
    """Round to the nearest fp16 value (the stored precision), kept as fp32."""
    return c.to(torch.float16).to(torch.float32)


def additive_decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """``Σ_m codebooks[m, codes[:, m]]``.

    Args:
        codes: integer ``(N, M)`` codes.
        codebooks: ``(M, K, d)``.

    Returns:
        ``(N, d)`` fp32 on the codebooks' device.
    """
    _check_codebooks(codebooks)
    _check_codes(codes, codebooks)
    cb = codebooks.to(torch.float32)
    codes = codes.to(device=cb.device, dtype=torch.int64)
    out = torch.zeros(codes.shape[0], cb.shape[2], dtype=torch.float32, device=cb.device)  # (N, d)
    for m in range(cb.shape[0]):
        out += cb[m].index_select(0, codes[:, m])
    return out


def additive_errors(vectors: Tensor, codes: Tensor, codebooks: Tensor) -> Tensor:
    """Per-vector squared L2 error ``‖v − decode(codes)‖²``, fp32 ``(N,)`` (direct differences)."""
    return (vectors.to(torch.float32) - additive_decode(codes, codebooks)).pow_(2).sum(dim=1)


def _beam_search(v: Tensor, cb: Tensor, beam: int, chunk: int) -> Tensor:
    """Codes ``(N, M)`` by beam search over the codebooks in order 0..M-1 (width 1 = greedy)."""
    n, d = v.shape
    m_books, k, _ = cb.shape
    codes = torch.empty(n, m_books, dtype=torch.int64, device=v.device)
    cb_t = cb.transpose(1, 2).contiguous()  # (M, d, K)
    cnorm = (cb * cb).sum(dim=2)  # (M, K)
    for s in range(0, n, chunk):
        vs = v[s : s + chunk]  # (c, d)
        c = vs.shape[0]
        partial = vs.new_zeros(c, 1, d)  # (c, B, d) partial sums of the kept candidates
        path = torch.empty(c, 1, 0, dtype=torch.int64, device=v.device)  # (c, B, m) their codes
        for m in range(m_books):
            b_prev = partial.shape[1]
            r = (vs.unsqueeze(1) - partial).reshape(c * b_prev, d)  # (c * B, d) residuals
            rnorm = (r * r).sum(dim=1, keepdim=True)  # (c * B, 1)
            dist = torch.addmm(cnorm[m], r, cb_t[m], alpha=-2.0).add_(rnorm)  # (c * B, K) ‖r - C_m‖²
            width = 1 if m == m_books - 1 else min(beam, b_prev * k)
            _, top = dist.view(c, b_prev * k).topk(width, dim=1, largest=False, sorted=True)  # (c, W)
            src, code = top // k, top % k  # (c, W) beam it extends, codeword
            path = torch.cat(
                [path.gather(1, src.unsqueeze(2).expand(c, width, m)), code.unsqueeze(2)], dim=2
            )  # (c, W, m + 1)
            partial = partial.gather(1, src.unsqueeze(2).expand(c, width, d)) + cb[m][code]  # (c, W, d)
        codes[s : s + chunk] = path[:, 0]
    return codes


def _keep_better(v: Tensor, cb: Tensor, codes: Tensor, err: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """Per vector, the codes (of ``codes`` with errors ``err``, and ``other``) with the smaller
    direct error; ties keep ``codes``. Returns (codes, errors)."""
    err_other = additive_errors(v, other, cb)  # (N,)
    better = err_other < err  # (N,)
    return torch.where(better.unsqueeze(1), other, codes), torch.where(better, err_other, err)


def additive_encode(
    vectors: Tensor,
    codebooks: Tensor,
    beam: int = 1,
    *,
    init_codes: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Codes of ``vectors`` for fixed (e.g. shared) codebooks, by beam search.

    Args:
        vectors: ``(N, d)``.
        codebooks: ``(M, K, d)``.
        beam: beam width. At stage m the ``beam`` best partial sums per vector are kept among
            ``beam × K`` candidates; 1 is greedy residual assignment.
        init_codes: ``(N, M)`` current codes; every vector keeps the better of these and the search
            result (so the error never goes up).
        chunk_size: vectors per chunk (default: ``chunk · beam · K`` about 4M floats on CPU, 64M on
            an accelerator).

    Returns:
        int64 ``(N, M)`` codes on ``vectors.device``.

    For ``beam > 1`` the greedy result is computed as well and kept where it is better: a beam search
    alone can prune greedy's partial sum and end worse than greedy for some vectors, so this makes
    "never worse than greedy, per vector" a guarantee.
    """
    _check_vectors(vectors)
    _check_codebooks(codebooks, vectors.shape[1])
    if not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be a positive int, got {beam!r}")
    v = vectors.to(torch.float32)
    cb = codebooks.to(device=v.device, dtype=torch.float32)
    k = cb.shape[1]
    codes = _beam_search(v, cb, beam, _chunk(v.device, beam * k, chunk_size))
    if beam > 1 or init_codes is not None:
        err = additive_errors(v, codes, cb)
        if beam > 1:
            codes, err = _keep_better(v, cb, codes, err, _beam_search(v, cb, 1, _chunk(v.device, k, chunk_size)))
        if init_codes is not None:
            _check_codes(init_codes, cb)
            codes, err = _keep_better(v, cb, codes, err, init_codes.to(device=v.device, dtype=torch.int64))
    return codes


def _chunk(device: torch.device, width: int, chunk_size: int | None) -> int:
    """Vectors per chunk so that ``chunk * width`` distances fit the per-chunk budget."""
    elems = _GPU_CHUNK_ELEMS if device.type != "cpu" else _CPU_CHUNK_ELEMS
    return chunk_size or max(1, elems // width)


def _nearest(x: Tensor, c: Tensor, chunk_size: int | None = None) -> Tensor:
    """Nearest codeword of each row of ``x`` (N, d) in ``c`` (K, d), int64 ``(N,)``: the distance
    expansion of the beam search with width 1 (no near-tie re-check: callers compare direct errors)."""
    return _beam_search(x, c.unsqueeze(0), 1, _chunk(x.device, c.shape[0], chunk_size))[:, 0]


def _coordinate_pass(v: Tensor, cb: Tensor, codes: Tensor, chunk_size: int | None) -> Tensor:
    """Each codebook in turn: its code becomes the nearest codeword of what the others leave."""
    codes = codes.clone()
    recon = additive_decode(codes, cb)  # (N, d)
    for m in range(cb.shape[0]):
        own = cb[m].index_select(0, codes[:, m])  # (N, d)
        target = v - recon + own  # (N, d) what the other codebooks leave
        new = _nearest(target, cb[m], chunk_size)  # (N,)
        recon += cb[m].index_select(0, new) - own
        codes[:, m] = new
    return codes


def additive_lstsq_update(vectors: Tensor, codes: Tensor, codebooks: Tensor, ridge: float = 1e-6) -> Tensor:
    """Codebooks minimising ``Σ_n ‖v_n − Σ_m C_m[codes_nm]‖²`` given the codes, all jointly.

    Args:
        vectors: ``(N, d)``.
        codes: ``(N, M)``.
        codebooks: ``(M, K, d)`` current codebooks (unused codewords keep their value).
        ridge: Tikhonov weight relative to the mean codeword count, pulling towards the current
            codebooks: ``(G + λI) C = XᵀV + λ C_old`` with ``λ = ridge · N / K``. It makes the system
            definite: G is singular for M ≥ 2 (a constant moved from one codebook to another changes
            nothing) and for unused codewords; along those directions the solution is ``C_old``.

    Returns:
        ``(M, K, d)`` fp32 (not rounded to fp16).

    With X the ``(N, M·K)`` one-hot design (row n has a 1 in column ``m·K + codes[n, m]`` for each
    m), ``G = XᵀX`` is built from code co-occurrence counts (``bincount`` of code pairs per pair of
    codebooks; counts on the diagonal) and ``XᵀV`` by ``index_add``; the system is solved in fp64 by
    ``torch.linalg.solve``. When ``M·K > 4096`` the dense system is too large and the codebooks are
    instead updated one after the other (each one exactly, given the others: the mean of what the
    others leave over the vectors using each codeword; exact joint LS for M = 1).
    """
    _check_vectors(vectors)
    _check_codebooks(codebooks, vectors.shape[1])
    _check_codes(codes, codebooks)
    m_books, k, d = codebooks.shape
    device = codebooks.device
    v = vectors.to(device=device, dtype=torch.float64)  # (N, d)
    codes = codes.to(device=device, dtype=torch.int64)
    old = codebooks.to(torch.float64)
    n = v.shape[0]
    if m_books * k > _DENSE_LSTSQ_MAX:
        cb = old.clone()
        for m in range(m_books):
            others = additive_decode(codes, cb.to(torch.float32)).to(torch.float64) - cb[m].index_select(0, codes[:, m])
            target = v - others  # (N, d)
            sums = torch.zeros(k, d, dtype=torch.float64, device=device).index_add_(0, codes[:, m], target)
            counts = torch.bincount(codes[:, m], minlength=k).to(torch.float64)  # (K,)
            used = counts > 0
            cb[m] = torch.where(used.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), cb[m])
        return cb.to(torch.float32)
    mk = m_books * k
    gram = torch.zeros(mk, mk, dtype=torch.float64, device=device)  # (MK, MK)
    rhs = torch.zeros(mk, d, dtype=torch.float64, device=device)  # (MK, d)
    for a in range(m_books):
        ca = codes[:, a]
        counts = torch.bincount(ca, minlength=k).to(torch.float64)  # (K,)
        gram[a * k : (a + 1) * k, a * k : (a + 1) * k] = torch.diag(counts)
        rhs[a * k : (a + 1) * k].index_add_(0, ca, v)
        for b in range(a + 1, m_books):
            pair = torch.bincount(ca * k + codes[:, b], minlength=k * k).view(k, k).to(torch.float64)  # (K, K)
            gram[a * k : (a + 1) * k, b * k : (b + 1) * k] = pair
            gram[b * k : (b + 1) * k, a * k : (a + 1) * k] = pair.t()
    lam = ridge * max(1.0, n / k)
    gram.diagonal().add_(lam)
    sol = torch.linalg.solve(gram, rhs + lam * old.reshape(mk, d))  # (MK, d)
    return sol.reshape(m_books, k, d).to(torch.float32)


def additive_fit(
    vectors: Tensor,
    M: int,
    k: int,
    *,
    beam: int = 1,
    iters: int = 10,
    tol: float = 1e-4,
    seed: int = 0,
    max_points: int | None = None,
    init_codebooks: Tensor | None = None,
    kmeans_iters: int = 30,
    ridge: float = 1e-6,
    chunk_size: int | None = None,
) -> AdditiveResult:
    """Fit M codebooks of 2^k codewords to ``vectors`` (module docstring) and encode them.

    Args:
        vectors: ``(N, d)`` values (e.g. a normalised weight matrix cut into d-vectors).
        M: number of codebooks (codes per vector).
        k: bits per code (K = 2^k codewords per codebook), 1..16.
        beam: beam width of the code search (1 = greedy residual assignment).
        iters: maximum refinement iterations (0: residual k-means only).
        tol: stop when the relative decrease of the error in one iteration is below tol.
        seed: seed of the subsample and of the k-means initialisations (codebook m uses seed + m).
        max_points: if given and N > max_points, fit on a seeded random subsample of that many
            vectors, then encode every vector with the fitted codebooks (beam search).
        init_codebooks: ``(M, K, d)`` warm start instead of residual k-means (rounded to fp16).
        kmeans_iters: Lloyd iterations of each initial k-means (k-means++ seeding up to K = 4096,
            random points above).
        ridge: see :func:`additive_lstsq_update`.
        chunk_size: vectors per chunk of the beam search.

    Returns:
        :class:`AdditiveResult`.
    """
    _check_vectors(vectors)
    if not isinstance(M, int) or M < 1:
        raise ValueError(f"M must be a positive int, got {M!r}")
    if not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"k must be an int in 1..16, got {k!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("additive_fit needs at least one vector")
    if float(vectors.abs().max()) > _FP16_MAX:
        raise ValueError("vectors exceed the fp16 range of the stored codebooks; normalise them first")
    device = vectors.device
    v_all = vectors.to(torch.float32)
    v = v_all
    if max_points is not None and n > max_points:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        v = v_all[torch.randperm(n, generator=gen, device=device)[:max_points]].contiguous()
    K = 1 << k

    if init_codebooks is not None:
        if tuple(init_codebooks.shape) != (M, K, d):
            raise ValueError(f"init_codebooks must be ({M}, {K}, {d}), got {tuple(init_codebooks.shape)}")
        cb = _to_fp16_grid(init_codebooks.to(device=device, dtype=torch.float32))
        codes = additive_encode(v, cb, beam, chunk_size=chunk_size)
    else:
        books, cols = [], []
        residual = v
        for m in range(M):
            init = "kmeans++" if K <= _KMEANSPP_MAX_K else "random"
            c_m = _to_fp16_grid(kmeans(residual, K, iters=kmeans_iters, init=init, seed=seed + m).codebook)
            code_m = _nearest(residual, c_m, chunk_size)  # (N,)
            residual = residual - c_m.index_select(0, code_m)
            books.append(c_m)
            cols.append(code_m)
        cb = torch.stack(books)  # (M, K, d)
        codes = torch.stack(cols, dim=1)  # (N, M)

    err = additive_errors(v, codes, cb)  # (N,)
    errors = [float(err.double().mean())]
    n_iter = 0
    for _ in range(iters):
        # (a) joint least-squares codewords; rejected if the fp16 rounding made it worse
        new_cb = _to_fp16_grid(additive_lstsq_update(v, codes, cb, ridge))
        new_err = additive_errors(v, codes, new_cb)
        if float(new_err.double().sum()) <= float(err.double().sum()):
            cb, err = new_cb, new_err
        # (b) beam search, then codebook-by-codebook re-optimisation; every vector keeps its best
        searched = additive_encode(v, cb, beam, chunk_size=chunk_size)
        if M > 1:  # with one codebook the search above is already the exact nearest codeword
            searched = _coordinate_pass(v, cb, searched, chunk_size)
        codes, err = _keep_better(v, cb, codes, err, searched)
        n_iter += 1
        errors.append(float(err.double().mean()))
        prev = errors[-2]
        if prev <= 0 or (prev - errors[-1]) / prev < tol:
            break
    if v is not v_all:
        codes = additive_encode(v_all, cb, beam, chunk_size=chunk_size)
    return AdditiveResult(codebooks=cb, codes=codes, errors=errors, n_iter=n_iter)


def additive_pack_codes(codes: Tensor, k: int) -> Tensor:
    """Pack ``(N, M)`` codes of k bits into a uint8 stream of ``ceil(N·M·k / 8)`` bytes.

    The codes are packed row-major at width k (``reallm.ops.packing``, little-endian), which is
    bit-for-bit the stream of the combined per-vector codes ``Σ_m codes[:, m] << (m·k)`` packed at
    width ``M·k`` (when ``M·k <= 16``): exactly ``M·k`` bits per vector either way.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, M), got shape {tuple(codes.shape)}")
    return pack_bits(codes, k)


def additive_unpack_codes(packed: Tensor, n: int, M: int, k: int) -> Tensor:
    """Inverse of :func:`additive_pack_codes`: int64 ``(n, M)``."""
    return unpack_bits(packed, k, n * M).view(n, M)


def additive_bits(n_vectors: int, M: int, k: int, d: int) -> dict[str, int]:
    """Stored bits: ``{"codes": n·M·k, "codebooks": M·2^k·d·16}`` (fp16 codebooks)."""
    return {"codes": n_vectors * M * k, "codebooks": M * (1 << k) * d * 16}

