"""ReALLMLinear: a frozen compressed weight plus a trainable DoRA part (method.md §5).

    W_ft = m ⊙ (Q̂ + s·B A) / ‖Q̂ + s·B A‖_row        (norm detached, DoRA §4.3)

The frozen part is kept in its stored form (packed codes, fp16 codebooks, scale codes, permutation,
...): that is all a layer holds in memory, in the dtypes it was stored with. How Q̂ is computed is the
layer's runtime mode:

- ``"resident"`` (default): every forward decodes Q̂ in row tiles, multiplies, and frees each tile; the
  backward decodes again instead of saving it (the frozen matmul returns only the input gradient), and
  the DoRA row norms come from the same tiles. A format whose decoder costs more than
  ``AUTO_CACHE_MACS_PER_WEIGHT`` per weight (a large patch-autoencoder decoder) is cached instead,
  automatically (`effective_mode` says which; `runtime_report` lists them).
- ``"cache"``: Q̂ decoded once and kept densely in the compute dtype (fast when memory allows).

In both modes the row norms ‖Q̂ + sBA‖ are cached while the adapters do not change (evaluation,
generation, gradient accumulation). Stored floating-point tensors are kept as raw bytes, so `.to(dtype)`,
`.half()`, precision plugins and FSDP mixed precision (which cast only floating tensors) never change
them: only device moves apply. B (p, r), A (r, q) and m (p,) are parameters, computed with exactly their
stored precision (`reallm.ops.precision`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from reallm.core.errors import UserError
from reallm.formats import PIPELINE_TRAINABLE, get_codec
from reallm.ops import precision as storage
from reallm.weight.pipeline import ReALLMWeight, decode_frozen, decode_frozen_rows, row_tiles, tile_plan

RuntimeMode = Literal["resident", "cache"]
RUNTIME_MODES = ("resident", "cache")
FastPath = Literal["auto", "off"]
# in "cache" mode the dense cached weight serves small matrices faster than a kernel call (tens of µs of
# overhead per call); from this many weights on, reading the packed codes wins (memory-bound matvec)
KERNEL_MIN_WEIGHTS_WITH_CACHE = 1 << 20
# a format whose decode costs more multiply-adds per weight than a matmul of this many tokens is cached
# in "resident" mode (decoding it at every step would cost more than the step's matmuls)
AUTO_CACHE_MACS_PER_WEIGHT = 64.0
TILE_ELEMS = 1 << 22  # values per decoded row tile (16 MiB in fp32)


class FrozenMatmul(torch.autograd.Function):
    """y = x Wᵀ for a frozen dense W: backward returns only dL/dx = dL/dy · W (no grad for W)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # x (..., q), weight (p, q)
        ctx.save_for_backward(weight)  # a reference to the cached buffer: no extra memory
        return x @ weight.to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out (..., p)
        (weight,) = ctx.saved_tensors
        return grad_out @ weight.to(grad_out.dtype), None


class ResidentMatmul(torch.autograd.Function):
    """y = x Q̂ᵀ with Q̂ decoded tile by tile from the layer's stored tensors, never whole.

    Also returns the DoRA row norms ‖Q̂ + s·B A‖ (p,) from the same tiles when `lowrank` = (B, A) is given
    (detached fp32 factors; an empty tensor otherwise). Backward decodes the tiles again and returns the
    input gradient; nothing of Q̂ is saved between forward and backward. When stored tensors of the layer
    are trained (`stored`: codebooks, scales; codes stay frozen), backward also re-decodes each tile under
    autograd and pulls the tile's weight gradient gyᵀ x back to them (x is then saved).
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: ReALLMLinear, lowrank: tuple[Tensor, Tensor] | None,
                *stored: Tensor) -> tuple[Tensor, Tensor]:
        ctx.layer = layer
        ctx.n_stored = len(stored)
        if stored:
            ctx.save_for_backward(x)
        y = x.new_empty(*x.shape[:-1], layer.out_features)  # (..., p)
        norms = torch.empty(layer.out_features if lowrank else 0, device=x.device, dtype=torch.float32)
        for r0, r1, Q in layer.frozen_tiles():  # Q (r1 − r0, q) fp32
            y[..., r0:r1] = x @ Q.to(x.dtype).T
            if lowrank is not None:
                B, A = lowrank
                norms[r0:r1] = torch.linalg.vector_norm(Q + layer.lora_scale * (B[r0:r1] @ A), dim=1)
        ctx.mark_non_differentiable(norms)
        return y, norms

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_norms: Tensor):  # grad_y (..., p)
        layer = ctx.layer
        need_x = ctx.needs_input_grad[0]
        need_stored = any(ctx.needs_input_grad[3:])
        grad_x = grad_y.new_zeros(*grad_y.shape[:-1], layer.in_features) if need_x else None  # (..., q)
        grads: list[Tensor | None] = [None] * ctx.n_stored
        if need_stored:
            (x,) = ctx.saved_tensors
            x2, gy2 = x.reshape(-1, layer.in_features).float(), grad_y.reshape(-1, layer.out_features).float()
            leaves = {k: p.detach().requires_grad_(True) for k, p in layer.stored_params.items()}
            with torch.enable_grad():
                for r0, r1, Q in layer._decoded_tiles(leaves):  # Q depends on the leaves
                    if need_x:
                        grad_x += grad_y[..., r0:r1] @ Q.detach().to(grad_y.dtype)
                    G = gy2[:, r0:r1].T @ x2  # (r1 − r0, q): the tile's weight gradient
                    for k, g in zip(leaves, torch.autograd.grad(Q, list(leaves.values()), G, allow_unused=True)):
                        if g is not None:
                            i = list(leaves).index(k)
                            grads[i] = g if grads[i] is None else grads[i] + g
        elif need_x:
            for r0, r1, Q in layer.frozen_tiles():
                grad_x += grad_y[..., r0:r1] @ Q.to(grad_y.dtype)
        return (grad_x, None, None, *grads)


# ---------------------------------------------------------------------------------------------
# stored tensors as buffers that no dtype cast can touch
# ---------------------------------------------------------------------------------------------
def _buffer_name(key: str, prefix: str) -> str:
    return prefix + key.replace(".", "__")


def _register_stored(module: nn.Module, prefix: str, tensors: dict[str, Tensor]) -> dict[str, tuple]:
    """Register `tensors` as buffers `<prefix><name>`: integer tensors as they are, floating ones as their
    raw bytes (uint8, 1-D). Returns {name: (dtype, shape)} to read them back with `_read_stored`."""
    specs = {}
    for k, t in tensors.items():
        t = t.detach()
        specs[k] = (t.dtype, tuple(t.shape))
        if t.is_floating_point():
            t = t.contiguous().reshape(-1).view(torch.uint8)  # bytes: .to(dtype) / .half() skip them
        module.register_buffer(_buffer_name(k, prefix), t)
    return specs


def _read_stored(module: nn.Module, prefix: str, specs: dict[str, tuple]) -> dict[str, Tensor]:
    """The stored tensors in their stored dtype and shape (views of the buffers, no copy)."""
    out = {}
    for k, (dtype, shape) in specs.items():
        t = module._buffers[_buffer_name(k, prefix)]
        out[k] = t.view(dtype).view(shape) if t.dtype != dtype else t
    return out


class ReALLMLinear(nn.Module):
    """Drop-in replacement for nn.Linear whose weight is a ReALLM container.

    Buffers hold every stored tensor of the frozen part (names `frozen__*`, `shared__*`, floating ones as
    raw bytes) and the original bias; parameters are `lora_A` (r, q), `lora_B` (p, r) and, with DoRA,
    `magnitude` (p,).

    Args:
        weight: the compressed weight.
        bias: the original bias (kept frozen, at its stored dtype), or None.
        mode: "resident" or "cache" (see the module docstring).
        lora_scale: s in the formula above (1 keeps the decomposition's product).
        magnitude: the DoRA magnitude m (p,) as stored (from an adapters file); None computes it from the
            decoded weight (a new compression: m = ‖Q̂ + L1 L2ᵀ‖_row, so the initial output is exactly
            x (Q̂ + L1 L2ᵀ)ᵀ). Ignored when the config keeps no magnitude.
        name: the layer's name in its model (named in errors).
    """

    def __init__(
        self,
        weight: ReALLMWeight,
        bias: Tensor | None = None,
        *,
        mode: RuntimeMode = "resident",
        lora_scale: float = 1.0,
        magnitude: Tensor | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.config = weight.config
        self.meta = dict(weight.meta)
        self.shared_keys = sorted(weight.shared)
        self.lora_scale = lora_scale
        self.name = name
        self.layout = "linear"  # "conv1d" for GPT-2 style layers (set by surgery)
        self.stats: dict = {}  # filled by surgery: rel_frobenius_error, original dtype, ...
        self._frozen_specs = _register_stored(self, "frozen__", weight.frozen)
        # shared with other layers (a model-wide codebook, a decoder): the checkpoint stores it once
        self._shared_specs = _register_stored(self, "shared__", weight.shared)
        self.stored_params = nn.ParameterDict()  # stored tensors being fine-tuned (`make_stored_trainable`)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cache: Tensor | None = None  # dense Q̂ (p, q) in the compute dtype ("cache" mode)
        self._norm_cache: tuple[Any, Tensor] | None = None  # (adapter versions, row norms (p,))
        self._exact_factors: tuple | None = None  # adapter versions whose factors hold stored values exactly
        self._kernel_prep = None  # what the fused kernels keep (reallm.layer.kernels.prepare), built on first use
        self.fast_path: FastPath = "auto"  # "off": always the plain decode / dense path
        self.last_path: str | None = None  # the path of the last forward ("triton", "cpu", ..., "decode", "cache")
        self.mode: RuntimeMode = "resident"
        self.set_mode(mode)

        L1, L2 = weight.lowrank_factors()  # (p, r), (q, r), exactly the stored values
        self.rank = L1.shape[1]
        if self.rank:
            self.lora_B = nn.Parameter(L1.clone())
            self.lora_A = nn.Parameter(L2.T.contiguous().clone())
        else:
            self.register_parameter("lora_B", None)
            self.register_parameter("lora_A", None)
        if self.config.dora and self.rank:
            if magnitude is None:
                with torch.no_grad():
                    B, A = self._factors()
                    magnitude = self._row_norms(B.detach().float(), A.detach().float())
            self.magnitude = nn.Parameter(storage.round_to_storage(magnitude, self.config.magnitude_dtype))
        else:
            self.register_parameter("magnitude", None)

    # -- runtime mode ---------------------------------------------------------------------------
    def set_mode(self, mode: RuntimeMode) -> None:
        """Switch between "resident" and "cache" (the dense cache is dropped or built lazily)."""
        if mode not in RUNTIME_MODES:
            raise UserError(f"layer {self.name or '?'}: runtime mode must be one of {RUNTIME_MODES}, got {mode!r}")
        self.mode = mode
        self._cache = None

    @property
    def decode_macs_per_weight(self) -> float:
        """Multiply-adds the format's decoder spends per weight (a patch-autoencoder decoder: many)."""
        return get_codec(self.config.quantizer).decode_macs_per_weight(self.meta, self.config)

    @property
    def effective_mode(self) -> RuntimeMode:
        """The mode the layer runs in: its `mode`, except that in "resident" mode a format whose decoder
        costs more than AUTO_CACHE_MACS_PER_WEIGHT per weight is cached."""
        if len(self.stored_params):
            return "resident"  # a dense copy would be stale after every step of the trained stored tensors
        if self.mode == "resident" and self.decode_macs_per_weight > AUTO_CACHE_MACS_PER_WEIGHT:
            return "cache"
        return self.mode

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): caches are rebuilt lazily
        self.clear_cache()
        return super()._apply(fn, recurse)

    def clear_cache(self) -> None:
        self._cache = None
        self._norm_cache = None
        self._exact_factors = None
        self._kernel_prep = None

    def set_fast_path(self, fast_path: FastPath) -> None:
        """"auto": small token counts without a gradient go through a fused dequantize-matmul kernel when
        one serves the format, device and dtype (`reallm.layer.kernels`); "off": always the plain path."""
        if fast_path not in ("auto", "off"):
            raise UserError(f"layer {self.name or '?'}: fast_path must be 'auto' or 'off', got {fast_path!r}")
        self.fast_path = fast_path

    def kernel_path(self, x: Tensor) -> str | None:
        """The fused kernel path this input would take, or None (plain path). Only without a gradient to
        x (generation, evaluation): the kernels have no backward. In "cache" mode only for large matrices."""
        if self.fast_path == "off" or (torch.is_grad_enabled() and x.requires_grad) or len(self.stored_params):
            return None
        if not get_codec(self.config.quantizer).table_kernels:
            return None
        if self.effective_mode == "cache" and self.out_features * self.in_features < KERNEL_MIN_WEIGHTS_WITH_CACHE:
            return None
        from reallm.layer.kernels import available_paths

        n_tokens = x.numel() // max(1, self.in_features)
        path = available_paths(self.config, x.device, x.dtype, n_tokens, (self.out_features, self.in_features))[0]
        return None if path == "decode" else path

    def _kernel_matmul(self, x: Tensor, path: str) -> Tensor:
        from reallm.layer.kernels import frozen_matmul, prepare

        stored, shared = self._frozen_tensors(), self._shared_tensors()
        shape = (self.out_features, self.in_features)
        if self._kernel_prep is None:
            self._kernel_prep = prepare(stored, self.config, shape, shared)
        return frozen_matmul(x, stored, self.config, shape, shared, path=path, prepared=self._kernel_prep)

    # -- stored tensors -------------------------------------------------------------------------
    def _frozen_tensors(self, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return self._with_trained(_read_stored(self, "frozen__", self._frozen_specs), "frozen__", values)

    def _shared_tensors(self, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return self._with_trained(_read_stored(self, "shared__", self._shared_specs), "shared__", values)

    def _with_trained(self, tensors: dict[str, Tensor], prefix: str, values: dict[str, Tensor] | None):
        """Stored tensors, those being trained replaced by their parameter (or `values`) rounded to the stored
        dtype: the forward sees exactly what would be saved. The value stays fp32 with a straight-through
        gradient (a gradient taken in fp16 would flush the small ones to zero)."""
        source = values if values is not None else self.stored_params
        for k in tensors:
            key = _buffer_name(k, prefix)
            if key in source:
                t = source[key]
                tensors[k] = t + (t.detach().to(tensors[k].dtype).to(t.dtype) - t.detach())
        return tensors

    # -- training stored tensors (codes stay frozen) ---------------------------------------------------
    def trainable_stored_keys(self, items: tuple[str, ...] = ("codebook", "scales")) -> list[str]:
        """Buffer names (`frozen__*`, `shared__*`) of the stored floating tensors that fine-tuning may train
        for `items` (the format's `trainable`, plus the pipeline's block-scale maxima)."""
        codec = get_codec(self.config.quantizer)
        wanted = {k for item in items for k in codec.trainable.get(item, ())}
        if codec.blockwise and codec.absmax_scales:
            wanted |= {k for item in items for k in PIPELINE_TRAINABLE.get(item, ())}
        out = []
        for prefix, specs in (("frozen__", self._frozen_specs), ("shared__", self._shared_specs)):
            out += [_buffer_name(k, prefix) for k, (dt, _) in specs.items() if k in wanted and dt.is_floating_point]
        return out

    def write_back_stored(self) -> None:
        """End of training: the trained stored tensors go back into the stored buffers at their stored
        precision and stop being parameters (the layer is frozen again, fused kernels serve it again)."""
        with torch.no_grad():
            for key, param in list(self.stored_params.items()):
                prefix = "frozen__" if key.startswith("frozen__") else "shared__"
                specs = self._frozen_specs if prefix == "frozen__" else self._shared_specs
                dtype, shape = specs[key[len(prefix):].replace("__", ".")]
                value = param.detach().to(dtype).reshape(-1).contiguous()
                self._buffers[key] = value.view(torch.uint8).clone() if value.is_floating_point() else value.clone()
                del self.stored_params[key]
        self.clear_cache()

    def container(self) -> ReALLMWeight:
        """The layer's current state as a ReALLMWeight (frozen part + current low-rank)."""
        lowrank = {}
        if self.rank:
            dt = self.config.lowrank_dtype
            lowrank.update({f"L1.{k}": v for k, v in storage.encode_stored(self.lora_B, dt).items()})
            lowrank.update({f"L2.{k}": v for k, v in storage.encode_stored(self.lora_A.T, dt).items()})
        # at their stored dtype (a trained tensor is an fp32 parameter)
        frozen = {k: v.detach().to(self._frozen_specs[k][0]) for k, v in self._frozen_tensors().items()}
        shared = {k: v.detach().to(self._shared_specs[k][0]) for k, v in self._shared_tensors().items()}
        return ReALLMWeight((self.out_features, self.in_features), self.config, frozen, lowrank, dict(self.meta),
                            shared)

    def adapter_tensors(self) -> dict[str, Tensor]:
        """Trainable parts in stored form (what adapters.safetensors keeps for this layer)."""
        out: dict[str, Tensor] = {}
        if self.rank:
            dt = self.config.lowrank_dtype
            out.update({f"lora_B.{k}": v for k, v in storage.encode_stored(self.lora_B, dt).items()})
            out.update({f"lora_A.{k}": v for k, v in storage.encode_stored(self.lora_A.T, dt).items()})
        if self.magnitude is not None:
            out.update({f"magnitude.{k}": v for k, v in
                        storage.encode_stored(self.magnitude, self.config.magnitude_dtype).items()})
        return out

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `adapter_tensors` (raises KeyError naming a missing tensor)."""
        def part(prefix: str) -> dict[str, Tensor]:
            sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            if not sub:
                raise KeyError(prefix)
            return sub

        if self.rank:
            dt = self.config.lowrank_dtype
            self.lora_B.copy_(storage.decode_stored(part("lora_B"), dt))
            self.lora_A.copy_(storage.decode_stored(part("lora_A"), dt).T)
        if self.magnitude is not None:
            self.magnitude.copy_(storage.decode_stored(part("magnitude"), self.config.magnitude_dtype))

    # -- the frozen weight ----------------------------------------------------------------------
    def frozen_tiles(self):
        """(r0, r1, Q̂[r0:r1] fp32) for the row tiles of the frozen part: decoded from the stored tensors
        (resident), or row chunks of the dense cache (in fp32)."""
        if self.effective_mode == "cache":
            Q = self._cache if self._cache is not None else self._dense()
            rows = max(1, TILE_ELEMS // max(1, self.in_features))
            for r0 in range(0, self.out_features, rows):
                yield r0, min(self.out_features, r0 + rows), Q[r0:r0 + rows].float()
            return
        yield from self._decoded_tiles()

    def _decoded_tiles(self, values: dict[str, Tensor] | None = None):
        stored, shared = self._frozen_tensors(values), self._shared_tensors(values)
        shape = (self.out_features, self.in_features)
        plan = tile_plan(stored, self.config, shape)
        for r0, r1 in row_tiles(shape, self.config, TILE_ELEMS):
            yield r0, r1, decode_frozen_rows(stored, self.meta, self.config, shape, r0, r1, shared=shared, plan=plan)

    def frozen_weight(self) -> Tensor:
        """Q̂ (p, q) in fp32, decoded now (a dense copy: for exports, figures and checks, not forward)."""
        return decode_frozen(self._frozen_tensors(), self.meta, self.config, (self.out_features, self.in_features),
                             shared=self._shared_tensors())

    def _dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense cache ("cache" mode), built once in `dtype` (fp32 if None) from fp32 row tiles."""
        dtype = dtype or torch.float32
        if self._cache is None or self._cache.dtype != dtype:
            self._cache = None
            device = self._device()
            self._check_cache_memory(device, dtype)
            # a normal tensor even under inference_mode, so that a later training step can use it
            with torch.inference_mode(False), torch.no_grad():
                Q = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
                for r0, r1, tile in self._decoded_tiles():
                    Q[r0:r1] = tile
            self._cache = Q
        return self._cache

    def _device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    def _check_cache_memory(self, device: torch.device, dtype: torch.dtype) -> None:
        need = self.out_features * self.in_features * torch.empty(0, dtype=dtype).element_size()
        free = _free_memory(device)
        if free is not None and need > free:
            raise UserError(f"layer {self.name or '?'}: runtime mode 'cache' needs {need / 2**30:.2f} GiB on {device} "
                            f"for its dense weight, {free / 2**30:.2f} GiB are free: use mode 'resident'")

    # -- DoRA -----------------------------------------------------------------------------------
    def _factors(self) -> tuple[Tensor, Tensor]:
        """(B (p, r), A (r, q)) at their storage precision (straight-through while training). Without a
        gradient (generation, evaluation) factors that already hold stored values, as loaded, are used as they
        are: checked once per adapter version, so no copy is made per call and none is kept."""
        dt = self.config.lowrank_dtype
        if not torch.is_grad_enabled() and self._exact_factors == self._adapter_key():
            return self.lora_B, self.lora_A
        B, A = storage.fake_store(self.lora_B, dt), storage.fake_store(self.lora_A.T, dt).T
        if not torch.is_grad_enabled():
            exact = torch.equal(B, self.lora_B) and torch.equal(A, self.lora_A)
            self._exact_factors = self._adapter_key() if exact else None
        return B, A

    def lowrank_product(self) -> Tensor | None:
        """s·B A (p, q) as the layer computes it (stored precision), or None without a low-rank part."""
        if not self.rank:
            return None
        B, A = self._factors()
        return self.lora_scale * (B @ A)  # (p, q)

    def _adapter_key(self) -> tuple:
        ts = (self._parameters.get("lora_A"), self._parameters.get("lora_B"), self._parameters.get("magnitude"),
              *self.stored_params.values())  # (magnitude is not registered yet while __init__ computes it)
        return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype) for t in ts) + (self.lora_scale,)

    @torch.no_grad()
    def _row_norms(self, B: Tensor, A: Tensor) -> Tensor:
        """‖Q̂ + s·B A‖ per row (p,), fp32, from the frozen tiles (no whole (p, q) copy is made)."""
        norms = torch.empty(self.out_features, dtype=torch.float32, device=B.device)
        for r0, r1, Q in self.frozen_tiles():
            norms[r0:r1] = torch.linalg.vector_norm(Q.float() + self.lora_scale * (B[r0:r1] @ A), dim=1)
        return norms

    def _cached_norms(self) -> Tensor | None:
        if self._norm_cache is None or self._norm_cache[0] != self._adapter_key():
            return None
        norms = self._norm_cache[1]
        if norms.is_inference() and torch.is_grad_enabled():
            return None  # made under inference_mode (validation): autograd cannot save it for backward
        return norms

    def _dora_scale(self) -> Tensor | None:
        """m / ‖Q̂ + sBA‖_row (p,), the norm detached (DoRA §4.3)."""
        if self.magnitude is None:
            return None
        norms = self._cached_norms()
        if norms is None:
            B, A = (t.detach().float() for t in self._factors())
            norms = self._row_norms(B, A)
            self._norm_cache = (self._adapter_key(), norms)
        return self._scale_from(norms)

    def _scale_from(self, norms: Tensor) -> Tensor:
        m = storage.fake_store(self.magnitude, self.config.magnitude_dtype)
        return m / norms.to(m.device).clamp_min(1e-12)

    @torch.no_grad()
    def dequantize(self) -> Tensor:
        """The effective weight W_ft (p, q) in fp32, as the forward uses it."""
        W = self.frozen_weight()
        BA = self.lowrank_product()
        if BA is not None:
            W = W + BA.float()
        scale = self._dora_scale()
        if scale is not None:
            W = W * scale.float()[:, None]
        return W

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with the effective weight (and the bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = lin.to(self._device())
        with torch.no_grad():
            lin.weight.copy_(self.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias.float())
        return lin

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # x (..., q)
        norms = self._cached_norms() if self.magnitude is not None else None
        need_norms = self.magnitude is not None and norms is None
        path = self.kernel_path(x)
        self.last_path = path or ("cache" if self.effective_mode == "cache" else "decode")
        if path is not None:  # fused dequantize-matmul on the packed codes (no gradient to x)
            y = self._kernel_matmul(x, path)
        elif self.effective_mode == "cache":
            y = FrozenMatmul.apply(x, self._dense(x.dtype if x.is_floating_point() else None))  # (..., p)
        else:
            lowrank = None
            if need_norms:
                B, A = (t.detach().float() for t in self._factors())
                lowrank = (B, A)
            y, fresh = ResidentMatmul.apply(x, self, lowrank, *self.stored_params.values())
            if need_norms:
                norms = fresh
                self._norm_cache = (self._adapter_key(), norms)
        if self.rank:
            B, A = self._factors()
            y = y + self.lora_scale * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T)
        if self.magnitude is not None:
            if norms is None:  # cache mode or a kernel: the norms of the fp32 tiles (once, then cached)
                B, A = (t.detach().float() for t in self._factors())
                norms = self._row_norms(B, A)
                self._norm_cache = (self._adapter_key(), norms)
            y = y * self._scale_from(norms).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, quantizer={c.quantizer}, "
                f"bits={c.bits}, rank={self.rank}, dora={self.magnitude is not None}, mode={self.effective_mode}")


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover
            return None
    return None


def make_stored_trainable(model: nn.Module, items: tuple[str, ...] = ("codebook", "scales"), *,
                          shared: bool = True) -> int:
    """Fine-tune stored tensors of every compressed linear while the codes stay frozen (issue: trainable
    codebooks and scales): for `items` ("codebook": VQ codebooks, autoencoder latent codebooks;
    "scales": the block-scale maxima and offset, RTN's min and step), each stored floating tensor becomes
    an fp32 parameter; the forward computes with it cast to its stored dtype, so what trains is exactly what
    is saved and the accounted bits do not change. A tensor shared by several layers (a model-wide codebook)
    becomes one parameter (`shared=False` leaves shared tensors frozen: block-wise tuning must not change the
    blocks already tuned). Returns the number of trainable values added. `write_back_stored` undoes it."""
    from reallm.core.io import tensor_digest

    shared_params: dict[tuple[str, str], nn.Parameter] = {}
    n = 0
    for layer in model.modules():
        if not isinstance(layer, ReALLMLinear):
            continue
        frozen, shared = _read_stored(layer, "frozen__", layer._frozen_specs), _read_stored(layer, "shared__",
                                                                                           layer._shared_specs)
        for key in layer.trainable_stored_keys(items):
            if key in layer.stored_params or (key.startswith("shared__") and not shared):
                continue
            if key.startswith("shared__"):
                value = shared[key[len("shared__"):].replace("__", ".")]
                ident = (key, tensor_digest(value))
                if ident not in shared_params:
                    shared_params[ident] = nn.Parameter(value.detach().float().clone())
                    n += value.numel()
                param = shared_params[ident]
            else:
                value = frozen[key[len("frozen__"):].replace("__", ".")]
                param = nn.Parameter(value.detach().float().clone())
                n += value.numel()
            layer.stored_params[key] = param
        layer.clear_cache()
    return n


STORED_ITEMS = ("codebook", "scales")


def check_stored_items(items) -> tuple[str, ...]:
    """The `train_stored` option of the fine-tuning phases, checked (UserError naming a bad item)."""
    items = tuple(items or ())
    bad = [i for i in items if i not in STORED_ITEMS]
    if bad:
        raise UserError(f"train_stored takes {list(STORED_ITEMS)}, got {bad[0]!r}")
    return items


def write_back_stored(model: nn.Module) -> None:
    """`ReALLMLinear.write_back_stored` for every compressed linear of `model`."""
    for layer in model.modules():
        if isinstance(layer, ReALLMLinear):
            layer.write_back_stored()


def set_runtime_mode(model: nn.Module, mode: RuntimeMode, fast_path: FastPath | None = None) -> dict[str, Any]:
    """Put every ReALLMLinear of `model` in `mode` (and `fast_path` when given); returns `runtime_report`."""
    for m in model.modules():
        if isinstance(m, ReALLMLinear):
            m.set_mode(mode)
            if fast_path is not None:
                m.set_fast_path(fast_path)
    return runtime_report(model)


def runtime_report(model: nn.Module) -> dict[str, Any]:
    """How the compressed layers run: {"mode": requested, "cached": [layers cached automatically]}."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ReALLMLinear)]
    modes = sorted({m.mode for _, m in layers})
    auto = [n for n, m in layers if m.mode == "resident" and m.effective_mode == "cache"]
    paths = sorted({m.last_path for _, m in layers if m.last_path})
    return {"mode": modes[0] if len(modes) == 1 else modes, "auto_cached_layers": auto,
            "auto_cache_macs_per_weight": AUTO_CACHE_MACS_PER_WEIGHT,
            "fast_path": sorted({m.fast_path for _, m in layers}), "last_paths": paths}


def iter_reallm_layers(model: nn.Module) -> Iterator[tuple[str, ReALLMLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ReALLMLinear):
            yield name, mod
