"""The ReALLM weight container: one matrix's frozen compressed part plus its low-rank factors.

    W (p × q)  ≈  Q̂ + L1 L2ᵀ,   Q̂ = unrotate(unpermute(unscale(decode(codes))))

`compress_weight(W, config)` builds it; `dequantize()` rebuilds Q̂ + L1 L2ᵀ in W's layout; `bits()`
counts every stored tensor at its stored precision (protocol.md, "Bit accounting"); `to_dict()` /
`from_dict()` convert to a flat dict of tensors plus JSON-able metadata (safetensors-friendly).

Encoding order of the frozen part (each stage optional; method.md §2–3), one pipeline for every
stored format (it knows none by name; the format is a codec of `reallm.formats`):
    R = W − L1 L2ᵀ → Hadamard rotation → column permutation per row block → blocks of B0 values
    (row-major flattening) → absmax block scales (double-quantized) → codec.encode (NF, RTN, VQ, ...).
A codec that is not `blockwise` ("none") sees R itself; one without `absmax_scales` (RTN) sees the
unnormalised blocks. Decoding runs the same stages backwards from codec.decode.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reallm.core.errors import CompressionError
from reallm.formats import PIPELINE_BIT_ITEMS, get_codec
from reallm.ops import precision as storage
from reallm.ops.gptq import feedback_codes
from reallm.ops.hadamard import rotate, unrotate
from reallm.ops.lowrank import low_rank_svd, lowrank_decompose
from reallm.ops.lut import decode_codes
from reallm.ops.packing import pack_bits, unpack_bits
from reallm.ops.permutation import (
    greedy_column_permutation,
    index_bits,
    permute_columns,
    unpermute_columns,
)
from reallm.ops.scales import QuantizedScales, block_absmax, quantize_scales
from reallm.ops.weighting import check_moments, position_weights, rotated_column_weights, rotated_moments
from reallm.weight.config import CompressionConfig


@dataclass
class _EncodeState:
    """What alternating iterations reuse instead of recomputing (method.md §1)."""

    perm: Tensor | None = None  # (n_row_blocks, q) column order, computed on the first residual
    codec: dict[str, Any] = field(default_factory=dict)  # the codec's warm start (e.g. the last codebook)


# ---------------------------------------------------------------------------------------------
# frozen part: the shared pipeline around the format's codec (reallm.formats)
# ---------------------------------------------------------------------------------------------
def _rotation_seeds(config: CompressionConfig, name: str) -> tuple[int, int]:
    salt = zlib.crc32(name.encode())
    base = (config.seed * 1_000_003 + salt) % (1 << 31)
    return base, (base + 7919) % (1 << 31)


def _pad_to(flat: Tensor, multiple: int) -> Tensor:
    pad = (-flat.numel()) % multiple
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def n_blocks_of(shape: tuple[int, int], block_size: int) -> int:
    """Blocks of `block_size` values in the row-major flattening of a (p, q) matrix (last one padded)."""
    return -(-shape[0] * shape[1] // block_size)


def normalize_residual(
    R: Tensor, config: CompressionConfig, name: str = "", state: _EncodeState | None = None
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Rotation, permutation, blocks and block scales applied to R (p, q), as the format asks.

    Returns the blocks to quantize (n_blocks, B0) — normalised by their dequantised absmax scale when
    the format uses absmax scales —, the stored tensors of these stages, and the dequantised scales
    (n_blocks,) (None without absmax scales). `state` keeps the permutation between calls.
    """
    state = state if state is not None else _EncodeState()
    codec = get_codec(config.quantizer)
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
    """
    p, q = shape
    moments = check_moments(moments, q)
    codec = get_codec(config.quantizer)
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
) -> tuple[dict[str, Tensor], dict[str, Any], Tensor, dict[str, Tensor]]:
    """Compress the residual R (p, q) with the config's format.

    Returns (stored tensors, metadata, R̂ decoded from them, shared tensors used). `shared` holds
    tensors fitted once for several matrices (`fit_shared`, e.g. a model-wide codebook); `state`
    carries the permutation and the codec's warm start between alternating iterations; `moments`, the
    layer inputs' second moments (q,) or (q, q), make a `weighted` format minimise the output error
    (`value_weights`); other formats ignore them.
    """
    state = state or _EncodeState()
    codec = get_codec(config.quantizer)
    if codec.produced_by is not None:
        raise CompressionError(f"quantizer={config.quantizer!r} matrices are built by {codec.produced_by}")
    scales = None
    if codec.blockwise:
        X, stored, scales = normalize_residual(R, config, name, state)
    else:
        X, stored = R, {}
    if moments is not None and codec.weighted:
        weights = value_weights(moments.to(R.device), config, name, tuple(R.shape), state.perm, scales)
        enc = codec.encode(X, config, shared=shared, state=state.codec, weights=weights)
        enc.meta = {**enc.meta, "weighted": True}
    else:
        enc = codec.encode(X, config, shared=shared, state=state.codec)
    d = codec.vector_dim(config)
    if config.error_feedback == "gptq" and feedback_applies(config) and R.shape[1] % d:
        # a d-vector would straddle two rows: its columns have no single place in the column order
        enc.meta = {**enc.meta, "error_feedback": f"skipped: q = {R.shape[1]} is not a multiple of d = {d}"}
    elif config.error_feedback == "gptq" and feedback_applies(config):
        if moments is None or moments.dim() != 2:
            raise CompressionError(
                f"{name or 'matrix'}: error_feedback='gptq' needs the full input second moments (q × q) from "
                f"calibration; {'none were given (data-free)' if moments is None else 'only their diagonal was kept'}"
                f" — run with `calibration:` and calibration.full_max ≥ {R.shape[1]}")
        table = codec.kernel_table(enc.stored, config, {**(shared or {}), **enc.shared})
        enc.stored = {**enc.stored, "codes": _feedback_stored_codes(
            X, scales, table, moments.to(R.device), config, name, tuple(R.shape), state.perm, enc.stored["codes"])}
        enc.meta = {**enc.meta, "error_feedback": "gptq"}
    stored = {k: v.contiguous() for k, v in {**stored, **enc.stored}.items()}
    return stored, dict(enc.meta), decode_frozen(stored, enc.meta, config, R.shape, shared=enc.shared), enc.shared


def feedback_applies(config: CompressionConfig) -> bool:
    """Whether `error_feedback` can change this config's codes: formats whose packed codes index a value table
    under absmax block scales (`table_kernels`, e.g. vq, nf). Other formats are encoded as without it (their
    matrices' metadata then carries no "error_feedback"), and so is a matrix whose width q is not a multiple of
    the vector length d (its metadata says "skipped: ...")."""
    codec = get_codec(config.quantizer)
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
) -> Tensor:
    """The packed codes of `blocks` re-chosen with GPTQ's error feedback (`reallm.ops.gptq`), scales and table fixed.

    Args:
        blocks: (n_blocks, B0) the normalised blocks `normalize_residual` gave (rotated, permuted residual).
        scales: (n_blocks,) their dequantised absmax scales.
        table: (K, d) the values of the codes.
        moments: E[x xᵀ] (q, q) of the layer's original inputs.
        perm: (n_row_blocks, q) the column order of each row block, or None.
        codes: the packed codes of the plain assignment (padding vectors keep theirs).
    """
    p, q = shape
    d = table.shape[1]
    width = config.code_width
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


def decode_frozen(
    stored: dict[str, Tensor],
    meta: dict[str, Any],
    config: CompressionConfig,
    shape: tuple[int, int],
    *,
    shared: dict[str, Tensor] | None = None,
) -> Tensor:
    """Q̂ (p, q) in fp32 from the stored tensors (the inverse of `encode_frozen`)."""
    codec = get_codec(config.quantizer)
    p, q = shape
    n_blocks = n_blocks_of(shape, config.block_size)
    X = codec.decode(stored, meta, config, shape, n_blocks, shared or {})
    if not codec.blockwise:
        return X
    if codec.absmax_scales:
        qs = QuantizedScales(
            codes=stored["scale_codes"],
            group_max=stored["scale_group_max"],
            offset=stored["scale_offset"],
            group_size=config.scale_group,
            bits=config.scale_bits,
        )
        X = X * qs.dequantize()[:, None]  # (n_blocks, B0) × (n_blocks, 1)
    X = X.reshape(-1)[: p * q].view(p, q)
    if config.permute:
        n_row_blocks = -(-p // config.permute_rows)
        perm = unpack_bits(stored["perm"], index_bits(q), n_row_blocks * q).view(n_row_blocks, q)
        X = unpermute_columns(X, perm, config.permute_rows)
    if config.rotation == "hadamard":
        seeds = stored["rotation_seeds"].tolist()
        X = unrotate(X, int(seeds[0]), int(seeds[1]))
    return X


def _block_scales(stored: dict[str, Tensor], config: CompressionConfig, b0: int, b1: int) -> Tensor:
    """Dequantised absmax scales of blocks [b0, b1), fp32 (b1 − b0,) (`QuantizedScales.dequantize` on a range)."""
    levels = float((1 << config.scale_bits) - 1)
    group = torch.arange(b0, b1, device=stored["scale_codes"].device) // config.scale_group
    gmax = stored["scale_group_max"].to(torch.float32)[group]
    return stored["scale_offset"].to(torch.float32) + stored["scale_codes"][b0:b1].to(torch.float32) / levels * gmax


def row_tileable(config: CompressionConfig) -> bool:
    """Whether Q̂ can be decoded in row tiles (a two-sided rotation mixes every row into every other)."""
    return config.rotation != "hadamard"


def row_tiles(shape: tuple[int, int], config: CompressionConfig, max_elems: int = 1 << 22) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) that `decode_frozen_rows` decodes, each of at most ~`max_elems` values (at least
    one permutation row block); one range covering all rows when the format cannot be tiled."""
    p, q = shape
    if not row_tileable(config) or not get_codec(config.quantizer).decodes_ranges:
        return [(0, p)]
    align = config.permute_rows if config.permute else 1
    rows = max(align, (max_elems // max(1, q)) // align * align)
    return [(r, min(p, r + rows)) for r in range(0, p, rows)]


@dataclass
class TilePlan:
    """What every row tile of one decode shares, computed once per pass over the tiles (all small):
    the dequantised block scales (n_blocks,) and the inverse column permutation (n_row_blocks, q)."""

    scales: Tensor | None = None
    inv_perm: Tensor | None = None


def tile_plan(stored: dict[str, Tensor], config: CompressionConfig, shape: tuple[int, int]) -> TilePlan:
    p, q = shape
    plan = TilePlan()
    if get_codec(config.quantizer).blockwise and get_codec(config.quantizer).absmax_scales:
        plan.scales = _block_scales(stored, config, 0, n_blocks_of(shape, config.block_size))
    if config.permute:
        n_row_blocks = -(-p // config.permute_rows)
        index = torch.arange(1 << index_bits(q), device=stored["perm"].device)[:, None]
        perm = decode_codes(stored["perm"], index_bits(q), n_row_blocks * q, index).view(n_row_blocks, q)
        plan.inv_perm = torch.argsort(perm, dim=1)  # out[:, perm[j]] = X[:, j]  ⇔  out = X[:, inv_perm]
    return plan


def decode_frozen_rows(
    stored: dict[str, Tensor],
    meta: dict[str, Any],
    config: CompressionConfig,
    shape: tuple[int, int],
    r0: int,
    r1: int,
    *,
    shared: dict[str, Tensor] | None = None,
    plan: TilePlan | None = None,
) -> Tensor:
    """Rows [r0, r1) of Q̂, fp32 (r1 − r0, q), reading only the stored values they need (equal to
    `decode_frozen(...)[r0:r1]`). With a column permutation, r0 must be a multiple of `permute_rows`.
    `plan` (`tile_plan`) saves recomputing the shared parts when decoding several tiles."""
    p, q = shape
    if not row_tileable(config):
        return decode_frozen(stored, meta, config, shape, shared=shared)[r0:r1]
    codec = get_codec(config.quantizer)
    if not codec.blockwise:
        return codec.decode_range(stored, meta, config, shape, shared or {}, r0, r1)
    plan = plan or tile_plan(stored, config, shape)
    B = config.block_size
    lo, hi = r0 * q, r1 * q  # the rows' span of the row-major stream
    b0, b1 = lo // B, -(-hi // B)  # blocks covering it (a block may straddle two tiles)
    X = codec.decode_range(stored, meta, config, shape, shared or {}, b0, b1)  # (b1 − b0, B)
    if plan.scales is not None:
        X = X.mul_(plan.scales[b0:b1, None])
    X = X.reshape(-1)[lo - b0 * B: hi - b0 * B].view(r1 - r0, q)
    if plan.inv_perm is not None:
        rows = config.permute_rows
        if r0 % rows:
            raise ValueError(f"row tile start {r0} is not a multiple of permute_rows={rows}")
        k0, k1 = r0 // rows, -(-r1 // rows)  # permutation row blocks of the tile
        n = r1 - r0
        pad = (k1 - k0) * rows - n
        Xb = X if not pad else torch.cat([X, X.new_zeros(pad, q)])
        index = plan.inv_perm[k0:k1].unsqueeze(1).expand(-1, rows, -1)  # (blocks, rows, q)
        X = torch.gather(Xb.view(k1 - k0, rows, q), 2, index).view(-1, q)[:n]
    return X


# ---------------------------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------------------------
@dataclass
class ReALLMWeight:
    """Everything needed to rebuild one weight matrix W (p × q, nn.Linear layout).

    frozen:  the compressed part in stored form (packed codes, fp16 codebook, uint8 scale codes,
             packed permutation, rotation seeds, ...).
    lowrank: L1 (p, r) and L2 (q, r) in stored form (see `reallm.ops.precision`).
    shared:  tensors shared with other matrices (a model-wide codebook or decoder): held here by
             reference, saved once by the checkpoint, and their bits divided among the sharers
             in proportion to their sizes (`meta["shared_numel"]` = weights of all sharers).
    """

    shape: tuple[int, int]
    config: CompressionConfig
    frozen: dict[str, Tensor]
    lowrank: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Tensor] = field(default_factory=dict)

    # -- reconstruction -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.meta.get("rank", 0))

    def decode_frozen(self) -> Tensor:
        """Q̂ (p, q), fp32: the frozen compressed part alone."""
        return decode_frozen(self.frozen, self.meta, self.config, self.shape, shared=self.shared)

    def lowrank_factors(self) -> tuple[Tensor, Tensor]:
        """(L1 (p, r), L2 (q, r)) in fp32, exactly as stored."""
        p, q = self.shape
        if self.rank == 0:
            dev = next(iter(self.frozen.values())).device
            return torch.zeros(p, 0, device=dev), torch.zeros(q, 0, device=dev)
        return decode_lowrank(self.lowrank, self.config.lowrank_dtype)

    def dequantize(self) -> Tensor:
        """The full reconstruction Q̂ + L1 L2ᵀ (p, q) in fp32."""
        Q = self.decode_frozen()
        if self.rank:
            L1, L2 = self.lowrank_factors()
            Q = torch.addmm(Q, L1, L2.T)
        return Q

    # -- accounting -----------------------------------------------------------------------
    def bits(self, include_magnitude: bool | None = None) -> dict[str, float]:
        """Stored bits, itemised (protocol.md): every tensor at its stored precision.

        Items: those of the format (`Codec.bit_items`: codes, codebook, dense, latent, decoder, ...),
        of the shared pipeline (scales, permutation, rotation), lowrank, magnitude (the DoRA magnitude
        p values, counted when the config keeps one), plus `total` and `per_weight`. Shared tensors
        are charged in proportion numel / meta["shared_numel"]. A stored tensor that no item claims
        is an error (it would otherwise go uncounted or be filed under a wrong item).
        """
        p, q = self.shape
        items: dict[str, float] = {}
        item_of = bit_items_of(self.config)

        def add(item: str, nbits: float) -> None:
            items[item] = items.get(item, 0.0) + nbits

        def item(key: str) -> str:
            found = item_of.get(key.split(".")[0])
            if found is None:
                raise KeyError(f"format {self.config.quantizer!r} stores {key!r}, which no bit item claims "
                               f"(add it to the codec's bit_items)")
            return found

        for k, t in self.frozen.items():
            add(item(k), _nbits(t))
        share = (p * q) / self.meta.get("shared_numel", p * q)
        for k, t in self.shared.items():
            add(item(k), _nbits(t) * share)
        add("lowrank", sum(_nbits(t) for t in self.lowrank.values()))
        dora = self.config.dora if include_magnitude is None else include_magnitude
        if dora and self.rank > 0:
            add("magnitude", p * storage.storage_bits_of(self.config.magnitude_dtype))
        total = sum(items.values())
        items["total"] = total
        items["per_weight"] = total / (p * q)
        return items

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Flat tensors ("frozen.<name>", "lowrank.<name>") and JSON-able metadata.

        Shared tensors are not included: the caller stores them once (see `shared_keys` in
        the metadata) and passes them back to `from_dict`.
        """
        tensors = {f"frozen.{k}": v for k, v in self.frozen.items()}
        tensors.update({f"lowrank.{k}": v for k, v in self.lowrank.items()})
        meta = {
            "shape": list(self.shape),
            "config": self.config.to_dict(),
            "meta": self.meta,
            "shared_keys": sorted(self.shared),
        }
        return tensors, meta

    @classmethod
    def from_dict(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], shared: dict[str, Tensor] | None = None
    ) -> ReALLMWeight:
        frozen = {k[len("frozen."):]: v for k, v in tensors.items() if k.startswith("frozen.")}
        lowrank = {k[len("lowrank."):]: v for k, v in tensors.items() if k.startswith("lowrank.")}
        shared = dict(shared or {})
        missing = [k for k in meta.get("shared_keys", []) if k not in shared]
        if missing:
            raise KeyError(f"shared tensors missing: {missing}")
        return cls(
            shape=tuple(meta["shape"]),
            config=CompressionConfig.from_dict(meta["config"]),
            frozen=frozen,
            lowrank=lowrank,
            meta=dict(meta.get("meta", {})),
            shared=shared,
        )

    def to(self, device: torch.device | str) -> ReALLMWeight:
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return ReALLMWeight(self.shape, self.config, mv(self.frozen), mv(self.lowrank),
                            dict(self.meta), mv(self.shared))


def bit_items_of(config: CompressionConfig) -> dict[str, str]:
    """Stored tensor name (its first dotted part) → bit item, for a config's format."""
    return {**PIPELINE_BIT_ITEMS, **get_codec(config.quantizer).bit_items}


def _nbits(t: Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _sub(d: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in d.items() if k.startswith(prefix + ".")}


def store_lowrank(L1: Tensor, L2: Tensor, dtype_name: str) -> dict[str, Tensor]:
    """The stored form of the factors L1 (p, r), L2 (q, r) ("L1.value", "L2.value", int8 scales)."""
    out = {f"L1.{k}": v for k, v in storage.encode_stored(L1, dtype_name).items()}
    out.update({f"L2.{k}": v for k, v in storage.encode_stored(L2, dtype_name).items()})
    return out


def decode_lowrank(lowrank: dict[str, Tensor], dtype_name: str) -> tuple[Tensor, Tensor]:
    """Inverse of `store_lowrank`: (L1 (p, r), L2 (q, r)) in fp32, exactly the stored values."""
    return (storage.decode_stored(_sub(lowrank, "L1"), dtype_name),
            storage.decode_stored(_sub(lowrank, "L2"), dtype_name))


# ---------------------------------------------------------------------------------------------
# building a container
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

    Args:
        W: the weight in nn.Linear layout (out × in); any float dtype and device.
        config: the compression configuration.
        name: the layer name (salts the rotation seeds; named in errors).
        shared: tensors shared by several matrices, fitted once by `fit_shared_tensors`
            (config.codebook_scope == "model"), e.g. {"codebook": (K, d) fp16}.
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
        stored, meta, R_hat, used = encode_frozen(R, config, name, shared=shared, state=state, moments=moments)
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
    blocks, _, scales = normalize_residual(R, config, name, state)
    codec = get_codec(config.quantizer)
    d = codec.vector_dim(config)
    weights = None
    if moments is not None and codec.weighted:
        weights = value_weights(moments.to(W.device), config, name, (p, q), state.perm, scales).reshape(-1, d)
    return blocks.reshape(-1, d), weights


def relative_error(W: Tensor, W_hat: Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F (protocol.md)."""
    W = W.detach().float()
    return float(torch.linalg.vector_norm(W - W_hat.to(W)) / torch.linalg.vector_norm(W).clamp_min(1e-30))
