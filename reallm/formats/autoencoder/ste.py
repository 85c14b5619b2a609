"""Straight-through quantizers for the patch autoencoder (method.md §4).

- :func:`straight_through` / :func:`ste_round`: use the quantized value in the forward pass, copy the
  gradient unchanged to the float value in the backward pass (STE).
- :func:`quantize_weight_per_channel`: absmax scale per output channel (dim 0), NF or uniform levels;
  the scale is rounded to fp16 *before* it is used, so the dequantized weight is exactly what the
  stored ``(codes, scale)`` reproduce.
- :class:`QuantConv2d`: a ``nn.Conv2d`` trained with its weight quantized to ``weight_bits`` bits
  (quantization-aware training of the decoder D_φ at b_φ bits), exportable as codes + scales.
- :class:`LatentVQ`: k-means vector quantization of the latent E_ψ(x) with a straight-through gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from reallm.ops.kmeans import assign, kmeans
from reallm.ops.scalar import nearest_level, nf_levels

__all__ = [
    "straight_through",
    "ste_round",
    "level_table",
    "quantize_weight_per_channel",
    "dequantize_weight_per_channel",
    "QuantConv2d",
    "LatentVQ",
]

LEVEL_KINDS = ("nf", "uniform")
_FP16_MAX = 65504.0


def straight_through(x: Tensor, x_q: Tensor) -> Tensor:
    """Value of ``x_q`` in the forward pass, identity gradient to ``x`` in the backward pass (STE).

    Same gradient as ``x + (x_q - x).detach()``, but written as ``x_q.detach() + (x - x.detach())``
    so that the forward value is *bit-exactly* ``x_q`` (``x - x.detach()`` is exactly 0 for finite
    ``x``; ``x + (x_q - x)`` can be off by one ulp). ``x_q`` receives no gradient.
    """
    return x_q.detach() + (x - x.detach())


def ste_round(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return straight_through(x, torch.round(x))


def level_table(bits: int, levels: str = "nf", device: torch.device | str | None = None) -> Tensor:
    """Sorted fp32 table of ``2**bits`` levels in [-1, 1].

    ``"nf"``: NormalFloat levels (``reallm.ops.scalar.nf_levels``, bits 2..8, contains 0 and both
    ends -1 and 1, so an absmax-normalised weight always has a level at its extreme); ``"uniform"``: symmetric uniform
    levels ``linspace(-1, 1, 2**bits)`` (both ends included; an even number of symmetric levels has
    no exact zero).
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if levels == "nf":
        table = nf_levels(bits).to(dtype=torch.float32)
    elif levels == "uniform":
        table = torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float32)
    else:
        raise ValueError(f"unknown levels {levels!r}; expected one of {LEVEL_KINDS}")
    return table.to(device) if device is not None else table


def _code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int64


def quantize_weight_per_channel(
    w: Tensor, bits: int, levels: str = "nf", *, table: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Absmax per-output-channel quantization of ``w`` (dim 0 = output channels).

    Returns ``(w_q, codes, scale)``:
    - ``w_q``: dequantized weight, fp32, shape of ``w`` (``table[codes] * scale``, using the
      fp16-rounded scale, i.e. exactly what ``(codes, scale)`` decode to);
    - ``codes``: level indices, same shape as ``w``, uint8 for ``bits <= 8`` else int64;
    - ``scale``: fp16 ``(C_out,)`` absmax of each output channel.
    No gradient flows through (use :func:`straight_through`). ``table`` (a cached
    ``level_table(bits, levels)`` on ``w``'s device) skips rebuilding the level table.
    """
    w = w.detach().float()
    c_out = w.shape[0]
    table = level_table(bits, levels, device=w.device) if table is None else table.float()
    absmax = w.reshape(c_out, -1).abs().amax(dim=1)  # (C_out,)
    scale = absmax.clamp(max=_FP16_MAX).to(torch.float16)  # what is stored
    s = scale.float().view(c_out, *([1] * (w.dim() - 1)))  # (C_out, 1, ..., 1)
    # A zero (or fp16-underflowing) scale maps the whole channel to level * 0 = 0.
    normed = w / s.clamp_min(torch.finfo(torch.float32).tiny)
    codes = nearest_level(normed, table)  # int64, shape of w
    w_q = table[codes] * s
    return w_q, codes.to(_code_dtype(bits)), scale


def dequantize_weight_per_channel(codes: Tensor, scale: Tensor, bits: int, levels: str = "nf") -> Tensor:
    """Inverse of :func:`quantize_weight_per_channel`: fp32 ``table[codes] * scale`` per output channel."""
    table = level_table(bits, levels, device=codes.device)
    s = scale.float().view(codes.shape[0], *([1] * (codes.dim() - 1)))
    return table[codes.long()] * s


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is quantized per output channel to ``weight_bits`` bits (QAT).

    When ``weight_bits`` is set and ``quantize_weights`` is True (a plain attribute, default True),
    the forward pass uses the quantized weight ``table[codes] * scale`` (fp16 absmax scale per output
    channel) and the fp16-rounded bias, with straight-through gradients to the float parameters;
    otherwise it is a plain float conv. Quantizing an already-quantized weight gives it back exactly,
    so a conv rebuilt from :meth:`export_quantized` reproduces the trained forward pass bit for bit.
    """

    def __init__(self, *args: Any, weight_bits: int | None = None, levels: str = "nf", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.quantize_weights = True
        self._levels = levels
        self._weight_bits: int | None = None
        self.register_buffer("level_values", None, persistent=False)
        self.weight_bits = weight_bits  # builds the level table

    # -- configuration -------------------------------------------------------------------------
    @property
    def weight_bits(self) -> int | None:
        return self._weight_bits

    @weight_bits.setter
    def weight_bits(self, bits: int | None) -> None:
        self._weight_bits = None if bits is None else int(bits)
        self._rebuild_table()

    @property
    def levels(self) -> str:
        return self._levels

    @levels.setter
    def levels(self, kind: str) -> None:
        self._levels = kind
        self._rebuild_table()

    def _rebuild_table(self) -> None:
        if self._weight_bits is None:
            self.level_values = None
        else:
            self.level_values = level_table(self._weight_bits, self._levels, device=self.weight.device)

    @property
    def quantizing(self) -> bool:
        return self._weight_bits is not None and self.quantize_weights

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self._weight_bits}, levels={self._levels!r}"

    # -- forward ---------------------------------------------------------------------------------
    def quantize(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(w_q fp32, codes, scale fp16)`` of the current float weight (requires ``weight_bits``)."""
        if self._weight_bits is None:
            raise RuntimeError("weight_bits is None: nothing to quantize")
        return quantize_weight_per_channel(self.weight, self._weight_bits, self._levels, table=self.level_values)

    def effective_weight(self) -> Tensor:
        """Weight used by the forward pass (quantized with STE when :attr:`quantizing`)."""
        if not self.quantizing:
            return self.weight
        w_q = self.quantize()[0].to(self.weight.dtype)
        return straight_through(self.weight, w_q)

    def effective_bias(self) -> Tensor | None:
        if self.bias is None or not self.quantizing:
            return self.bias
        return straight_through(self.bias, self.bias.detach().half().to(self.bias.dtype))

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        return self._conv_forward(x, self.effective_weight(), self.effective_bias())

    # -- storage -----------------------------------------------------------------------------------
    def conv_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments of this conv."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    @torch.no_grad()
    def export_quantized(self) -> dict[str, Any]:
        """Stored state: ``codes`` (uint8 for <= 8 bits), ``scale`` (fp16, (C_out,)), ``bias`` (fp16 or
        None), ``shape``, ``bits``, ``levels`` and the conv geometry (``config``).

        With ``weight_bits=None`` the weight is stored as fp16 ``weight`` instead of codes + scale
        (and the rebuilt conv then computes with the fp16-rounded weight).
        """
        out: dict[str, Any] = {
            "shape": list(self.weight.shape),
            "bits": self._weight_bits,
            "levels": self._levels,
            "bias": None if self.bias is None else self.bias.detach().half(),
            "config": self.conv_config(),
        }
        if self._weight_bits is None:
            out["weight"] = self.weight.detach().half()
        else:
            _, codes, scale = self.quantize()
            out["codes"], out["scale"] = codes, scale
        return out

    @torch.no_grad()
    def load_quantized_(self, state: dict[str, Any]) -> QuantConv2d:
        """Overwrite weight/bias with the decoded ``state`` of :meth:`export_quantized` (in place)."""
        if list(state["shape"]) != list(self.weight.shape):
            raise ValueError(f"shape mismatch: stored {state['shape']} vs conv {list(self.weight.shape)}")
        bits, kind = state["bits"], state["levels"]
        if bits is None:
            w = state["weight"].float()
        else:
            w = dequantize_weight_per_channel(state["codes"], state["scale"], bits, kind)
        self.weight.copy_(w.to(self.weight.device))
        if (state["bias"] is None) != (self.bias is None):
            raise ValueError("bias presence mismatch between stored state and conv")
        if self.bias is not None:
            self.bias.copy_(state["bias"].to(self.bias.device).float())
        self._levels = kind
        self.weight_bits = bits
        self.quantize_weights = True
        return self

    @classmethod
    def load_quantized(cls, state: dict[str, Any], device: torch.device | str | None = None) -> QuantConv2d:
        """Rebuild a conv from :meth:`export_quantized` (its forward then equals the exported one's)."""
        cfg = dict(state["config"])
        padding = cfg.pop("padding")
        conv = cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()},
            padding=padding if isinstance(padding, str) else tuple(padding),
            bias=state["bias"] is not None,
            weight_bits=state["bits"],
            levels=state["levels"],
            device=device,
        )
        return conv.load_quantized_(state)


load_quantized = QuantConv2d.load_quantized


class LatentVQ(nn.Module):
    """Vector quantization of a latent ``(B, e2, h, w)`` with a k-means codebook and STE (method.md §4).

    A vector is ``d`` *consecutive channels* at one spatial position: channels ``[g*d, (g+1)*d)`` of
    position ``(b, :, i, j)`` form vector ``(b, g, i, j)`` (so ``e2 % d == 0`` is required; with
    ``e2 = 1`` only ``d = 1`` works). The codebook has ``K = 2**(b*d)`` codewords (``b`` bits per
    coordinate), kept as a buffer and fitted by :func:`reallm.ops.kmeans.kmeans` on current latents with
    :meth:`refresh` (``max_points`` subsamples the vectors for speed). Codewords are rounded to fp16
    (what is stored). The forward pass returns the quantized latent, the backward pass copies the
    gradient straight through to the float latent; the codebook receives no gradient. Before the
    first refresh, the forward pass fits the codebook on its input.
    """

    codebook: Tensor
    initialized: Tensor

    def __init__(
        self,
        bits: int = 3,
        dim: int = 2,
        *,
        iters: int = 100,
        tol: float = 1e-4,
        init: str = "kmeans++",
        max_points: int | None = 65536,
        seed: int = 0,
        chunk_size: int | None = None,
    ):
        super().__init__()
        if bits < 1 or dim < 1 or bits * dim > 16:
            raise ValueError(f"need bits >= 1, dim >= 1 and bits*dim <= 16, got bits={bits}, dim={dim}")
        self.bits, self.dim = int(bits), int(dim)
        self.num_codes = 2 ** (self.bits * self.dim)  # K = 2^(b·d) (method.md §3; "2^(b-d)" is a typo)
        self.iters, self.tol, self.init = iters, tol, init
        self.max_points, self.seed, self.chunk_size = max_points, seed, chunk_size
        self.enabled = True
        self.register_buffer("codebook", torch.zeros(self.num_codes, self.dim))  # (K, d)
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, dim={self.dim}, num_codes={self.num_codes}"

    # -- layout -------------------------------------------------------------------------------------
    def _check(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int, int]:
        if len(shape) != 4:
            raise ValueError(f"expected a latent (B, e2, h, w), got shape {tuple(shape)}")
        B, C, H, W = (int(s) for s in shape)
        if C % self.dim:
            raise ValueError(f"latent channels e2={C} must be a multiple of the VQ dimension d={self.dim}")
        return B, C, H, W

    def to_vectors(self, z: Tensor) -> Tensor:
        """``(B, e2, h, w)`` -> ``(N, d)`` with ``N = B * (e2/d) * h * w``, order ``(b, g, i, j)``."""
        B, C, H, W = self._check(z.shape)
        d = self.dim
        return z.reshape(B, C // d, d, H, W).permute(0, 1, 3, 4, 2).reshape(-1, d)  # (N, d)

    def from_vectors(self, v: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`to_vectors`: ``(N, d)`` -> ``(B, e2, h, w)``."""
        B, C, H, W = self._check(shape)
        d = self.dim
        return v.reshape(B, C // d, H, W, d).permute(0, 1, 4, 2, 3).reshape(B, C, H, W)

    # -- codebook -------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, z: Tensor) -> float:
        """Fit the codebook by k-means on the vectors of ``z`` (detached); returns the k-means inertia.

        With fewer distinct training vectors than ``K``, k-means runs with ``k = N`` and the remaining
        codewords repeat the found ones (ties resolve to the first, so they are never used).
        """
        v = self.to_vectors(z.detach().float())  # (N, d)
        k = min(self.num_codes, v.shape[0])
        res = kmeans(
            v,
            k,
            iters=self.iters,
            tol=self.tol,
            init=self.init,
            seed=self.seed,
            max_points=self.max_points,
            chunk_size=self.chunk_size,
        )
        cb = res.codebook.to(device=self.codebook.device, dtype=torch.float32)  # (k, d)
        if k < self.num_codes:
            cb = cb[torch.arange(self.num_codes, device=cb.device) % k]  # (K, d)
        self.codebook.copy_(cb.half().float())  # stored in fp16
        self.initialized.fill_(True)
        return float(res.inertia)

    # -- coding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Codes (int64, shape ``(B, e2/d, h, w)``) of the nearest codewords."""
        B, C, H, W = self._check(z.shape)
        codes = assign(self.to_vectors(z.detach().float()), self.codebook, chunk_size=self.chunk_size)
        return codes.reshape(B, C // self.dim, H, W)

    def decode(self, codes: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Quantized latent ``(B, e2, h, w)`` (fp32) from codes (any shape with ``N`` elements)."""
        return self.from_vectors(self.codebook[codes.reshape(-1).long()], shape)

    def forward(self, z: Tensor) -> Tensor:  # (B, e2, h, w) -> (B, e2, h, w)
        if not self.enabled:
            return z
        if not bool(self.initialized):
            self.refresh(z)
        z_q = self.decode(self.encode(z), z.shape).to(z.dtype)
        return straight_through(z, z_q)

    # -- bits ---------------------------------------------------------------------------------
    def storage_bits(self, latent_shape: tuple[int, ...]) -> int:
        """Bits to store a latent of ``latent_shape`` (any shape; its numel counts): ``b`` per
        coordinate (``b·d`` per vector) plus the fp16 codebook (``16·d·K``)."""
        numel = 1
        for s in latent_shape:
            numel *= int(s)
        return numel * self.bits + 16 * self.dim * self.num_codes
