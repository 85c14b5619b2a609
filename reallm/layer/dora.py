"""The DoRA variant of the low-rank part: its magnitude/direction math, apart from the layer (method.md §5).

    W_ft = m ⊙ (Q̂ + s·B A) / ‖Q̂ + s·B A‖_row        (norm detached, DoRA §4.3)

as peft keeps its DoRA variant beside the LoRA layer (init, forward, merge). `ReALLMLinear`
(`reallm.layer.linear`) owns the tensors and the caches; these functions only compute:

- init: :func:`row_norms` of the initial weight give m (:func:`init_magnitude`), so the initial output is
  exactly x (Q̂ + s·B A)ᵀ;
- forward: y = (x Q̂ᵀ + s·(x Aᵀ) Bᵀ) ⊙ :func:`scale` (:func:`apply`), the norms detached;
- merge: W_ft = (Q̂ + s·B A) ⊙ scale[:, None] (:func:`merge`).

Shapes: Q̂ (p, q) (or a row tile (rows, q)), B (p, r), A (r, q), m (p,), norms (p,).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from reallm.ops import precision as storage

__all__ = ["apply", "init_magnitude", "merge", "row_norms", "scale", "tile_norms"]


def tile_norms(Q: Tensor, B: Tensor, A: Tensor, lora_scale: float) -> Tensor:
    """‖Q + s·B A‖ per row of one row tile: Q (rows, q) fp32, B (rows, r) the tile's rows of B, A (r, q) → (rows,)."""
    return torch.linalg.vector_norm(Q + lora_scale * (B @ A), dim=1)


@torch.no_grad()
def row_norms(tiles: Iterable[tuple[int, int, Tensor]], B: Tensor, A: Tensor, lora_scale: float,
              out_features: int) -> Tensor:
    """‖Q̂ + s·B A‖ per row (p,), fp32, from the frozen part's row tiles (r0, r1, Q̂[r0:r1]): no whole (p, q)
    copy is made. B (p, r) and A (r, q) detached fp32 factors."""
    norms = torch.empty(out_features, dtype=torch.float32, device=B.device)
    for r0, r1, Q in tiles:
        norms[r0:r1] = tile_norms(Q.float(), B[r0:r1], A, lora_scale)
    return norms


def init_magnitude(magnitude: Tensor, magnitude_dtype: str) -> Tensor:
    """m (p,) as the layer keeps it: the stored magnitude, or the initial row norms, rounded to its storage
    precision (`reallm.ops.precision`)."""
    return storage.round_to_storage(magnitude, magnitude_dtype)


def scale(magnitude: Tensor, norms: Tensor, magnitude_dtype: str) -> Tensor:
    """m / ‖Q̂ + s·B A‖_row (p,), m at its storage precision (straight-through), the norms detached."""
    m = storage.fake_store(magnitude, magnitude_dtype)
    return m / norms.to(m.device).clamp_min(1e-12)


def apply(y: Tensor, dora_scale: Tensor) -> Tensor:
    """The forward's last step: y (..., p) = x (Q̂ + s·B A)ᵀ scaled per output row."""
    return y * dora_scale.to(y.dtype)


def merge(W: Tensor, dora_scale: Tensor) -> Tensor:
    """The merged weight W_ft (p, q) from W = Q̂ + s·B A (p, q) fp32."""
    return W * dora_scale.float()[:, None]
