"""ReALLMLinear: a frozen compressed weight plus a trainable low-rank (LoRA / DoRA) part (method.md §5).

    W_ft = m ⊙ (Q̂ + s·B A) / ‖Q̂ + s·B A‖_row        (norm detached, DoRA §4.3; m = 1, no norm without DoRA)

This module is the layer itself: its construction, its runtime modes and caches, and the forward that picks
a path for x Q̂ᵀ and adds the low-rank part. The rest lives beside it, one job per module:

- `reallm.layer.stored`: the stored tensors as buffers no dtype cast touches, and trainable stored tensors;
- `reallm.layer.matmul`: the frozen matmul's autograd Functions (only the input gradient is returned);
- `reallm.layer.dora`: the DoRA magnitude/direction math (init, forward scale, merge);
- `reallm.layer.kernels`: fused dequantize-matmul kernels for small token counts without a gradient.

The frozen part is kept in its stored form (packed codes, fp16 codebooks, scale codes, permutation,
...): that is all a layer holds in memory, in the dtypes it was stored with. How Q̂ is computed is the
layer's runtime mode:

- ``"resident"`` (default): every forward decodes Q̂ in row tiles, multiplies, and frees each tile; the
  backward decodes again instead of saving it (the frozen matmul returns only the input gradient), and
  the DoRA row norms come from the same tiles. A format whose decoder costs more than
  ``AUTO_CACHE_MACS_PER_WEIGHT`` per weight (a large patch-autoencoder decoder) is cached instead,
  automatically (`effective_mode` says which; `runtime_report` lists them).
- ``"cache"``: Q̂ decoded once and kept densely in the compute dtype (fast when memory allows).
- ``"auto"``: "cache" for the layers whose dense copies fit a share of the free memory of their device, "resident"
  for the others; decided once for the whole model at its first forward after a move or cast
  (`reallm.layer.auto_runtime`, which says what is measured and in which order layers are cached).

In both modes the row norms ‖Q̂ + sBA‖ are cached while the adapters do not change (evaluation,
generation, gradient accumulation). B (p, r), A (r, q) and m (p,) are parameters, computed with exactly
their stored precision (`reallm.ops.precision`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from reallm.core.errors import UserError
from reallm.formats import get_codec
from reallm.layer import dora
from reallm.layer.auto_runtime import AUTO_MEMORY_FRACTION, AutoRuntime, check_memory_fraction, free_memory
from reallm.layer.kernels import available_paths, frozen_matmul, prepare
from reallm.layer.matmul import FrozenMatmul, ResidentMatmul
from reallm.layer.stored import StoredTensors
from reallm.ops import precision as storage
from reallm.weight.container import ReALLMWeight
from reallm.weight.decode import decode_frozen
from reallm.weight.tiling import decode_frozen_rows, row_tiles, tile_plan

__all__ = ["AUTO_CACHE_MACS_PER_WEIGHT", "AUTO_MEMORY_FRACTION", "RUNTIME_MODES", "FastPath", "ReALLMLinear",
           "RuntimeMode", "check_runtime_mode", "iter_reallm_layers", "runtime_report", "set_runtime_mode"]

RuntimeMode = Literal["resident", "cache", "auto"]
RUNTIME_MODES = ("resident", "cache", "auto")
FastPath = Literal["auto", "off"]
# in "cache" mode the dense cached weight serves small matrices faster than a kernel call (tens of µs of
# overhead per call); from this many weights on, reading the packed codes wins (memory-bound matvec)
KERNEL_MIN_WEIGHTS_WITH_CACHE = 1 << 20
# a format whose decode costs more multiply-adds per weight than a matmul of this many tokens is cached
# in "resident" mode (decoding it at every step would cost more than the step's matmuls)
AUTO_CACHE_MACS_PER_WEIGHT = 64.0
TILE_ELEMS = 1 << 22  # values per decoded row tile (16 MiB in fp32)


class ReALLMLinear(StoredTensors):
    """Drop-in replacement for nn.Linear whose weight is a ReALLM container.

    Buffers hold every stored tensor of the frozen part (names `frozen__*`, `shared__*`, floating ones as
    raw bytes: `reallm.layer.stored`) and the original bias; parameters are `lora_A` (r, q), `lora_B` (p, r)
    and, with DoRA, `magnitude` (p,); `stored_params` holds stored tensors being fine-tuned.

    Args:
        weight: the compressed weight.
        bias: the original bias (kept frozen, at its stored dtype), or None.
        mode: "resident", "cache" or "auto" (see the module docstring; a layer put in "auto" here decides
            alone: `set_runtime_mode(model, "auto")` makes one decision for all the layers of a model).
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
        self.init_stored(weight.frozen, weight.shared)  # buffers frozen__* / shared__*, and stored_params
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cache: Tensor | None = None  # dense Q̂ (p, q) in the compute dtype ("cache" mode)
        self._norm_cache: tuple[Any, Tensor] | None = None  # (adapter versions, row norms (p,))
        self._exact_factors: tuple | None = None  # adapter versions whose factors hold stored values exactly
        self._kernel_prep = None  # what the fused kernels keep (reallm.layer.kernels.prepare), built on first use
        self.fast_path: FastPath = "auto"  # "off": always the plain decode / dense path
        self.last_path: str | None = None  # the path of the last forward ("triton", "cpu", ..., "decode", "cache")
        self.mode: RuntimeMode = "resident"
        self._auto: AutoRuntime | None = None  # the shared decision of "auto" mode (reallm.layer.auto_runtime)
        self.auto_choice: Literal["resident", "cache"] = "resident"  # this layer's part of it, once decided
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
            self.magnitude = nn.Parameter(dora.init_magnitude(magnitude, self.config.magnitude_dtype))
        else:
            self.register_parameter("magnitude", None)

    # -- runtime mode ---------------------------------------------------------------------------
    def set_mode(self, mode: RuntimeMode, auto: AutoRuntime | None = None) -> None:
        """Switch between "resident", "cache" and "auto" (the dense cache is dropped, or built lazily).

        `auto`: the decision this layer joins in "auto" mode (shared by the layers of a model); None gives the
        layer a decision of its own, with the default share of free memory."""
        check_runtime_mode(mode, f"layer {self.name or '?'}: ")
        if self._auto is not None:
            self._auto.remove(self)
            self._auto = None
        self.mode = mode
        self._cache = None
        if mode == "auto":
            self._auto = auto if auto is not None else AutoRuntime()
            self._auto.add(self)

    @property
    def decode_macs_per_weight(self) -> float:
        """Multiply-adds the format's decoder spends per weight (a patch-autoencoder decoder: many)."""
        return get_codec(self.config.quantizer).decode_macs_per_weight(self.meta, self.config)

    @property
    def decoder_is_costly(self) -> bool:
        """Whether the format's decoder costs more than AUTO_CACHE_MACS_PER_WEIGHT per weight (then the
        layer is cached in every mode, unless its stored tensors are being trained)."""
        return self.decode_macs_per_weight > AUTO_CACHE_MACS_PER_WEIGHT

    @property
    def effective_mode(self) -> Literal["resident", "cache"]:
        """The mode the layer runs in: its `mode` ("auto": what the model's decision gave it, "resident" until
        the first forward decides), except that a format whose decoder costs more than
        AUTO_CACHE_MACS_PER_WEIGHT per weight is cached instead of resident."""
        if len(self.stored_params):
            return "resident"  # a dense copy would be stale after every step of the trained stored tensors
        mode = self._auto.choice(self) if self.mode == "auto" else self.mode
        if mode == "resident" and self.decoder_is_costly:
            return "cache"
        return mode

    @property
    def stored_device(self) -> torch.device:
        """The device of the stored tensors (where the layer computes)."""
        return self._device()

    def held_dense_bytes(self) -> int:
        """Bytes of the dense copy the layer holds now (0 when none)."""
        return 0 if self._cache is None else self._cache.numel() * self._cache.element_size()

    def release_dense(self) -> None:
        """Drop the dense copy (an "auto" decision left the layer resident)."""
        self._cache = None

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): caches are rebuilt lazily
        self.clear_cache()
        if self._auto is not None:  # the device or dtype may have changed: the model decides again
            self._auto.reset()
        return super()._apply(fn, recurse)

    def clear_cache(self) -> None:
        self._cache = None
        self._norm_cache = None
        self._exact_factors = None
        self._kernel_prep = None

    # -- kernel dispatch ------------------------------------------------------------------------
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

        n_tokens = x.numel() // max(1, self.in_features)
        path = available_paths(self.config, x.device, x.dtype, n_tokens, (self.out_features, self.in_features))[0]
        return None if path == "decode" else path

    def _kernel_matmul(self, x: Tensor, path: str) -> Tensor:

        stored, shared = self._frozen_tensors(), self._shared_tensors()
        shape = (self.out_features, self.in_features)
        if self._kernel_prep is None:
            self._kernel_prep = prepare(stored, self.config, shape, shared)
        return frozen_matmul(x, stored, self.config, shape, shared, path=path, prepared=self._kernel_prep)

    # -- containers and adapters ----------------------------------------------------------------
    def container(self) -> ReALLMWeight:
        """The layer's current state as a ReALLMWeight (frozen part + current low-rank)."""
        lowrank = {}
        if self.rank:
            dt = self.config.lowrank_dtype
            lowrank.update({f"L1.{k}": v for k, v in storage.encode_stored(self.lora_B, dt).items()})
            lowrank.update({f"L2.{k}": v for k, v in storage.encode_stored(self.lora_A.T, dt).items()})
        frozen, shared = self.stored_state()  # at their stored dtype (a trained tensor is an fp32 parameter)
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
        yield from self.decoded_tiles()

    def decoded_tiles(self, values: dict[str, Tensor] | None = None):
        """(r0, r1, Q̂[r0:r1] fp32) decoded from the stored tensors, those being trained replaced by `values`
        (by buffer name; default: their parameters), in tiles of about TILE_ELEMS values."""
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
                for r0, r1, tile in self.decoded_tiles():
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

    # -- the low-rank part and its DoRA scale (the math: reallm.layer.dora) -----------------------
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

    def _row_norms(self, B: Tensor, A: Tensor) -> Tensor:
        """‖Q̂ + s·B A‖ per row (p,), fp32, from the frozen tiles (no whole (p, q) copy is made)."""
        return dora.row_norms(self.frozen_tiles(), B, A, self.lora_scale, self.out_features)

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
        return dora.scale(self.magnitude, norms, self.config.magnitude_dtype)

    @torch.no_grad()
    def dequantize(self) -> Tensor:
        """The effective weight W_ft (p, q) in fp32, as the forward uses it."""
        W = self.frozen_weight()
        BA = self.lowrank_product()
        if BA is not None:
            W = W + BA.float()
        scale = self._dora_scale()
        if scale is not None:
            W = dora.merge(W, scale)
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
        if self._auto is not None:
            self._auto.ensure_decided(x)  # once per model and placement, for all of its layers
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
            y = y + self.lora_scale * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T)  # (..., p)
        if self.magnitude is not None:
            if norms is None:  # cache mode or a kernel: the norms of the fp32 tiles (once, then cached)
                B, A = (t.detach().float() for t in self._factors())
                norms = self._row_norms(B, A)
                self._norm_cache = (self._adapter_key(), norms)
            y = dora.apply(y, self._scale_from(norms))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, quantizer={c.quantizer}, "
                f"bits={c.bits}, rank={self.rank}, dora={self.magnitude is not None}, mode={self.effective_mode}")


_free_memory = free_memory  # what "cache" mode checks before building a dense copy (tests replace it)


def check_runtime_mode(mode: str, where: str = "") -> None:
    """A one-line UserError for an unknown runtime mode (`where` prefixes it, e.g. the layer's name)."""
    if mode not in RUNTIME_MODES:
        raise UserError(f"{where}runtime mode must be one of {RUNTIME_MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# over a model
# ---------------------------------------------------------------------------------------------
def set_runtime_mode(model: nn.Module, mode: RuntimeMode, fast_path: FastPath | None = None,
                     memory_fraction: float = AUTO_MEMORY_FRACTION) -> dict[str, Any]:
    """Put every ReALLMLinear of `model` in `mode` (and `fast_path` when given); returns `runtime_report`.

    In "auto" mode all the layers share one decision, made at the model's first forward on its final device,
    with `memory_fraction` of the free memory (`reallm.layer.auto_runtime`); the other modes ignore it."""
    check_runtime_mode(mode)
    auto = AutoRuntime(memory_fraction) if mode == "auto" else None
    if auto is None:
        check_memory_fraction(memory_fraction)
    for m in model.modules():
        if isinstance(m, ReALLMLinear):
            m.set_mode(mode, auto)
            if fast_path is not None:
                m.set_fast_path(fast_path)
    return runtime_report(model)


def runtime_report(model: nn.Module) -> dict[str, Any]:
    """How the compressed layers run (results.json `runtime`): the requested mode; the layers cached in every mode
    for their costly decoder (`auto_cached_layers`); the fast-path settings and the paths of the last forwards;
    in "auto" mode the decision (`auto`: `AutoRuntime.report`, a list when layers follow several decisions)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ReALLMLinear)]
    modes = sorted({m.mode for _, m in layers})
    costly = [n for n, m in layers if m.mode != "cache" and m.effective_mode == "cache" and m.decoder_is_costly]
    paths = sorted({m.last_path for _, m in layers if m.last_path})
    report = {"mode": modes[0] if len(modes) == 1 else modes, "auto_cached_layers": costly,
              "auto_cache_macs_per_weight": AUTO_CACHE_MACS_PER_WEIGHT,
              "fast_path": sorted({m.fast_path for _, m in layers}), "last_paths": paths}
    decisions = list({id(m._auto): m._auto for _, m in layers if m._auto is not None}.values())
    if decisions:
        report["auto"] = decisions[0].report() if len(decisions) == 1 else [d.report() for d in decisions]
    return report


def iter_reallm_layers(model: nn.Module) -> Iterator[tuple[str, ReALLMLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ReALLMLinear):
            yield name, mod
