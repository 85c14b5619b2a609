"""The frozen matmul y = x Q̂ᵀ as autograd Functions that keep nothing of Q̂ for backward.

The backward returns only the input gradient dL/dx = dL/dy · Q̂ (no gradient and no saved activation for the
frozen weight), as torchao's `LinearNF4` and hqq's `HQQMatmulNoCacheDeq` do:

- :class:`FrozenMatmul`: Q̂ given densely (the "cache" runtime mode's decoded copy);
- :class:`ResidentMatmul`: Q̂ decoded tile by tile from the layer's stored tensors, in forward and again in
  backward (the "resident" mode), with the DoRA row norms from the same tiles, and the weight gradient pulled
  back to stored tensors being trained (codebooks, scales).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from reallm.layer import dora

__all__ = ["FrozenMatmul", "ResidentMatmul", "TiledFrozen"]

Tiles = Iterator[tuple[int, int, Tensor]]  # (r0, r1, Q̂[r0:r1] (r1 − r0, q) fp32)


class TiledFrozen(Protocol):
    """What `ResidentMatmul` reads of its layer (`reallm.layer.linear.ReALLMLinear`)."""

    in_features: int  # q
    out_features: int  # p
    lora_scale: float  # s
    stored_params: nn.ParameterDict  # stored tensors being trained, by buffer name

    def frozen_tiles(self) -> Tiles:
        """The row tiles of Q̂ as the forward uses them."""

    def decoded_tiles(self, values: dict[str, Tensor] | None = None) -> Tiles:
        """The row tiles decoded from the stored tensors, trained ones replaced by `values`."""


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
    def forward(ctx, x: Tensor, layer: TiledFrozen, lowrank: tuple[Tensor, Tensor] | None,
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
                norms[r0:r1] = dora.tile_norms(Q, B[r0:r1], A, layer.lora_scale)
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
                for r0, r1, Q in layer.decoded_tiles(leaves):  # Q depends on the leaves
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
