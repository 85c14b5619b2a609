"""`additive`: additive multi-codebook vector quantisation (AQLM-like, data-free; `reallm.formats.additive.search`).

Each d-vector of the absmax-normalised blocks (d consecutive values of one row, like `vq`) is the sum of
M codewords, one from each of M codebooks of K = 2^k codewords, k = b·d / M: AQLM's "2x8" is b = 2,
d = 8, M = 2 (K = 256), its "1x16" b = 2, d = 8, M = 1 (K = 65536). The codebooks are fitted by
residual k-means and refined by joint least-squares codeword updates and beam-search code updates
(options `beam`, `refine_iters`: `reallm.formats.additive.options`), per matrix or once for every
matrix of a config (option `codebook_scope: model`, a shared tensor whose bits are divided among the matrices).

Stored: `codes`, the (n_vectors, M) codes packed row-major at k bits (b·d bits per vector, exactly
b per weight), and `codebooks` (M, K, d) in fp16. AQLM itself also fine-tunes on calibration data and
scales each output row; this format fits the plain reconstruction error and uses the pipeline's
absmax block scales instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.formats.additive.options import AdditiveOptions
from reallm.formats.additive.search import additive_encode, additive_fit, additive_pack_codes
from reallm.formats.base import Codec, Encoded
from reallm.formats.registry import register
from reallm.ops.packing import unpack_bits


def code_bits(config) -> int:
    """k: bits of one code, i.e. log2 of each codebook's size (b·d / M)."""
    return config.bits * config.options.dim // config.options.codebooks


def fit_codebooks(vectors: Tensor, config, init: Tensor | None = None, max_points: int | None = None):
    """`additive_fit` of `vectors` (N, d) with the config's settings (codebooks on fp16 values)."""
    opts: AdditiveOptions = config.options
    return additive_fit(
        vectors, opts.codebooks, code_bits(config),
        beam=opts.beam, iters=opts.refine_iters, tol=opts.kmeans_tol, seed=config.seed,
        max_points=max_points, init_codebooks=init, kmeans_iters=opts.kmeans_iters,
    )


@register
class AdditiveQuantizer(Codec):
    name = "additive"
    options = AdditiveOptions
    summary = "sum of M codewords from M codebooks of 2^(b·d/M) d-vectors, beam search (AQLM-like), absmax block scales"
    bit_items = {"codes": "codes", "codebooks": "codebook"}
    trainable = {"codebook": ("codebooks",)}  # fine-tuning may train the codebooks (AQLM's PV-tuning does)

    def validate(self, config) -> None:
        if config.options.dim not in (1, 2, 4, 8, 16):
            raise ValueError(f"additive: dim must be 1, 2, 4, 8 or 16, got {config.options.dim}")
        if config.options.codebooks < 1:
            raise ValueError(f"additive: codebooks (M) must be ≥ 1, got {config.options.codebooks}")
        per_vector = config.bits * config.options.dim
        if per_vector % config.options.codebooks or not 1 <= per_vector // config.options.codebooks <= 16:
            raise ValueError(f"additive: b·d / M must be an integer in 1..16 (bits per code), got "
                             f"bits={config.bits} × dim={config.options.dim} / codebooks={config.options.codebooks}")
        if config.options.beam < 1:
            raise ValueError(f"additive: beam must be ≥ 1, got {config.options.beam}")
        if config.options.refine_iters < 0:
            raise ValueError(f"additive: refine_iters must be ≥ 0, got {config.options.refine_iters}")

    def vector_dim(self, config) -> int:
        return config.options.dim

    def code_width(self, config) -> int:
        """Bits of one vector's M codes together (b·d); each code has `code_bits(config)` bits."""
        return config.bits * config.options.dim

    def decode_macs_per_weight(self, meta: dict[str, Any], config) -> float:
        return float(config.options.codebooks)  # one gathered codeword value added per codebook

    def can_share(self, config) -> bool:
        return config.options.codebook_scope == "model"

    def sample_size(self, config) -> int | None:
        return config.options.kmeans_max_points

    def fit_shared(self, vectors: Tensor, config) -> dict[str, Tensor]:
        # the pooled vectors are already subsampled to kmeans_max_points by the caller
        return {"codebooks": fit_codebooks(vectors, config).codebooks.to(torch.float16)}

    def encode(self, X: Tensor, config, *, shared=None, state=None) -> Encoded:
        vectors = X.reshape(-1, config.options.dim)  # (n_vectors, d)
        if shared and "codebooks" in shared:
            books = shared["codebooks"].to(device=X.device, dtype=torch.float16)
            codes = additive_encode(vectors, books.float(), config.options.beam)  # (n_vectors, M)
            return Encoded({"codes": additive_pack_codes(codes, code_bits(config))}, shared={"codebooks": books})
        warm = state.get("codebooks") if state is not None else None
        res = fit_codebooks(vectors, config, init=warm, max_points=config.options.kmeans_max_points)
        if state is not None:
            state["codebooks"] = res.codebooks  # warm start of the next alternating iteration
        return Encoded({"codes": additive_pack_codes(res.codes, code_bits(config)),
                        "codebooks": res.codebooks.to(torch.float16)})

    def decode_range(self, stored: dict[str, Tensor], meta: dict[str, Any], config, shape, shared, start: int,
                     stop: int) -> Tensor:
        books = stored.get("codebooks", shared.get("codebooks"))
        if books is None:
            raise KeyError("additive matrix without its codebooks (shared codebooks missing)")
        M, d = config.options.codebooks, config.options.dim
        per_block = config.block_size // d  # vectors per block
        n = (stop - start) * per_block
        codes = stored["codes"]
        books = books.to(device=codes.device, dtype=torch.float32)  # (M, K, d)
        idx = unpack_bits(codes, code_bits(config), n * M, start=start * per_block * M).view(n, M)  # only the range
        out = books[0].index_select(0, idx[:, 0])  # (n, d)
        for m in range(1, M):
            out += books[m].index_select(0, idx[:, m])
        return out.view(stop - start, config.block_size)

    def stored_layout(self, config, shape, n_blocks, *, shared=False):
        """The M codes of each d-vector packed at k bits, then the fp16 codebooks (M, 2^k, d) — the matrix's own,
        or shared."""
        M, d, k = config.options.codebooks, config.options.dim, code_bits(config)
        codes = {"codes": self.packed(n_blocks * config.block_size // d * M, k)}
        books = {"codebooks": self.spec((M, 1 << k, d), torch.float16)}
        return (codes, books) if shared else ({**codes, **books}, {})
