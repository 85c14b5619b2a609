"""The ReALLM weight container: one matrix's frozen compressed part plus its low-rank factors.

    W (p × q)  ≈  Q̂ + L1 L2ᵀ,   Q̂ = unrotate(unpermute(unscale(decode(codes))))

`compress_weight(W, config)` builds it; `dequantize()` rebuilds Q̂ + L1 L2ᵀ in W's layout; `bits()`
counts every stored tensor at its stored precision (protocol.md, "Bit accounting"); `to_dict()` /
`from_dict()` convert to a flat dict of tensors plus JSON-able metadata (safetensors-friendly).

Encoding order of the frozen part (each stage optional; method.md §2–3):
    R = W − L1 L2ᵀ → Hadamard rotation → column permutation per row block → absmax block scales
    (row-major blocks of B0 values, double-quantized) → NF / RTN / VQ of the normalised values.
VQ vectors are *horizontal*: d consecutive values of one row, i.e. d neighbouring columns after
the permutation has put similar columns side by side.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reallm import storage
from reallm.config import CompressionConfig
from reallm.quant.hadamard import rotate, unrotate
from reallm.quant.lowrank import lowrank_decompose
from reallm.quant.packing import pack_bits, unpack_bits
from reallm.quant.permutation import (
    greedy_column_permutation,
    index_bits,
    permute_columns,
    unpermute_columns,
)
from reallm.quant.scalar import nearest_level, nf_levels, rtn_dequantize, rtn_quantize
from reallm.quant.scales import QuantizedScales, block_absmax, quantize_scales
from reallm.quant.vq import assign, kmeans


class CompressionError(ValueError):
    """A weight that cannot be compressed (NaN/Inf values, impossible shape or configuration)."""


@dataclass
class _EncodeState:
    """What alternating iterations reuse instead of recomputing (method.md §1)."""

    perm: Tensor | None = None  # (n_row_blocks, q) column order, computed on the first residual
    codebook: Tensor | None = None  # (K, d) fp32, warm start for the next k-means


# ---------------------------------------------------------------------------------------------
# frozen part: normalise → quantize → (stored tensors) → decode
# ---------------------------------------------------------------------------------------------
def _rotation_seeds(config: CompressionConfig, name: str) -> tuple[int, int]:
    salt = zlib.crc32(name.encode())
    base = (config.seed * 1_000_003 + salt) % (1 << 31)
    return base, (base + 7919) % (1 << 31)


def _pad_to(flat: Tensor, multiple: int) -> Tensor:
    pad = (-flat.numel()) % multiple
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def normalize_residual(
    R: Tensor, config: CompressionConfig, name: str, state: _EncodeState
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Rotation, permutation and block scales applied to R (p, q).

    Returns the blocks to quantize (n_blocks, B0) — normalised by their dequantised absmax
    scale, except for RTN which scales per block itself —, the stored tensors of these stages,
    and the dequantised scales (n_blocks,) (None for RTN).
    """
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
    if config.quantizer == "rtn":
        return blocks, stored, None
    qs = quantize_scales(block_absmax(blocks.reshape(-1), config.block_size),
                         config.scale_group, config.scale_bits)
    stored.update(scale_codes=qs.codes, scale_group_max=qs.group_max, scale_offset=qs.offset)
    s_hat = qs.dequantize()  # (n_blocks,)
    safe = torch.where(s_hat > 0, s_hat, torch.ones_like(s_hat))
    return blocks / safe[:, None], stored, s_hat


def fit_codebook(vectors: Tensor, config: CompressionConfig, init: Tensor | None = None) -> Tensor:
    """k-means codebook (K, d) for VQ, rounded to its fp16 storage and returned in fp32."""
    res = kmeans(
        vectors,
        config.codebook_size,
        iters=config.kmeans_iters,
        tol=config.kmeans_tol,
        init=config.kmeans_init,
        seed=config.seed,
        max_points=config.kmeans_max_points,
        init_codebook=init,
    )
    return res.codebook.to(torch.float16).float()


def encode_frozen(
    R: Tensor,
    config: CompressionConfig,
    name: str = "",
    *,
    codebook: Tensor | None = None,
    state: _EncodeState | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any], Tensor]:
    """Compress the residual R (p, q). Returns (stored tensors, metadata, R̂ decoded from them).

    `codebook` (K, d) fixes a shared VQ codebook instead of fitting one; `state` carries the
    permutation and the last codebook between alternating iterations.
    """
    state = state or _EncodeState()
    p, q = R.shape
    meta: dict[str, Any] = {}
    if config.quantizer == "none":
        stored = {"dense": R.to(torch.float16).contiguous()}
        return stored, meta, decode_frozen(stored, meta, config, (p, q))
    if config.quantizer == "autoencoder":
        raise CompressionError(
            "quantizer='autoencoder' is produced by the autoencoder phase (reallm.modules), "
            "not by compress_weight"
        )
    blocks, stored, _ = normalize_residual(R, config, name, state)
    b = config.bits
    if config.quantizer == "rtn":
        codes, lo, step = rtn_quantize(blocks, b)
        stored.update(codes=pack_bits(codes.reshape(-1), b), rtn_lo=lo, rtn_step=step)
    elif config.quantizer == "nf":
        codes = nearest_level(blocks, nf_levels(b).to(blocks.device))
        stored["codes"] = pack_bits(codes.reshape(-1), b)
    else:  # vq: horizontal d-vectors inside each scale block
        vectors = blocks.reshape(-1, config.vq_dim)  # (n_vectors, d)
        if codebook is None:
            codebook = fit_codebook(vectors, config, init=state.codebook)
            state.codebook = codebook
            stored["codebook"] = codebook.to(torch.float16)
        else:
            codebook = codebook.to(device=R.device, dtype=torch.float16).float()
            meta["shared_codebook"] = True
        codes = assign(vectors, codebook)
        stored["codes"] = pack_bits(codes, config.code_width)
    stored = {k: v.contiguous() for k, v in stored.items()}
    shared = {"codebook": codebook.to(torch.float16)} if meta.get("shared_codebook") else None
    return stored, meta, decode_frozen(stored, meta, config, (p, q), shared=shared)


def decode_frozen(
    stored: dict[str, Tensor],
    meta: dict[str, Any],
    config: CompressionConfig,
    shape: tuple[int, int],
    *,
    shared: dict[str, Tensor] | None = None,
) -> Tensor:
    """Q̂ (p, q) in fp32 from the stored tensors (the inverse of `encode_frozen`)."""
    p, q = shape
    if config.quantizer == "none":
        return stored["dense"].float()
    n_values = p * q
    n_blocks = -(-n_values // config.block_size)
    B = config.block_size
    b = config.bits
    if config.quantizer == "rtn":
        codes = unpack_bits(stored["codes"], b, n_blocks * B).view(n_blocks, B)
        X = rtn_dequantize(codes, stored["rtn_lo"], stored["rtn_step"])
    else:
        qs = QuantizedScales(
            codes=stored["scale_codes"],
            group_max=stored["scale_group_max"],
            offset=stored["scale_offset"],
            group_size=config.scale_group,
            bits=config.scale_bits,
        )
        s_hat = qs.dequantize()  # (n_blocks,)
        if config.quantizer == "nf":
            codes = unpack_bits(stored["codes"], b, n_blocks * B)
            Y = nf_levels(b).to(s_hat.device)[codes]
        elif config.quantizer == "vq":
            codebook = stored["codebook"] if "codebook" in stored else (shared or {}).get("codebook")
            if codebook is None:
                raise CompressionError("VQ matrix without its codebook (shared codebook missing)")
            d = config.vq_dim
            codes = unpack_bits(stored["codes"], config.code_width, n_blocks * B // d)
            Y = codebook.float()[codes]  # (n_vectors, d)
        else:  # autoencoder: one decoder forward gives the normalised matrix
            from reallm.nn.codec import decode_autoencoder  # lazy: optional component

            Y = _pad_to(decode_autoencoder(stored, meta, config, shape, shared or {}).reshape(-1), B)
        X = Y.reshape(n_blocks, B) * s_hat[:, None]
    X = X.reshape(-1)[:n_values].view(p, q)
    if config.permute:
        n_row_blocks = -(-p // config.permute_rows)
        perm = unpack_bits(stored["perm"], index_bits(q), n_row_blocks * q).view(n_row_blocks, q)
        X = unpermute_columns(X, perm, config.permute_rows)
    if config.rotation == "hadamard":
        seeds = stored["rotation_seeds"].tolist()
        X = unrotate(X, int(seeds[0]), int(seeds[1]))
    return X


# ---------------------------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------------------------
@dataclass
class ReALLMWeight:
    """Everything needed to rebuild one weight matrix W (p × q, nn.Linear layout).

    frozen:  the compressed part in stored form (packed codes, fp16 codebook, uint8 scale codes,
             packed permutation, rotation seeds, ...).
    lowrank: L1 (p, r) and L2 (q, r) in stored form (see `reallm.storage`).
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
        dt = self.config.lowrank_dtype
        L1 = storage.decode_stored(_sub(self.lowrank, "L1"), dt)
        L2 = storage.decode_stored(_sub(self.lowrank, "L2"), dt)
        return L1, L2

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

        Items: codes, codebook, scales, permutation, rotation, dense, lowrank, magnitude (the DoRA
        magnitude p values, counted when the config keeps one), plus `total` and `per_weight`.
        Shared tensors are charged in proportion numel / meta["shared_numel"].
        """
        p, q = self.shape
        items: dict[str, float] = {}

        def add(item: str, nbits: float) -> None:
            items[item] = items.get(item, 0.0) + nbits

        for k, t in self.frozen.items():
            add(_ITEM_OF.get(k.split(".")[0], "other"), _nbits(t))
        share = (p * q) / self.meta.get("shared_numel", p * q)
        for k, t in self.shared.items():
            add(_ITEM_OF.get(k.split(".")[0], "other"), _nbits(t) * share)
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


_ITEM_OF = {
    "codes": "codes",
    "codebook": "codebook",
    "scale_codes": "scales",
    "scale_group_max": "scales",
    "scale_offset": "scales",
    "rtn_lo": "scales",
    "rtn_step": "scales",
    "perm": "permutation",
    "rotation_seeds": "rotation",
    "dense": "dense",
    "latent_codes": "latent",
    "latent_codebook": "latent",
    "decoder": "decoder",
}


def _nbits(t: Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _sub(d: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in d.items() if k.startswith(prefix + ".")}


def _store_lowrank(L1: Tensor, L2: Tensor, dtype_name: str) -> dict[str, Tensor]:
    out = {f"L1.{k}": v for k, v in storage.encode_stored(L1, dtype_name).items()}
    out.update({f"L2.{k}": v for k, v in storage.encode_stored(L2, dtype_name).items()})
    return out


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
    codebook: Tensor | None = None,
    shared_numel: int | None = None,
) -> ReALLMWeight:
    """Compress one weight W (p, q) with `config` (data-free; method.md §1–3).

    Args:
        W: the weight in nn.Linear layout (out × in); any float dtype and device.
        config: the compression configuration.
        name: the layer name (salts the rotation seeds; named in errors).
        codebook: a shared VQ codebook (K, d) to use instead of fitting one
            (config.codebook_scope == "model").
        shared_numel: weights of all matrices sharing that codebook (for the bit accounting).
    """
    check_weight(W, name)
    if config.quantizer == "autoencoder":
        raise CompressionError("quantizer='autoencoder' matrices are built by the autoencoder phase")
    W = W.detach().float()
    p, q = W.shape
    r = config.resolve_rank(p, q)
    state = _EncodeState()

    def quantize(R: Tensor) -> tuple[Tensor, tuple[dict[str, Tensor], dict[str, Any]]]:
        stored, meta, R_hat = encode_frozen(R, config, name, codebook=codebook, state=state)
        return R_hat, (stored, meta)

    if r == 0:
        R_hat, (frozen, meta) = quantize(W)
        lowrank: dict[str, Tensor] = {}
    else:
        result = lowrank_decompose(
            W, r, config.lowrank_init, quantize,
            iters=config.lowrank_iters, randomized=config.randomized_svd, seed=config.seed,
        )
        frozen, meta = result.q_state
        meta = dict(meta, lowrank_errors=[round(e, 6) for e in result.errors],
                    lowrank_best_iter=result.best_iter)
        lowrank = _store_lowrank(result.L1, result.L2, config.lowrank_dtype)
    meta["rank"] = r
    shared: dict[str, Tensor] = {}
    if meta.pop("shared_codebook", False):
        shared["codebook"] = codebook.to(device=W.device, dtype=torch.float16)
        meta["shared_numel"] = int(shared_numel or p * q)
    return ReALLMWeight((p, q), config, frozen, lowrank, meta, shared)


@torch.no_grad()
def codebook_training_vectors(W: Tensor, config: CompressionConfig, name: str = "") -> Tensor:
    """The normalised d-vectors of W's residual after the initial low-rank part (for a codebook
    shared by several matrices, fitted before any of them is encoded)."""
    check_weight(W, name)
    W = W.detach().float()
    p, q = W.shape
    r = config.resolve_rank(p, q)
    R = W
    if r and config.lowrank_init != "zero":
        from reallm.quant.lowrank import low_rank_svd

        L1, L2 = low_rank_svd(W, r, randomized=config.randomized_svd, seed=config.seed)
        R = W - L1 @ L2.T
    blocks, _, _ = normalize_residual(R, config, name, _EncodeState())
    return blocks.reshape(-1, config.vq_dim)


def relative_error(W: Tensor, W_hat: Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F (protocol.md)."""
    W = W.detach().float()
    return float(torch.linalg.vector_norm(W - W_hat.to(W)) / torch.linalg.vector_norm(W).clamp_min(1e-30))
