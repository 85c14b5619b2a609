"""The `autoencoder` format's own options (`CompressionConfig.options` when `quantizer: autoencoder`): the latent
VQ's vector length and the autoencoder's architecture and storage, one level deep (so that a CLI key, a sweep
parameter and a candidate override each change one of them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from reallm.formats.autoencoder.networks import DEFAULT_KERNELS
from reallm.formats.base import FormatOptions

__all__ = ["AutoencoderOptions"]


@dataclass
class AutoencoderOptions(FormatOptions):
    """Options of `autoencoder`, ReALLM's patch autoencoder (written by phase 1, which trains it).

    Args:
        dim: dimension d of the latent VQ (b·d ≤ 16; latent_channels is a multiple of d).
        patch: patch size P, or [P0, P1] (512 in the paper; 32 suits stories260K's 64–172 sides).
            Each side must be a multiple of 2**n_stages.
        n_stages: encoder down-sampling / decoder up-sampling stages (5 in the paper: 512 → 16).
        latent_channels: e2, channels of the latent (a multiple of the latent VQ dimension d).
        encoder_width: channels of the ConvNeXt encoder (64 in the paper; not stored).
        encoder_blocks: ConvNeXt blocks per encoder stage.
        decoder_params: the decoder's parameter budget c (7.2e6 in the paper); F is solved from it.
        decoder_width: F directly (overrides decoder_params).
        kernels: decoder conv kernel per stage (the last one repeats).
        reduction: C_next = max(round(C / reduction), min_channels).
        min_channels: floor of the decoder's channel widths.
        weight_bits: b_φ, bits of every decoder conv weight (NF levels, fp16 absmax scale per output
            channel); None stores an fp16 decoder.
        levels: "nf" or "uniform" decoder weight levels.
        share: which matrices share one decoder and one latent codebook: "matrix" (one each),
            "model" (every matrix compressed with this config), "type" (same layer kind, e.g. all
            q_proj), or "type_blocks:K" (same kind within consecutive groups of K blocks).
    """

    legacy_keys: ClassVar[dict[str, str]] = {"vq_dim": "dim"}  # and the former `autoencoder` dict, spread

    dim: int = 2
    patch: int | list[int] = 512
    n_stages: int = 5
    latent_channels: int = 16
    encoder_width: int = 64
    encoder_blocks: int = 1
    decoder_params: float | None = 7.2e6
    decoder_width: int | None = None
    kernels: list[int] = field(default_factory=lambda: list(DEFAULT_KERNELS))
    reduction: float = 1.2
    min_channels: int = 12
    weight_bits: int | None = 6
    levels: str = "nf"
    share: str = "matrix"

    @classmethod
    def from_legacy(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        """Before issue 20 the network's keys sat in one `autoencoder` dict beside `vq_dim`."""
        return {**super().from_legacy(flat), **(flat.get("autoencoder") or {})}
