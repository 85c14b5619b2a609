"""`ReALLMWeight`: one compressed matrix as data — its stored tensors, their bits, their serialised form.

    W (p × q)  ≈  Q̂ + L1 L2ᵀ

`frozen` holds Q̂ in stored form (packed codes, codebook, scale codes, permutation, rotation seeds, ...), `lowrank`
L1 (p, r) and L2 (q, r) in stored form (`reallm.weight.factors`), `shared` the tensors several matrices share (a
model-wide codebook). `dequantize()` rebuilds Q̂ + L1 L2ᵀ (p, q) fp32; `bits()` counts every stored tensor at its
stored precision (protocol.md, "Bit accounting"); `to_dict()` / `from_dict()` convert to a flat dict of tensors
plus JSON-able metadata (safetensors-friendly). Building one from W is `reallm.weight.pipeline.compress_weight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reallm.formats import PIPELINE_BIT_ITEMS, Codec, get_codec
from reallm.ops import precision as storage
from reallm.weight.config import CompressionConfig
from reallm.weight.decode import decode_frozen
from reallm.weight.factors import decode_lowrank

__all__ = ["ReALLMWeight", "bit_items_of", "count_bits"]


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

    @property
    def codec(self) -> Codec:
        """The codec of the stored format (`config.quantizer`)."""
        return get_codec(self.config.quantizer)

    def decode_frozen(self) -> Tensor:
        """Q̂ (p, q), fp32: the frozen compressed part alone."""
        return decode_frozen(self.frozen, self.meta, self.config, self.shape, shared=self.shared, codec=self.codec)

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
        return count_bits(
            self.config, self.shape,
            frozen={k: _nbits(t) for k, t in self.frozen.items()},
            shared={k: _nbits(t) for k, t in self.shared.items()},
            lowrank=sum(_nbits(t) for t in self.lowrank.values()),
            rank=self.rank, shared_numel=self.meta.get("shared_numel"), include_magnitude=include_magnitude,
            codec=self.codec)

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


def bit_items_of(config: CompressionConfig, *, codec: Codec | None = None) -> dict[str, str]:
    """Stored tensor name (its first dotted part) → bit item, for a config's format (`codec`: its codec if
    already resolved)."""
    codec = codec if codec is not None else get_codec(config.quantizer)
    return {**PIPELINE_BIT_ITEMS, **codec.bit_items}


def count_bits(
    config: CompressionConfig,
    shape: tuple[int, int],
    *,
    frozen: Mapping[str, int],
    shared: Mapping[str, int],
    lowrank: int,
    rank: int,
    shared_numel: int | None = None,
    include_magnitude: bool | None = None,
    codec: Codec | None = None,
) -> dict[str, float]:
    """The itemised bits of a (p, q) matrix from the bits of its stored tensors: `ReALLMWeight.bits` of an encoded
    matrix, and `reallm.weight.layout.predict_bits` of one not yet encoded, so that the two agree exactly.

    Args:
        frozen: stored tensor name → its bits, in the stored order; shared: the same for the shared tensors,
            charged numel / shared_numel of their bits (shared_numel: weights of every sharer, None: p·q).
        lowrank: bits of the stored low-rank factors; rank: r (a DoRA magnitude is counted only when r > 0).
        include_magnitude: count the DoRA magnitude (p values of config.magnitude_dtype); None: config.dora.
        codec: the codec of config.quantizer when already resolved.
    Raises:
        KeyError: a stored tensor that no bit item claims (it would otherwise go uncounted or be misfiled).
    """
    p, q = shape
    items: dict[str, float] = {}
    item_of = bit_items_of(config, codec=codec)

    def add(item: str, nbits: float) -> None:
        items[item] = items.get(item, 0.0) + nbits

    def item(key: str) -> str:
        found = item_of.get(key.split(".")[0])
        if found is None:
            raise KeyError(f"format {config.quantizer!r} stores {key!r}, which no bit item claims "
                           f"(add it to the codec's bit_items)")
        return found

    for k, nbits in frozen.items():
        add(item(k), nbits)
    share = (p * q) / (shared_numel or p * q)
    for k, nbits in shared.items():
        add(item(k), nbits * share)
    add("lowrank", lowrank)
    dora = config.dora if include_magnitude is None else include_magnitude
    if dora and rank > 0:
        add("magnitude", p * storage.storage_bits_of(config.magnitude_dtype))
    total = sum(items.values())
    items["total"] = total
    items["per_weight"] = total / (p * q)
    return items


def _nbits(t: Tensor) -> int:
    return t.numel() * t.element_size() * 8
