"""The one learning-rate schedule of the project: linear warm-up, then cosine decay (to a floor)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["adam_with_cosine", "cosine_warmup"]


def cosine_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LambdaLR factor of optimiser step `step` (0-based): a linear warm-up (step + 1) / (W + 1) over
    the first W = min(warmup_steps, total_steps − 1) steps, then a cosine from 1 at step W down to
    `min_ratio` at `total_steps` (and `min_ratio` after it)."""
    total = max(1, total_steps)
    warm = max(0, min(warmup_steps, total - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = min(1.0, (step - warm) / max(1, total - warm))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def adam_with_cosine(params: Iterable[Tensor], lr: float, total_steps: int, warmup: float):
    """Adam + LambdaLR(cosine_warmup) stepped once per optimiser step; `warmup` is a fraction of the steps."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_warmup(total_steps, int(round(warmup * total_steps))))
    return opt, sched
