"""ReALLMLinear: a frozen compressed weight plus a trainable DoRA part (method.md §5).

    W_ft = m ⊙ (Q̂ + s·B A) / ‖Q̂ + s·B A‖_row        (norm detached, DoRA §4.3)

Q̂ is decoded from the container's buffers once and cached while frozen; the matmul against it
keeps no gradient or activation for Q̂ (`FrozenMatmul` returns only the input gradient).
B (p, r) and A (r, q) start from L1 and L2ᵀ, m from the row norms of Q̂ + L1 L2ᵀ, so the initial
output is x (Q̂ + L1 L2ᵀ)ᵀ. B, A and m are computed with exactly their stored precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reallm import storage
from reallm.container import ReALLMWeight, decode_frozen


class FrozenMatmul(torch.autograd.Function):
    """y = x Wᵀ for a frozen W: backward returns only dL/dx = dL/dy · W (no grad for W)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # x (..., q), weight (p, q)
        ctx.save_for_backward(weight)  # a reference to the cached buffer: no extra memory
        return x @ weight.to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out (..., p)
        (weight,) = ctx.saved_tensors
        return grad_out @ weight.to(grad_out.dtype), None


def _buffer_name(key: str, prefix: str = "frozen__") -> str:
    return prefix + key.replace(".", "__")


def _buffers_with(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):].replace("__", "."): v for k, v in module._buffers.items()
            if k.startswith(prefix) and v is not None}


class ReALLMLinear(nn.Module):
    """Drop-in replacement for nn.Linear whose weight is a ReALLM container.

    Buffers hold every frozen tensor of the container (names `frozen__*`, `shared__*`);
    parameters are `lora_A` (r, q), `lora_B` (p, r) and, with DoRA, `magnitude` (p,).

    Args:
        weight: the compressed weight.
        bias: the original bias (kept frozen, at its dtype), or None.
        cache_frozen: keep the decoded Q̂ in memory while frozen (one decode per layer); False
            decodes it at every forward (memory-bound use).
        lora_scale: s in the formula above (1 keeps the decomposition's product).
        cache_dtype: dtype of the cached Q̂ (None: float32); bfloat16 halves memory on GPUs.
    """

    def __init__(
        self,
        weight: ReALLMWeight,
        bias: Tensor | None = None,
        *,
        cache_frozen: bool = True,
        lora_scale: float = 1.0,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.config = weight.config
        self.meta = dict(weight.meta)
        self.shared_keys = sorted(weight.shared)
        self.cache_frozen = cache_frozen
        self.cache_dtype = cache_dtype
        self.lora_scale = lora_scale
        self.layout = "linear"  # "conv1d" for GPT-2 style layers (set by surgery)
        self.stats: dict = {}  # filled by surgery: rel_frobenius_error, original dtype, ...
        for k, t in weight.frozen.items():
            self.register_buffer(_buffer_name(k), t)
        for k, t in weight.shared.items():
            # shared with other layers: the checkpoint stores it once, under meta["shared_key"]
            self.register_buffer(_buffer_name(k, "shared__"), t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cache: Tensor | None = None

        L1, L2 = weight.lowrank_factors()  # (p, r), (q, r), exactly the stored values
        self.rank = L1.shape[1]
        if self.rank:
            self.lora_B = nn.Parameter(L1.clone())
            self.lora_A = nn.Parameter(L2.T.contiguous().clone())
        else:
            self.register_parameter("lora_B", None)
            self.register_parameter("lora_A", None)
        if self.config.dora and self.rank:
            with torch.no_grad():
                norm = self._row_norm(self._frozen_weight(), self._lowrank_product())
            self.magnitude = nn.Parameter(storage.round_to_storage(norm, self.config.magnitude_dtype))
        else:
            self.register_parameter("magnitude", None)

    # -- container view -------------------------------------------------------------------
    def container(self) -> ReALLMWeight:
        """The layer's current state as a ReALLMWeight (frozen part + current low-rank)."""
        frozen, shared = self._frozen_tensors(), self._shared_tensors()
        lowrank = {}
        if self.rank:
            dt = self.config.lowrank_dtype
            lowrank.update({f"L1.{k}": v for k, v in storage.encode_stored(self.lora_B, dt).items()})
            lowrank.update({f"L2.{k}": v for k, v in storage.encode_stored(self.lora_A.T, dt).items()})
        return ReALLMWeight((self.out_features, self.in_features), self.config, frozen, lowrank,
                            dict(self.meta), shared)

    def _frozen_tensors(self) -> dict[str, Tensor]:
        return _buffers_with(self, "frozen__")

    def _shared_tensors(self) -> dict[str, Tensor]:
        return _buffers_with(self, "shared__")

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

    # -- weights ----------------------------------------------------------------------------
    def _frozen_weight(self) -> Tensor:
        """Q̂ (p, q), decoded once and cached while `cache_frozen` is on."""
        if self._cache is not None:
            return self._cache
        with torch.no_grad():
            Q = decode_frozen(self._frozen_tensors(), self.meta, self.config,
                              (self.out_features, self.in_features), shared=self._shared_tensors())
            if self.cache_dtype is not None:
                Q = Q.to(self.cache_dtype)
        if self.cache_frozen:
            self._cache = Q
        return Q

    def clear_cache(self) -> None:
        self._cache = None

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): the cache is rebuilt lazily
        self._cache = None
        return super()._apply(fn, recurse)

    def _factors(self) -> tuple[Tensor, Tensor]:
        dt = self.config.lowrank_dtype
        return storage.fake_store(self.lora_B, dt), storage.fake_store(self.lora_A.T, dt).T

    def _lowrank_product(self) -> Tensor | None:
        if not self.rank:
            return None
        B, A = self._factors()
        return self.lora_scale * (B @ A)  # (p, q)

    @staticmethod
    def _row_norm(Q: Tensor, BA: Tensor | None, chunk: int = 4096) -> Tensor:
        """‖Q + BA‖ per row (p,), in row chunks so no second (p, q) copy is kept at once."""
        out = []
        for i in range(0, Q.shape[0], chunk):
            rows = Q[i:i + chunk].float()
            if BA is not None:
                rows = rows + BA[i:i + chunk].float()
            out.append(torch.linalg.vector_norm(rows, dim=1))
        return torch.cat(out)

    def _dora_scale(self) -> Tensor | None:
        """m / ‖Q̂ + sBA‖_row (p,), the norm detached (DoRA §4.3)."""
        if self.magnitude is None:
            return None
        with torch.no_grad():
            B, A = (t.detach() for t in self._factors())
            norm = self._row_norm(self._frozen_weight(), self.lora_scale * (B @ A))
        m = storage.fake_store(self.magnitude, self.config.magnitude_dtype)
        return m / norm.clamp_min(1e-12)

    @torch.no_grad()
    def dequantize(self) -> Tensor:
        """The effective weight W_ft (p, q) in fp32, as the forward uses it."""
        W = self._frozen_weight().float()
        BA = self._lowrank_product()
        if BA is not None:
            W = W + BA.float()
        scale = self._dora_scale()
        if scale is not None:
            W = W * scale.float()[:, None]
        return W

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with the effective weight (and the bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dev = self.lora_A.device if self.rank else next(iter(self._buffers.values())).device
        lin = lin.to(dev)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias.float())
        return lin

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # x (..., q)
        Q = self._frozen_weight()
        y = FrozenMatmul.apply(x, Q)  # (..., p)
        if self.rank:
            B, A = self._factors()
            y = y + self.lora_scale * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T)
        scale = self._dora_scale()
        if scale is not None:
            y = y * scale.to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, quantizer={c.quantizer}, "
                f"bits={c.bits}, rank={self.rank}, dora={self.magnitude is not None}")
