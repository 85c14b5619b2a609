"""HNeRV-style patch autoencoder of ReALLM (method.md §4; Chen et al., CVPR 2023).

A residual matrix, normalised by its block scales, is cut into ``P x P`` one-channel patches
(:mod:`reallm.ops.patches`). Each patch is encoded by a ConvNeXt encoder E_ψ into a latent
``(e2, e0, e1)`` (channels-first; ``e0 = e1 = P / 2**n_stages``), optionally vector-quantized
(:class:`reallm.formats.autoencoder.ste.LatentVQ`), and decoded by a PixelShuffle decoder D_φ whose convs are all
:class:`reallm.formats.autoencoder.ste.QuantConv2d` (quantization-aware training at b_φ bits, straight-through
gradients). Only the decoder is stored (codes at b_φ bits + fp16 per-channel scales + fp16 biases,
see :func:`export_decoder` / :func:`decoder_from_state` / :func:`decoder_storage_bits`), together with
the latent codes and codebook.

Everything here is a plain ``nn.Module`` or function; the training loop lives in ``reallm.phases``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reallm.formats.autoencoder.ste import LatentVQ, QuantConv2d

__all__ = [
    "LayerNorm2d",
    "ConvNeXtBlock",
    "PatchEncoder",
    "PixelShuffleDecoder",
    "PatchAutoencoder",
    "decoder_channels",
    "decoder_conv_shapes",
    "decoder_param_count",
    "solve_decoder_width",
    "quantize_decoder_",
    "set_decoder_quantization_",
    "export_decoder",
    "decoder_from_state",
    "decoder_storage_bits",
    "DEFAULT_KERNELS",
]

DEFAULT_KERNELS: tuple[int, ...] = (1, 3, 5, 5, 5)  # paper's decoder kernels, one per stage
_FORMAT = "reallm.patch_decoder.v1"


def _pair(patch: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(patch, int):
        return patch, patch
    p0, p1 = patch
    return int(p0), int(p1)


# ----------------------------------------------------------------------------------------- encoder
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first tensor ``(B, C, H, W)``."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv -> LayerNorm (channels-last) -> Linear C->4C -> GELU ->
    Linear 4C->C -> layer scale γ -> residual. (No stochastic depth: the encoder is small.)"""

    def __init__(self, dim: int, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init))) if layer_scale_init > 0 else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        y = self.dwconv(x)
        y = y.permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class PatchEncoder(nn.Module):
    """ConvNeXt encoder E_ψ: ``(B, 1, P, P)`` -> latent ``(B, e2, P / 2**n, P / 2**n)``.

    stem: 3x3 conv 1 -> ``width`` (full resolution); ``n_stages`` stages of [LayerNorm + 2x2 stride-2
    conv (ConvNeXt downsampling), ``blocks_per_stage`` ConvNeXt blocks] at ``width`` channels; head:
    LayerNorm + 1x1 conv ``width`` -> ``latent_channels``. The head is a projection rather than a last
    stage run at ``e2`` channels as in HNeRV because a LayerNorm over ``e2 ∈ {1, 2}`` channels is
    degenerate (it maps every position to the same value). ``n_stages = 0`` gives a full-resolution
    latent. The patch sides must be multiples of ``2**n_stages``.
    """

    def __init__(
        self,
        n_stages: int = 5,
        width: int = 64,
        latent_channels: int = 16,
        blocks_per_stage: int = 1,
        layer_scale_init: float = 1e-6,
    ):
        super().__init__()
        if n_stages < 0 or width < 1 or latent_channels < 1 or blocks_per_stage < 0:
            raise ValueError("n_stages >= 0, width >= 1, latent_channels >= 1, blocks_per_stage >= 0")
        self.n_stages, self.width, self.latent_channels = n_stages, width, latent_channels
        self.stem = nn.Conv2d(1, width, kernel_size=3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(
                LayerNorm2d(width, eps=1e-6),
                nn.Conv2d(width, width, kernel_size=2, stride=2),
                *[ConvNeXtBlock(width, layer_scale_init) for _ in range(blocks_per_stage)],
            )
            for _ in range(n_stages)
        )
        self.head = nn.Sequential(LayerNorm2d(width, eps=1e-6), nn.Conv2d(width, latent_channels, kernel_size=1))

    @property
    def downsample(self) -> int:
        return 2**self.n_stages

    def latent_shape(self, patch: int | Sequence[int]) -> tuple[int, int, int]:
        """``(e0, e1, e2)`` of the latent of one ``patch`` (``P`` or ``(P0, P1)``)."""
        p0, p1 = _pair(patch)
        f = self.downsample
        if p0 % f or p1 % f:
            raise ValueError(f"patch {(p0, p1)} is not divisible by 2**n_stages = {f}")
        return p0 // f, p1 // f, self.latent_channels

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, P0, P1) -> (B, e2, P0/2^n, P1/2^n)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected patches (B, 1, P0, P1), got {tuple(x.shape)}")
        self.latent_shape((x.shape[-2], x.shape[-1]))  # divisibility check
        x = self.stem(x)  # (B, width, P0, P1)
        for stage in self.stages:
            x = stage(x)  # (B, width, H/2, W/2)
        return self.head(x)  # (B, e2, e0, e1)


# ----------------------------------------------------------------------------------------- decoder
def _kernel(kernels: Sequence[int], i: int) -> int:
    return int(kernels[i] if i < len(kernels) else kernels[-1])


def decoder_channels(width: int, n_stages: int = 5, reduction: float = 1.2, min_channels: int = 12) -> list[int]:
    """Channel widths ``[C_0 = F, C_1, ..., C_n]``: ``C_{i+1} = max(round(C_i / reduction), min_channels)``
    (Python ``round``, as in HNeRV)."""
    chans = [int(width)]
    for _ in range(n_stages):
        chans.append(max(int(round(chans[-1] / reduction)), int(min_channels)))
    return chans


def decoder_conv_shapes(
    width: int,
    latent_channels: int = 16,
    n_stages: int = 5,
    kernels: Sequence[int] = DEFAULT_KERNELS,
    reduction: float = 1.2,
    min_channels: int = 12,
) -> dict[str, tuple[int, int, int, int]]:
    """Weight shape (C_out, C_in, k, k) of every conv of :class:`PixelShuffleDecoder` with these settings, by its
    name in ``quant_convs()`` order (each conv also has a bias of C_out values), without building it."""
    chans = decoder_channels(width, n_stages, reduction, min_channels)
    shapes = {"stem": (int(width), int(latent_channels), 1, 1)}  # 1x1 stem e2 -> F
    for i in range(n_stages):
        k = _kernel(kernels, i)
        shapes[f"stages.{i}"] = (4 * chans[i + 1], chans[i], k, k)  # conv to 4·C_next, then PixelShuffle(2)
    shapes["head"] = (1, chans[-1], 3, 3)  # 3x3 head -> 1 channel
    return shapes


def decoder_param_count(
    width: int,
    latent_channels: int = 16,
    n_stages: int = 5,
    kernels: Sequence[int] = DEFAULT_KERNELS,
    reduction: float = 1.2,
    min_channels: int = 12,
) -> int:
    """Parameters (weights + biases) of :class:`PixelShuffleDecoder` with these settings."""
    shapes = decoder_conv_shapes(width, latent_channels, n_stages, kernels, reduction, min_channels)
    return sum(c_out * c_in * kh * kw + c_out for c_out, c_in, kh, kw in shapes.values())


def solve_decoder_width(
    budget: float,
    latent_channels: int = 16,
    n_stages: int = 5,
    kernels: Sequence[int] = DEFAULT_KERNELS,
    reduction: float = 1.2,
    min_channels: int = 12,
) -> int:
    """The integer width ``F >= 1`` whose :func:`decoder_param_count` is closest to ``budget`` (c).

    The count grows roughly like ``F**2`` (about 112 F² for the paper's settings, so c = 7.2e6 gives
    F ≈ 254); ``min_channels`` sets a floor, so small budgets may not be reachable within a few percent.
    """
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    count = lambda f: decoder_param_count(f, latent_channels, n_stages, kernels, reduction, min_channels)
    # Every C_i is a non-decreasing function of F, so the count is too: scan up to the budget.
    f = 1
    while count(f) < budget:
        f += 1
    if f > 1 and budget - count(f - 1) <= count(f) - budget:
        return f - 1
    return f


class PixelShuffleDecoder(nn.Module):
    """HNeRV decoder D_φ: latent ``(B, e2, h, w)`` -> patch ``(B, 1, h·2^n, w·2^n)``.

    1x1 stem ``e2 -> F`` + GELU; ``n_stages`` stages of [conv ``C_i -> 4·C_{i+1}`` (kernel
    ``kernels[i]``, last one repeated, odd, "same" padding), PixelShuffle(2), GELU]; 3x3 head -> 1
    channel (no output activation: residuals are signed). Every conv is a :class:`QuantConv2d` with
    ``weight_bits`` (b_φ) and ``levels``, so QAT covers the whole decoder; ``weight_bits=None`` gives a
    float decoder.
    """

    def __init__(
        self,
        latent_channels: int = 16,
        width: int = 64,
        n_stages: int = 5,
        kernels: Sequence[int] = DEFAULT_KERNELS,
        reduction: float = 1.2,
        min_channels: int = 12,
        weight_bits: int | None = 6,
        levels: str = "nf",
    ):
        super().__init__()
        kernels = tuple(int(k) for k in kernels)
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be a non-empty sequence of odd sizes, got {kernels}")
        self.config: dict[str, Any] = {
            "latent_channels": int(latent_channels),
            "width": int(width),
            "n_stages": int(n_stages),
            "kernels": list(kernels),
            "reduction": float(reduction),
            "min_channels": int(min_channels),
            "weight_bits": None if weight_bits is None else int(weight_bits),
            "levels": levels,
        }
        self.latent_channels, self.width, self.n_stages = latent_channels, width, n_stages
        self.channels = decoder_channels(width, n_stages, reduction, min_channels)
        q = {"weight_bits": weight_bits, "levels": levels}
        self.stem = QuantConv2d(latent_channels, width, kernel_size=1, **q)
        self.stages = nn.ModuleList()
        for i in range(n_stages):
            k = _kernel(kernels, i)
            c_in, c_out = self.channels[i], 4 * self.channels[i + 1]
            self.stages.append(QuantConv2d(c_in, c_out, k, padding=k // 2, **q))
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.GELU()
        self.head = QuantConv2d(self.channels[-1], 1, kernel_size=3, padding=1, **q)

    def quant_convs(self) -> Iterator[tuple[str, QuantConv2d]]:
        """``(name, conv)`` for every conv, in a fixed order."""
        for name, m in self.named_modules():
            if isinstance(m, QuantConv2d):
                yield name, m

    def forward(self, z: Tensor) -> Tensor:  # (B, e2, h, w) -> (B, 1, h·2^n, w·2^n)
        x = self.act(self.stem(z))  # (B, F, h, w)
        for conv in self.stages:
            x = self.act(self.shuffle(conv(x)))  # (B, 4·C_next, H, W) -> (B, C_next, 2H, 2W)
        return self.head(x)  # (B, 1, h·2^n, w·2^n)


def set_decoder_quantization_(decoder: nn.Module, enabled: bool) -> nn.Module:
    """Switch QAT on/off for every :class:`QuantConv2d` in ``decoder`` (``quantize_weights``)."""
    for m in decoder.modules():
        if isinstance(m, QuantConv2d):
            m.quantize_weights = enabled
    return decoder


@torch.no_grad()
def quantize_decoder_(decoder: nn.Module, bits: int | None = None, levels: str | None = None) -> nn.Module:
    """Post-training quantization (PTQ), in place: round every conv's float weight once to its
    per-channel quantized value (and its bias to fp16), and enable quantization. ``bits`` / ``levels``
    override each conv's ``weight_bits`` / ``levels`` if given. Idempotent."""
    for m in decoder.modules():
        if not isinstance(m, QuantConv2d):
            continue
        if levels is not None:
            m.levels = levels
        if bits is not None:
            m.weight_bits = bits
        if m.weight_bits is None:
            continue
        w_q, _, _ = m.quantize()
        m.weight.copy_(w_q.to(m.weight.dtype))
        if m.bias is not None:
            m.bias.copy_(m.bias.half().to(m.bias.dtype))
        m.quantize_weights = True
    return decoder


# ---------------------------------------------------------------------------------- decoder storage
def export_decoder(decoder: PixelShuffleDecoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Stored state of a decoder: ``(meta, tensors)``.

    ``tensors`` is flat: ``"<conv>.codes"`` (uint8), ``"<conv>.scale"`` (fp16 per output channel),
    ``"<conv>.bias"`` (fp16), or ``"<conv>.weight"`` (fp16) for an unquantized conv. ``meta`` is
    JSON-able: the decoder's constructor arguments and each conv's shape / bits / levels.
    :func:`decoder_from_state` rebuilds a decoder whose forward pass equals this one's (quantized)
    forward pass bit for bit.
    """
    meta: dict[str, Any] = {"format": _FORMAT, "config": dict(decoder.config), "convs": {}}
    tensors: dict[str, Tensor] = {}
    for name, conv in decoder.quant_convs():
        st = conv.export_quantized()
        meta["convs"][name] = {
            "shape": st["shape"],
            "bits": st["bits"],
            "levels": st["levels"],
            "has_bias": st["bias"] is not None,
        }
        for key in ("codes", "scale", "bias", "weight"):
            if st.get(key) is not None:
                tensors[f"{name}.{key}"] = st[key].contiguous()
    return meta, tensors


def decoder_from_state(
    meta: dict[str, Any], tensors: dict[str, Tensor], device: torch.device | str | None = None
) -> PixelShuffleDecoder:
    """Rebuild a :class:`PixelShuffleDecoder` from :func:`export_decoder`'s ``(meta, tensors)``."""
    if meta.get("format") != _FORMAT:
        raise ValueError(f"unknown decoder format {meta.get('format')!r}")
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the global RNG
        decoder = PixelShuffleDecoder(**meta["config"])
    decoder.to(device)
    convs = dict(decoder.quant_convs())
    if set(convs) != set(meta["convs"]):
        raise ValueError("stored convs do not match the decoder built from the stored config")
    for name, info in meta["convs"].items():
        state = {
            "shape": info["shape"],
            "bits": info["bits"],
            "levels": info["levels"],
            "bias": tensors[f"{name}.bias"] if info["has_bias"] else None,
        }
        if info["bits"] is None:
            state["weight"] = tensors[f"{name}.weight"]
        else:
            state["codes"], state["scale"] = tensors[f"{name}.codes"], tensors[f"{name}.scale"]
        convs[name].load_quantized_(state)
    return decoder


def decoder_storage_bits(decoder: nn.Module) -> int:
    """Bits to store a decoder: per quantized conv ``numel·b_φ`` (codes) + 16 per output channel
    (fp16 scale) + 16 per bias; an unquantized conv's weights count 16 bits each."""
    total = 0
    for m in decoder.modules():
        if not isinstance(m, QuantConv2d):
            continue
        if m.weight_bits is None:
            total += 16 * m.weight.numel()
        else:
            total += m.weight_bits * m.weight.numel() + 16 * m.out_channels
        if m.bias is not None:
            total += 16 * m.bias.numel()
    return total


# ------------------------------------------------------------------------------------- autoencoder
class PatchAutoencoder(nn.Module):
    """E_ψ -> (latent VQ) -> D_φ on patches ``(B, 1, P, P)``."""

    def __init__(self, encoder: PatchEncoder, decoder: PixelShuffleDecoder, latent_vq: LatentVQ | None = None):
        super().__init__()
        if encoder.latent_channels != decoder.latent_channels:
            raise ValueError(f"encoder latent channels {encoder.latent_channels} != decoder {decoder.latent_channels}")
        if encoder.n_stages != decoder.n_stages:
            raise ValueError(f"encoder stages {encoder.n_stages} != decoder stages {decoder.n_stages}")
        self.encoder, self.decoder, self.latent_vq = encoder, decoder, latent_vq

    def latent_shape(self, patch: int | Sequence[int]) -> tuple[int, int, int]:
        """``(e0, e1, e2)`` per patch."""
        return self.encoder.latent_shape(patch)

    @torch.no_grad()
    def refresh_latent_codebook(self, x: Tensor) -> float:
        """Refit the latent VQ codebook by k-means on the current (float) latents of ``x``; returns
        the k-means inertia (0.0 without a latent VQ). Call it periodically while the encoder trains."""
        if self.latent_vq is None:
            return 0.0
        return self.latent_vq.refresh(self.encoder(x))

    def encode(self, x: Tensor) -> Tensor:  # (B, 1, P, P) -> (B, e2, e0, e1), quantized if VQ enabled
        z = self.encoder(x)
        if self.latent_vq is not None:
            z = self.latent_vq(z)
        return z

    def decode(self, z: Tensor) -> Tensor:  # (B, e2, e0, e1) -> (B, 1, P, P)
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, P, P) -> (B, 1, P, P)
        return self.decode(self.encode(x))
