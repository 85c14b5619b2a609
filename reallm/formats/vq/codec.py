"""`vq`: k-means vector quantisation of horizontal d-vectors of absmax-normalised blocks (method.md §3).

Vectors are d consecutive values of the row-major stream, i.e. d neighbouring columns of one row
(after the column permutation has put similar columns side by side). The codebook (K = 2^(b·d)
codewords, fp16) is fitted per matrix, or once for every matrix of a config (option
`codebook_scope: model`, a shared tensor whose bits are divided among the matrices).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.formats.base import Codec, Encoded
from reallm.formats.registry import register
from reallm.formats.vq.options import VQOptions
from reallm.ops.kmeans import assign, kmeans
from reallm.ops.lut import decode_codes
from reallm.ops.packing import pack_bits


def fit_codebook(vectors: Tensor, config, init: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """k-means codebook (K, d) of `vectors` (N, d), rounded to its fp16 storage, returned in fp32 (weighted
    k-means with per-coordinate `weights` (N, d) when given)."""
    opts: VQOptions = config.options
    res = kmeans(
        vectors,
        1 << (config.bits * opts.dim),  # K = 2^(b·d) codewords (method.md §3; the paper's "2^(b−d)" is a typo)
        iters=opts.kmeans_iters,
        tol=opts.kmeans_tol,
        init=opts.kmeans_init,
        seed=config.seed,
        max_points=opts.kmeans_max_points,
        init_codebook=init,
        weights=weights,
    )
    return res.codebook.to(torch.float16).float()


@register
class VectorQuantizer(Codec):
    name = "vq"
    summary = "k-means codebook of 2^(b·d) d-vectors, absmax block scales (ReALLM without decoder)"
    options = VQOptions
    bit_items = {"codes": "codes", "codebook": "codebook"}
    table_kernels = True
    trainable = {"codebook": ("codebook",)}
    weighted = True  # weighted k-means and nearest codeword under Σ_j w_j (x_j − c_j)² within a vector

    def kernel_table(self, stored: dict[str, Tensor], config, shared) -> Tensor:
        codebook = stored.get("codebook", shared.get("codebook"))
        if codebook is None:
            raise KeyError("VQ matrix without its codebook (shared codebook missing)")
        return codebook.to(device=stored["codes"].device, dtype=torch.float32).contiguous()  # (K, d)

    def validate(self, config) -> None:
        opts: VQOptions = config.options
        if opts.dim not in (1, 2, 4, 8):
            raise ValueError(f"vq: dim must be 1, 2, 4 or 8, got {opts.dim}")
        if not 1 <= config.bits * opts.dim <= 16:
            raise ValueError(f"vq: b·d must be in 1..16 (codebook of 2^(b·d) codewords), got "
                             f"bits={config.bits} × dim={opts.dim}")
        if opts.codebook_scope not in ("matrix", "model"):
            raise ValueError(f"vq: codebook_scope must be 'matrix' or 'model', got {opts.codebook_scope!r}")

    def vector_dim(self, config) -> int:
        return config.options.dim

    def can_share(self, config) -> bool:
        return config.options.codebook_scope == "model"

    def sample_size(self, config) -> int | None:
        return config.options.kmeans_max_points

    def fit_shared(self, vectors: Tensor, config, weights: Tensor | None = None) -> dict[str, Tensor]:
        return {"codebook": fit_codebook(vectors, config, weights=weights).to(torch.float16)}

    def encode(self, X: Tensor, config, *, shared=None, state=None, weights=None) -> Encoded:
        vectors = X.reshape(-1, config.options.dim)  # (n_vectors, d)
        w = weights.reshape(-1, config.options.dim) if weights is not None else None  # (n_vectors, d)
        stored: dict[str, Tensor] = {}
        if shared and "codebook" in shared:
            codebook = shared["codebook"].to(device=X.device, dtype=torch.float16).float()
            used = {"codebook": shared["codebook"].to(device=X.device, dtype=torch.float16)}
        else:
            warm = state.get("codebook") if state is not None else None
            codebook = fit_codebook(vectors, config, init=warm, weights=w)  # (K, d) fp32 of fp16 values
            if state is not None:
                state["codebook"] = codebook
            stored["codebook"] = codebook.to(torch.float16)
            used = {}
        stored["codes"] = pack_bits(assign(vectors, codebook, weights=w), self.code_width(config))
        return Encoded(stored, shared=used)

    def decode_range(self, stored: dict[str, Tensor], meta: dict[str, Any], config, shape, shared, start: int,
                     stop: int) -> Tensor:
        codebook = stored.get("codebook", shared.get("codebook"))
        if codebook is None:
            raise KeyError("VQ matrix without its codebook (shared codebook missing)")
        per_block = config.block_size // config.options.dim  # vectors per block
        values = decode_codes(stored["codes"], self.code_width(config), (stop - start) * per_block,
                              codebook.float().to(stored["codes"].device), start=start * per_block)
        return values.view(stop - start, config.block_size)  # (n_vectors, d) → blocks

    def stored_layout(self, config, shape, n_blocks, *, shared=False):
        """The fp16 codebook (2^(b·d), d) — the matrix's own, or shared — then the packed codes."""
        codebook = {"codebook": self.spec((1 << self.code_width(config), config.options.dim), torch.float16)}
        codes, _ = super().stored_layout(config, shape, n_blocks)
        return (codes, codebook) if shared else ({**codebook, **codes}, {})
