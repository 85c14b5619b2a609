"""The `autoencoder` format's own options (`CompressionConfig.options` when `quantizer: autoencoder`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from reallm.formats.base import FormatOptions

__all__ = ["AutoencoderOptions"]


@dataclass
class AutoencoderOptions(FormatOptions):
    """Options of `autoencoder`, ReALLM's patch autoencoder (written by phase 1, which trains it).

    Args:
        dim: dimension d of the latent VQ (b·d ≤ 16; the latent channels are a multiple of d).
        network: the autoencoder's architecture and storage, `reallm.formats.autoencoder.codec.AESpec`'s fields
            (patch, n_stages, latent_channels, encoder_width, encoder_blocks, decoder_params or decoder_width,
            kernels, reduction, min_channels, weight_bits, levels, share); the ones left out take AESpec's
            defaults, the paper's sizes.
    """

    legacy_keys: ClassVar[dict[str, str]] = {"vq_dim": "dim", "autoencoder": "network"}

    dim: int = 2
    network: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.network is None:  # written as `autoencoder: null` before options moved per format
            self.network = {}
