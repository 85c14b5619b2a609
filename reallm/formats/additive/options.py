"""The `additive` format's own options (`CompressionConfig.options` when `quantizer: additive`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from reallm.formats.base import FormatOptions

__all__ = ["AdditiveOptions"]


@dataclass
class AdditiveOptions(FormatOptions):
    """Options of `additive`, M codebooks whose codewords are summed (AQLM-like).

    Args:
        dim: vector dimension d (1, 2, 4, 8 or 16).
        codebooks: number M of codebooks, i.e. codes per d-vector. Each codebook has K = 2^(b·d/M) codewords
            (b·d/M must be an integer in 1..16): b = 2, d = 8, M = 2 is AQLM's "2x8", M = 1 its "1x16".
        beam: beam width of the code search (1 = greedy residual assignment).
        refine_iters: refinement iterations after the residual k-means initialisation (each a joint least-squares
            codeword update and a beam-search code update; stops early when the error improves by less than
            kmeans_tol, relatively).
        kmeans_iters: maximum Lloyd iterations of each codebook's initial k-means (its initialisation is
            k-means++ up to 4096 codewords, random points above).
        kmeans_tol: relative-improvement threshold of the k-means and of the refinement.
        kmeans_max_points: fit the codebooks on at most this many vectors (a seeded subsample); every vector is
            still encoded. None fits on all vectors.
        codebook_scope: "matrix" fits codebooks per matrix; "model" shares them among all matrices compressed
            with this config (their bits divided among them in proportion to their sizes).
    """

    legacy_keys: ClassVar[dict[str, str]] = {
        "vq_dim": "dim", "codebooks": "codebooks", "beam": "beam", "refine_iters": "refine_iters",
        "kmeans_iters": "kmeans_iters", "kmeans_tol": "kmeans_tol", "kmeans_max_points": "kmeans_max_points",
        "codebook_scope": "codebook_scope"}

    dim: int = 8
    codebooks: int = 2
    beam: int = 8
    refine_iters: int = 10
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-4
    kmeans_max_points: int | None = 1 << 20
    codebook_scope: Literal["matrix", "model"] = "matrix"
