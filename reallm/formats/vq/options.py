"""The `vq` format's own options (`CompressionConfig.options` when `quantizer: vq`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from reallm.formats.base import FormatOptions

__all__ = ["VQOptions"]


@dataclass
class VQOptions(FormatOptions):
    """Options of `vq`, k-means vector quantisation of d-vectors.

    Args:
        dim: vector dimension d (1, 2, 4 or 8; b·d ≤ 16): the codebook has K = 2^(b·d) codewords.
        kmeans_iters: maximum Lloyd iterations of the k-means codebook.
        kmeans_tol: stop k-means when the relative decrease of the inertia falls below this.
        kmeans_init: "kmeans++" or "random".
        kmeans_max_points: fit the codebook on at most this many vectors (a seeded subsample); every vector
            is still assigned exactly. None fits on all vectors.
        codebook_scope: "matrix" learns one codebook per matrix; "model" shares one codebook among all matrices
            compressed with this config (its bits are divided among them in proportion to their sizes) — what
            small models need, where a per-matrix codebook would cost more than the codes.
    """

    legacy_keys: ClassVar[dict[str, str]] = {
        "vq_dim": "dim", "kmeans_iters": "kmeans_iters", "kmeans_tol": "kmeans_tol", "kmeans_init": "kmeans_init",
        "kmeans_max_points": "kmeans_max_points", "codebook_scope": "codebook_scope"}

    dim: int = 2
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-4
    kmeans_init: Literal["kmeans++", "random"] = "kmeans++"
    kmeans_max_points: int | None = 1 << 20
    codebook_scope: Literal["matrix", "model"] = "matrix"
