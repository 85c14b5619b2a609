"""`autoencoder`: the stored format of ReALLM's patch autoencoder (method.md §4) — pack, unpack, decode.

    stored (per matrix): block scales (+ permutation / rotation seeds, from the shared pipeline) and
        ``latent_codes`` (bit-packed at b·d: the latent VQ codes of every stored latent position);
    shared (per group of matrices sharing one decoder): ``decoder.<conv>.{codes,scale,bias}`` (codes
        bit-packed at b_φ) and ``latent_codebook`` (fp16), charged to the group's matrices through
        ``meta["shared_numel"]``; ``meta["decoder"]`` describes the decoder's architecture.

Decoding is one forward pass of the stored decoder over the latent read from the codes; it gives the
normalised matrix Ŷ (p, q), to which the pipeline applies the block scales. These containers are
produced by the autoencoder phase (`reallm.formats.autoencoder.recipe`, `reallm.phases.autoencoder`), not by
`compress_weight`.

Latent positions whose 2^n × 2^n footprint lies entirely in the zero padding of edge patches are not
stored: they are zero in training and decoding, so a 172-wide matrix costs latent bits for ⌈172/2^n⌉
columns, not for the padded patch width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reallm.formats.autoencoder.networks import (
    PatchEncoder,
    PixelShuffleDecoder,
    decoder_conv_shapes,
    decoder_from_state,
    decoder_param_count,
    export_decoder,
    solve_decoder_width,
)
from reallm.formats.autoencoder.options import AutoencoderOptions
from reallm.formats.base import Codec, Layout, TensorSpec
from reallm.formats.registry import register
from reallm.ops.packing import pack_bits, unpack_bits
from reallm.ops.patches import matrix_to_patches, patch_grid, patches_to_matrix

__all__ = ["AESpec", "ae_spec", "decode_autoencoder", "decoder_layout", "from_vectors", "latent_mask", "latent_numel",
           "pack_decoder", "to_vectors", "unpack_decoder"]

_DECODE_CHUNK_ELEMS = 1 << 26  # activations per decoder chunk when decoding a matrix (256 MB in fp32)


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
@dataclass
class AESpec(AutoencoderOptions):
    """The autoencoder of one config (its options, `config.options`), with what its fields imply: the patch and
    latent shapes, the decoder's width, the networks themselves. Checked when built."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def patch_hw(self) -> tuple[int, int]:
        p = self.patch
        return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))

    @property
    def factor(self) -> int:
        return 2**self.n_stages

    @property
    def latent_hw(self) -> tuple[int, int]:
        p0, p1 = self.patch_hw
        return p0 // self.factor, p1 // self.factor

    def validate(self) -> None:
        p0, p1 = self.patch_hw
        if p0 % self.factor or p1 % self.factor:
            raise ValueError(f"autoencoder patch {(p0, p1)} is not divisible by 2**n_stages = {self.factor}")
        if self.decoder_width is None and not self.decoder_params:
            raise ValueError("autoencoder: give decoder_params (c) or decoder_width (F)")
        if self.share not in ("matrix", "model", "type") and not self.share.startswith("type_blocks:"):
            raise ValueError(f"autoencoder share must be matrix, model, type or type_blocks:K, got {self.share!r}")
        if self.weight_bits is not None and not 2 <= self.weight_bits <= 8:
            raise ValueError(f"autoencoder weight_bits (b_φ) must be in 2..8 or None, got {self.weight_bits}")

    def width(self) -> int:
        """F, solved from c when not given (method.md §4)."""
        if self.decoder_width is not None:
            return int(self.decoder_width)
        return solve_decoder_width(float(self.decoder_params), self.latent_channels, self.n_stages,
                                   self.kernels, self.reduction, self.min_channels)

    def decoder_kwargs(self) -> dict[str, Any]:
        return {"latent_channels": self.latent_channels, "width": self.width(), "n_stages": self.n_stages,
                "kernels": tuple(self.kernels), "reduction": self.reduction, "min_channels": self.min_channels,
                "weight_bits": self.weight_bits, "levels": self.levels}

    def build_encoder(self) -> PatchEncoder:
        return PatchEncoder(self.n_stages, self.encoder_width, self.latent_channels, self.encoder_blocks)

    def build_decoder(self) -> PixelShuffleDecoder:
        return PixelShuffleDecoder(**self.decoder_kwargs())

    def decoder_params_count(self) -> int:
        kw = self.decoder_kwargs()
        return decoder_param_count(kw["width"], self.latent_channels, self.n_stages, self.kernels,
                                   self.reduction, self.min_channels)


def ae_spec(config) -> AESpec:
    """The :class:`AESpec` of an autoencoder config (its options), checked against the latent VQ (b, d)."""
    spec: AESpec = config.options
    b, d = config.bits, spec.dim
    if b < 1 or d < 1 or b * d > 16:
        raise ValueError(f"latent VQ needs bits >= 1, options.dim >= 1 and bits·dim <= 16, got {b}, {d}")
    if spec.latent_channels % d:
        raise ValueError(f"latent_channels e2={spec.latent_channels} must be a multiple of options.dim d={d}")
    return spec


def latent_mask(shape: tuple[int, int], spec: AESpec, device: torch.device | str | None = None) -> Tensor:
    """Bool (n_patches, 1, h, w): latent positions whose footprint touches the matrix (stored ones)."""
    p, q = shape
    f = spec.factor
    h, w = spec.latent_hw
    nr, nc = patch_grid((p, q), spec.patch_hw)
    full = torch.zeros(nr * h, nc * w, device=device)
    full[: -(-p // f), : -(-q // f)] = 1.0
    return matrix_to_patches(full, (h, w))[0] > 0.5  # (n_patches, 1, h, w)


def latent_numel(shape: tuple[int, int], spec: AESpec) -> int:
    """Stored latent coordinates of a (p, q) matrix: ⌈p/2^n⌉ · ⌈q/2^n⌉ · e2."""
    f = spec.factor
    return -(-shape[0] // f) * -(-shape[1] // f) * spec.latent_channels


# ---------------------------------------------------------------------------------------------
# latent vectors (the layout of reallm.formats.autoencoder.ste.LatentVQ: channels [g·d, (g+1)·d) at one position)
# ---------------------------------------------------------------------------------------------
def to_vectors(z: Tensor, d: int) -> Tensor:
    """(..., B, e2, h, w) -> (..., B, e2/d, h, w, d)."""
    *lead, B, C, H, W = z.shape
    return z.reshape(*lead, B, C // d, d, H, W).movedim(-3, -1)


def from_vectors(v: Tensor) -> Tensor:
    """Inverse of :func:`to_vectors`: (..., B, g, h, w, d) -> (..., B, g·d, h, w)."""
    *lead, B, G, H, W, d = v.shape
    return v.movedim(-1, -3).reshape(*lead, B, G * d, H, W)



def pack_decoder(decoder: PixelShuffleDecoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``export_decoder`` with the codes bit-packed at b_φ (so that bits = saved bytes): tensors are
    ``decoder.<conv>.codes`` (uint8 stream), ``decoder.<conv>.scale`` / ``.bias`` (fp16)."""
    meta, tensors = export_decoder(decoder)
    out = {}
    for key, t in tensors.items():
        conv, _, kind = key.rpartition(".")
        bits = meta["convs"][conv]["bits"]
        out[f"decoder.{key}"] = pack_bits(t.reshape(-1), bits) if kind == "codes" else t
    return meta, out


def decoder_layout(spec: AESpec) -> dict[str, TensorSpec]:
    """The specs of what :func:`pack_decoder` stores for the decoder of `spec`, in its order, without building it:
    per conv of weight (C_out, C_in, k, k) (`decoder_conv_shapes`) its codes packed at b_φ, its fp16 scale (C_out,)
    and fp16 bias (C_out,); with ``weight_bits=None`` its bias and its fp16 weight."""
    shapes = decoder_conv_shapes(spec.width(), spec.latent_channels, spec.n_stages, spec.kernels, spec.reduction,
                                 spec.min_channels)
    out: dict[str, TensorSpec] = {}
    for name, shape in shapes.items():
        per_channel = TensorSpec(shape[:1], torch.float16)  # (C_out,)
        if spec.weight_bits is None:
            out[f"decoder.{name}.bias"] = per_channel
            out[f"decoder.{name}.weight"] = TensorSpec(shape, torch.float16)
        else:
            out[f"decoder.{name}.codes"] = Codec.packed(math.prod(shape), spec.weight_bits)
            out[f"decoder.{name}.scale"] = per_channel
            out[f"decoder.{name}.bias"] = per_channel
    return out


def unpack_decoder(meta: dict[str, Any], tensors: dict[str, Tensor], device=None) -> PixelShuffleDecoder:
    """Inverse of :func:`pack_decoder` (``tensors`` with or without the ``decoder.`` prefix)."""
    plain = {}
    for key, t in tensors.items():
        key = key[len("decoder."):] if key.startswith("decoder.") else key
        conv, _, kind = key.rpartition(".")
        if kind == "codes":
            info = meta["convs"][conv]
            t = unpack_bits(t, info["bits"], math.prod(info["shape"])).view(info["shape"]).to(torch.uint8)
        plain[key] = t
    return decoder_from_state(meta, plain, device=device)




# ---------------------------------------------------------------------------------------------
# decoding (container.decode_frozen, quantizer "autoencoder")
# ---------------------------------------------------------------------------------------------
def decode_autoencoder(
    stored: dict[str, Tensor],
    meta: dict[str, Any],
    config,
    shape: tuple[int, int],
    shared: dict[str, Tensor],
) -> Tensor:
    """Ŷ (p, q), the normalised matrix in the rotated / permuted domain (before the block scales), by
    one forward pass of the stored decoder over the latent decoded from the stored codes."""
    spec = ae_spec(config)
    d, width = config.options.dim, config.bits * config.options.dim
    src = {**shared, **stored}
    codes_packed = src.get("latent_codes")
    codebook = src.get("latent_codebook")
    if codes_packed is None or codebook is None or "decoder" not in meta:
        raise KeyError("autoencoder matrix without latent_codes / latent_codebook / decoder meta")
    device = codes_packed.device
    decoder = unpack_decoder(meta["decoder"], {k: v for k, v in src.items() if k.startswith("decoder.")}, device)
    decoder.eval().requires_grad_(False)  # the decoder is frozen; a trainable latent codebook gets gradients
    mask = latent_mask(shape, spec, device)  # (n, 1, h, w)
    n, _, h, w = mask.shape
    groups = spec.latent_channels // d
    keep = mask.expand(-1, groups, -1, -1)  # (n, e2/d, h, w)
    codes = unpack_bits(codes_packed, width, int(keep.sum()))
    vec = torch.zeros(n, groups, h, w, d, device=device)
    vec[keep] = codebook.float().to(device)[codes]
    z = from_vectors(vec)  # (n, e2, h, w)
    p0, p1 = spec.patch_hw
    chunk = max(1, _DECODE_CHUNK_ELEMS // (max(decoder.channels) * p0 * p1))  # bounds the largest activation
    out = torch.cat([decoder(z[s:s + chunk]) for s in range(0, n, chunk)])  # (n, 1, P0, P1)
    return patches_to_matrix(out, shape, spec.patch_hw)


@register
class PatchAutoencoder(Codec):
    name = "autoencoder"
    options = AESpec  # AutoencoderOptions with what its fields imply
    summary = "latent VQ codes decoded by a trained PixelShuffle decoder (ReALLM; made by the autoencoder phase)"
    bit_items = {"latent_codes": "latent", "latent_codebook": "latent", "decoder": "decoder"}
    produced_by = "the autoencoder phase (configs/ae.yaml with a reallm-* preset), not by compress_weight"
    decodes_ranges = False  # one decoder pass gives the whole matrix
    trainable = {"codebook": ("latent_codebook",)}

    def validate(self, config) -> None:
        ae_spec(config)

    def decode_macs_per_weight(self, meta: dict[str, Any], config) -> float:
        """The decoder's multiply-adds per output value: each conv's MACs at its resolution (the stem at
        the latent's, stage i at 2^i times it, the head at the patch's), over the patch's values."""
        convs = meta.get("decoder", {}).get("convs", {})
        n_stages = int(meta.get("decoder", {}).get("config", {}).get("n_stages", 0))
        total = 0.0
        for name, info in convs.items():
            c_out, c_in, kh, kw = info["shape"]
            if name == "stem":
                level = 0
            elif name.startswith("stages."):
                level = int(name.split(".")[1])
            else:  # the head, at the patch resolution
                level = n_stages
            total += c_out * c_in * kh * kw * 4.0 ** (level - n_stages)  # resolution relative to the patch
        return total

    def code_width(self, config) -> int:  # latent codes: one per d latent coordinates
        return config.bits * config.options.dim

    def decode(self, stored: dict[str, Tensor], meta: dict[str, Any], config, shape, n_blocks, shared) -> Tensor:
        Y = decode_autoencoder(stored, meta, config, shape, shared).reshape(-1)  # (p·q,)
        B = config.block_size
        pad = n_blocks * B - Y.numel()
        return torch.cat([Y, Y.new_zeros(pad)]).view(n_blocks, B) if pad else Y.view(n_blocks, B)

    def stored_layout(self, config, shape, n_blocks, *, shared=False) -> Layout:
        """The latent codes of the stored positions packed at b·d bits; shared (whatever `shared` says: a group of
        one matrix shares them too), the packed decoder and the fp16 latent codebook (2^(b·d), d)."""
        spec = ae_spec(config)
        width = self.code_width(config)
        codes = {"latent_codes": self.packed(latent_numel(shape, spec) // spec.dim, width)}
        return codes, {**decoder_layout(spec), "latent_codebook": self.spec((1 << width, spec.dim), torch.float16)}
