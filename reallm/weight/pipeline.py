"""The encoding pipeline: one weight W (p, q) → its `ReALLMWeight` (frozen part + stored low-rank factors).

    W (p × q)  ≈  Q̂ + L1 L2ᵀ,   Q̂ = unrotate(unpermute(unscale(decode(codes))))

`compress_weight(W, config)` resolves the format's codec once (`reallm.formats.get_codec`) and passes it to every
stage below; the low-rank part alternates with the frozen part (`reallm.ops.lowrank`). Encoding order of the
frozen part (each stage optional; method.md §2–3), one pipeline for every stored format (it knows none by name):

    R = W − L1 L2ᵀ (p, q) → Hadamard rotation → column permutation per row block (n_row_blocks, q) → blocks of
    B0 values (n_blocks, B0) (row-major flattening) → absmax block scales (n_blocks,), double-quantized →
    codec.encode (NF, RTN, VQ, ...) → optionally GPTQ's error feedback re-chooses the codes

A codec that is not `blockwise` ("none") sees R itself; one without `absmax_scales` (RTN) sees the unnormalised
blocks. Decoding runs the same stages backwards (`reallm.weight.decode`); the result is a `ReALLMWeight`
(`reallm.weight.container`), its low-rank factors stored by `reallm.weight.factors`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reallm.core.errors import CompressionError
from reallm.formats import Codec, get_codec
from reallm.ops.gptq import feedback_codes
from reallm.ops.hadamard import rotate
from reallm.ops.lowrank import low_rank_svd, lowrank_decompose
from reallm.ops.packing import pack_bits, unpack_bits
from reallm.ops.permutation import greedy_column_permutation, index_bits, permute_columns
from reallm.ops.scales import block_absmax, quantize_scales
from reallm.ops.weighting import check_moments, position_weights, rotated_column_weights, rotated_moments
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.decode import decode_frozen
from reallm.weight.factors import decode_lowrank, store_lowrank

__all__ = [
    "check_weight",
    "compress_weight",
    "encode_frozen",
    "feedback_applies",
    "normalize_residual",
    "relative_error",
    "shared_training_data",
    "shared_training_vectors",
    "value_weights",
]


@dataclass
class _EncodeState:
    """What alternating iterations reuse instead of recomputing (method.md §1)."""

    perm: Tensor | None = None  # (n_row_blocks, q) column order, computed on the first residual
    codec: dict[str, Any] = field(default_factory=dict)  # the codec's warm start (e.g. the last codebook)


# ---------------------------------------------------------------------------------------------
# the stages of the frozen part around the format's codec (reallm.formats)
# ---------------------------------------------------------------------------------------------
def _rotation_seeds(config: CompressionConfig, name: str) -> tuple[int, int]:
    salt = zlib.crc32(name.encode())
    base = (config.seed * 1_000_003 + salt) % (1 << 31)
    return base, (base + 7919) % (1 << 31)


def _pad_to(flat: Tensor, multiple: int) -> Tensor:
    pad = (-flat.numel()) % multiple
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def normalize_residual(
    R: Tensor,
    config: CompressionConfig,
    name: str = "",
    state: _EncodeState | None = None,
    *,
    codec: Codec | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Rotation, permutation, blocks and block scales applied to R (p, q), as the format asks.

    Returns the blocks to quantize (n_blocks, B0) — normalised by their dequantised absmax scale when
    the format uses absmax scales —, the stored tensors of these stages, and the dequantised scales
    (n_blocks,) (None without absmax scales). `state` keeps the permutation between calls; `codec` is the
    codec of `config.quantizer` when the caller has resolved it.
    """
    state = state if state is not None else _EncodeState()
    codec = codec if codec is not None else get_codec(config.quantizer)
    p, q = R.shape
    stored: dict[str, Tensor] = {}
    X = R
    if config.rotation == "hadamard":
        seeds = _rotation_seeds(config, name)
        X = rotate(X, *seeds)
        stored["rotation_seeds"] = torch.tensor(seeds, dtype=torch.int64)
    if config.permute:
        if state.perm is None:
            state.perm = greedy_column_permutation(X, config.permute_rows)
        X = permute_columns(X, state.perm, config.permute_rows)
        stored["perm"] = pack_bits(state.perm.reshape(-1), index_bits(q))
    blocks = _pad_to(X.reshape(-1), config.block_size).view(-1, config.block_size)  # (n_blocks, B0)
    if not codec.absmax_scales:
        return blocks, stored, None
    qs = quantize_scales(block_absmax(blocks.reshape(-1), config.block_size),
                         config.scale_group, config.scale_bits)
    stored.update(scale_codes=qs.codes, scale_group_max=qs.group_max, scale_offset=qs.offset)
    s_hat = qs.dequantize()  # (n_blocks,)
    safe = torch.where(s_hat > 0, s_hat, torch.ones_like(s_hat))
    return blocks / safe[:, None], stored, s_hat


def value_weights(
    moments: Tensor,
    config: CompressionConfig,
    name: str,
    shape: tuple[int, int],
    perm: Tensor | None,
    scales: Tensor | None,
    *,
    codec: Codec | None = None,
) -> Tensor:
    """Importance of every value the format quantises, in the layout `normalize_residual` gives it: blocks
    (n_blocks, B0) for blockwise formats, the residual's (p, q) otherwise.

    The weight of a value is h_j, the second moment of its original input column j (the diagonal of
    E[x xᵀ], or of B H Bᵀ after the Hadamard rotation B of the columns, `rotated_column_weights`), moved by
    the column permutation, times the square of its block's dequantised scale (a normalised value's error
    is scaled back by it), normalised to mean 1 over the matrix (padding: 0). Σ weights · (X − X̂)² is then
    proportional to the layer's output error tr((W − Ŵ) diag(H) (W − Ŵ)ᵀ).

    Args:
        moments: the layer inputs' second moments, (q,) or (q, q).
        config: the compression config (rotation, permutation, block size).
        name: the layer name (salts the rotation seeds, as in `normalize_residual`).
        shape: (p, q).
        perm: (n_row_blocks, q) column order of the permutation, or None.
        scales: (n_blocks,) dequantised absmax scales, or None (formats without them).
        codec: the codec of `config.quantizer` when the caller has resolved it.
    """
    p, q = shape
    moments = check_moments(moments, q)
    codec = codec if codec is not None else get_codec(config.quantizer)
    if codec.blockwise and config.rotation == "hadamard":
        h = rotated_column_weights(moments.to(torch.float32), _rotation_seeds(config, name)[1])
    else:
        h = torch.diagonal(moments).clone() if moments.dim() == 2 else moments.clone()
    h = h.clamp_min(0.0)  # (q,)
    if not codec.blockwise:
        w = h.view(1, q).expand(p, q)
    else:
        pos = position_weights(h, p, perm if config.permute else None, config.permute_rows)  # (p, q)
        w = _pad_to(pos.reshape(-1), config.block_size).view(-1, config.block_size)  # (n_blocks, B0)
        if scales is not None:
            w = w * scales.to(w).square()[:, None]
    total = float(w.sum(dtype=torch.float64))
    if not total > 0:  # inputs that are all zero: nothing to prefer, plain error
        w = torch.ones_like(w)
        total = float(p * q)
    return (w * (p * q / total)).contiguous()


def encode_frozen(
    R: Tensor,
    config: CompressionConfig,
    name: str = "",
    *,
    shared: dict[str, Tensor] | None = None,
    state: _EncodeState | None = None,
    moments: Tensor | None = None,
    codec: Codec | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any], Tensor, dict[str, Tensor]]:
    """Compress the residual R (p, q) with the config's format.

    Returns (stored tensors, metadata, R̂ (p, q) decoded from them, shared tensors used). `shared` holds
    tensors fitted once for several matrices (`fit_shared`, e.g. a model-wide codebook); `state`
    carries the permutation and the codec's warm start between alternating iterations; `moments`, the
    layer inputs' second moments (q,) or (q, q), make a `weighted` format minimise the output error
    (`value_weights`); other formats ignore them. `codec`: the codec of `config.quantizer` when the caller
    has resolved it (`compress_weight` does, once per matrix); every stage below gets this one.
    """
    state = state or _EncodeState()
    codec = codec if codec is not None else get_codec(config.quantizer)
    if codec.produced_by is not None:
        raise CompressionError(f"quantizer={config.quantizer!r} matrices are built by {codec.produced_by}")
    scales = None
    if codec.blockwise:
        X, stored, scales = normalize_residual(R, config, name, state, codec=codec)
    else:
        X, stored = R, {}
    if moments is not None and codec.weighted:
        weights = value_weights(moments.to(R.device), config, name, tuple(R.shape), state.perm, scales, codec=codec)
        enc = codec.encode(X, config, shared=shared, state=state.codec, weights=weights)
        enc.meta = {**enc.meta, "weighted": True}
    else:
        enc = codec.encode(X, config, shared=shared, state=state.codec)
    d = codec.vector_dim(config)
    feedback = config.error_feedback == "gptq" and feedback_applies(config, codec=codec)
    if feedback and R.shape[1] % d:
        # a d-vector would straddle two rows: its columns have no single place in the column order
        enc.meta = {**enc.meta, "error_feedback": f"skipped: q = {R.shape[1]} is not a multiple of d = {d}"}
    elif feedback:
        if moments is None or moments.dim() != 2:
            raise CompressionError(
                f"{name or 'matrix'}: error_feedback='gptq' needs the full input second moments (q × q) from "
                f"calibration; {'none were given (data-free)' if moments is None else 'only their diagonal was kept'}"
                f" — run with `calibration:` and calibration.full_max ≥ {R.shape[1]}")
        table = codec.kernel_table(enc.stored, config, {**(shared or {}), **enc.shared})
        enc.stored = {**enc.stored, "codes": _feedback_stored_codes(
            X, scales, table, moments.to(R.device), config, name, tuple(R.shape), state.perm, enc.stored["codes"],
            codec.code_width(config))}
        enc.meta = {**enc.meta, "error_feedback": "gptq"}
    stored = {k: v.contiguous() for k, v in {**stored, **enc.stored}.items()}
    R_hat = decode_frozen(stored, enc.meta, config, R.shape, shared=enc.shared, codec=codec)
    return stored, dict(enc.meta), R_hat, enc.shared


def feedback_applies(config: CompressionConfig, *, codec: Codec | None = None) -> bool:
    """Whether `error_feedback` can change this config's codes: formats whose packed codes index a value table
    under absmax block scales (`table_kernels`, e.g. vq, nf). Other formats are encoded as without it (their
    matrices' metadata then carries no "error_feedback"), and so is a matrix whose width q is not a multiple of
    the vector length d (its metadata says "skipped: ..."). `codec`: the codec of `config.quantizer` if resolved."""
    codec = codec if codec is not None else get_codec(config.quantizer)
    return codec.table_kernels and codec.blockwise and codec.absmax_scales


def _feedback_stored_codes(
    blocks: Tensor,
    scales: Tensor,
    table: Tensor,
    moments: Tensor,
    config: CompressionConfig,
    name: str,
    shape: tuple[int, int],
    perm: Tensor | None,
    codes: Tensor,
    width: int,
) -> Tensor:
    """The packed codes of `blocks` re-chosen with GPTQ's error feedback (`reallm.ops.gptq`), scales and table fixed.

    Args:
        blocks: (n_blocks, B0) the normalised blocks `normalize_residual` gave (rotated, permuted residual).
        scales: (n_blocks,) their dequantised absmax scales.
        table: (K, d) the values of the codes.
        moments: E[x xᵀ] (q, q) of the layer's original inputs.
        perm: (n_row_blocks, q) the column order of each row block, or None.
        codes: the packed codes of the plain assignment (padding vectors keep theirs).
        width: bits per packed code (the codec's `code_width`).
    """
    p, q = shape
    d = table.shape[1]
    X = (blocks * scales[:, None]).reshape(-1)[: p * q].view(p, q)  # the values before normalisation
    starts = torch.arange(p, device=X.device)[:, None] * q + torch.arange(0, q, d, device=X.device)[None, :]
    vec_scales = scales[starts // config.block_size]  # (p, q/d): the scale of each vector's block
    H = moments.float()
    if config.rotation == "hadamard":
        H = rotated_moments(H, _rotation_seeds(config, name)[1])
    n_vectors = blocks.numel() // d
    out = unpack_bits(codes, width, n_vectors).to(torch.int64)
    chosen = torch.empty(p, q // d, dtype=torch.int64, device=X.device)
    rows = config.permute_rows if (config.permute and perm is not None) else p
    for b, r0 in enumerate(range(0, p, rows)):
        order = perm[b].to(device=X.device, dtype=torch.int64) if (config.permute and perm is not None) else None
        H_b = H if order is None else H[order][:, order]  # the row block's columns in its stored order
        chosen[r0:r0 + rows] = feedback_codes(X[r0:r0 + rows], vec_scales[r0:r0 + rows], table, H_b,
                                              damp=config.feedback_damp)
    out[: p * q // d] = chosen.reshape(-1)
    return pack_bits(out, width)


# ---------------------------------------------------------------------------------------------
# one matrix, end to end
# ---------------------------------------------------------------------------------------------
def check_weight(W: Tensor, name: str = "") -> None:
    """Raise CompressionError for a weight that cannot be compressed (naming it)."""
    label = f"weight {name!r}" if name else "weight"
    if W.dim() != 2:
        raise CompressionError(f"{label} must be 2-D (out × in), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise CompressionError(f"{label} is empty")
    bad = ~torch.isfinite(W)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise CompressionError(
            f"{label} has {int(bad.sum())} NaN/Inf values (first at index {idx}); refusing to compress"
        )


@torch.no_grad()
def compress_weight(
    W: Tensor,
    config: CompressionConfig,
    *,
    name: str = "",
    shared: dict[str, Tensor] | None = None,
    shared_numel: int | None = None,
    codebook: Tensor | None = None,
    moments: Tensor | None = None,
) -> ReALLMWeight:
    """Compress one weight W (p, q) with `config` (data-free by default; method.md §1–3).

    The codec of `config.quantizer` is resolved here, once, and passed to every stage.

    Args:
        W: the weight in nn.Linear layout (out × in); any float dtype and device.
        config: the compression configuration.
        name: the layer name (salts the rotation seeds; named in errors).
        shared: tensors shared by several matrices, fitted once by `fit_shared_tensors`
            (the format's `can_share`, e.g. vq's options.codebook_scope == "model"), e.g. {"codebook": (K, d) fp16}.
        shared_numel: weights of all matrices sharing them (for the bit accounting).
        codebook: shorthand for shared={"codebook": codebook}.
        moments: the second moments of the layer's inputs on calibration data, E[x xᵀ] (q, q) or its
            diagonal E[x²] (q,): a `weighted` format (VQ) then fits its codebook and assigns its codes under
            the output-error weights (`value_weights`); the low-rank part stays data-free. None: data-free.
    """
    check_weight(W, name)
    codec = get_codec(config.quantizer)
    if codec.produced_by is not None:
        raise CompressionError(f"quantizer={config.quantizer!r} matrices are built by {codec.produced_by}")
    if codebook is not None:
        shared = {**(shared or {}), "codebook": codebook}
    W = W.detach().float()
    p, q = W.shape
    r = config.resolve_rank(p, q)
    state = _EncodeState()

    def quantize(R: Tensor) -> tuple[Tensor, tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor]]]:
        stored, meta, R_hat, used = encode_frozen(R, config, name, shared=shared, state=state, moments=moments,
                                                  codec=codec)
        return R_hat, (stored, meta, used)

    if r == 0:
        R_hat, (frozen, meta, used) = quantize(W)
        lowrank: dict[str, Tensor] = {}
    else:
        def as_stored(L1: Tensor, L2: Tensor) -> tuple[Tensor, Tensor]:  # the factors as they will be kept
            return decode_lowrank(store_lowrank(L1, L2, config.lowrank_dtype), config.lowrank_dtype)

        result = lowrank_decompose(
            W, r, config.lowrank_init, quantize,
            iters=config.lowrank_iters, randomized=config.randomized_svd, seed=config.seed,
            round_factors=as_stored,
        )
        frozen, meta, used = result.q_state
        meta = dict(meta, lowrank_errors=[round(e, 6) for e in result.errors],
                    lowrank_best_iter=result.best_iter)
        lowrank = store_lowrank(result.L1, result.L2, config.lowrank_dtype)
    meta["rank"] = r
    used = {k: v.to(W.device) for k, v in used.items()}
    if used:
        meta["shared_numel"] = int(shared_numel or p * q)
    return ReALLMWeight((p, q), config, frozen, lowrank, meta, used)


# ---------------------------------------------------------------------------------------------
# training data of tensors shared by several matrices (a model-wide codebook)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def shared_training_vectors(W: Tensor, config: CompressionConfig, name: str = "") -> Tensor:
    """The normalised vectors (N, vector_dim) of W's residual after the initial low-rank part, which
    tensors shared by several matrices (a model-wide codebook) are fitted on before any of them is
    encoded."""
    return shared_training_data(W, config, name)[0]


@torch.no_grad()
def shared_training_data(W: Tensor, config: CompressionConfig, name: str = "",
                         moments: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(vectors (N, vector_dim), their weights (N, vector_dim) or None): `shared_training_vectors`, and with
    `moments` (the layer inputs' second moments) the `value_weights` of a `weighted` format, so that a
    shared codebook is fitted under the output-error weights of every sharing matrix."""
    check_weight(W, name)
    W = W.detach().float()
    p, q = W.shape
    r = config.resolve_rank(p, q)
    R = W
    if r and config.lowrank_init != "zero":
        L1, L2 = low_rank_svd(W, r, randomized=config.randomized_svd, seed=config.seed)
        L1, L2 = decode_lowrank(store_lowrank(L1, L2, config.lowrank_dtype), config.lowrank_dtype)  # as stored
        R = W - L1 @ L2.T
    state = _EncodeState()
    codec = get_codec(config.quantizer)
    blocks, _, scales = normalize_residual(R, config, name, state, codec=codec)
    d = codec.vector_dim(config)
    weights = None
    if moments is not None and codec.weighted:
        weights = value_weights(moments.to(W.device), config, name, (p, q), state.perm, scales,
                                codec=codec).reshape(-1, d)
    return blocks.reshape(-1, d), weights


def relative_error(W: Tensor, W_hat: Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F (protocol.md)."""
    W = W.detach().float()
    return float(torch.linalg.vector_norm(W - W_hat.to(W)) / torch.linalg.vector_norm(W).clamp_min(1e-30))
