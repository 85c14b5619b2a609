"""The autoencoder format's matrices through the shared encoding pipeline: what the training recipe
(`reallm.formats.autoencoder.recipe`) starts from, and the containers it ends with.

- :func:`prepare_matrix`: low-rank part + normalisation of one matrix: the AE's target, its loss weights
  (block scale² / mean W², so that the loss *is* the relative squared Frobenius error of W) and the
  stored pre-processing tensors.
- :func:`build_container`: the `ReALLMWeight` of one member matrix of a trained, exported group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.formats.autoencoder.recipe import GroupResult, PreparedMatrix
from reallm.ops.lowrank import lowrank_decompose
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.factors import decode_lowrank, store_lowrank
from reallm.weight.pipeline import normalize_residual

__all__ = ["build_container", "prepare_matrix"]


@torch.no_grad()
def prepare_matrix(W: Tensor, config: CompressionConfig, name: str = "") -> PreparedMatrix:
    """Low-rank part (``svd`` or ``zero``; ``alternating`` runs as ``svd`` since the autoencoder is not
    available inside the iterations) and ``normalize_residual`` of W (p, q), on W's device."""
    W = W.detach().float()
    p, q = W.shape
    r = config.resolve_rank(p, q)
    meta: dict[str, Any] = {"rank": r}
    lowrank: dict[str, Tensor] = {}
    R = W
    if r:
        method = "zero" if config.lowrank_init == "zero" else "svd"
        res = lowrank_decompose(W, r, method, lambda X: (X, None), randomized=config.randomized_svd,
                                seed=config.seed)
        lowrank = store_lowrank(res.L1, res.L2, config.lowrank_dtype)
        L1, L2 = decode_lowrank(lowrank, config.lowrank_dtype)
        R = W - L1 @ L2.T  # the residual against the factors exactly as stored
        if config.lowrank_init == "alternating":
            meta["lowrank_note"] = "alternating runs as svd for the autoencoder"
    blocks, frozen, s_hat = normalize_residual(R, config, name)
    Y = blocks.reshape(-1)[: p * q].view(p, q).clone()  # (p, q) in [-1, 1]
    B = config.block_size
    s = s_hat[:, None].expand(-1, B).reshape(-1)[: p * q].view(p, q)  # (p, q) scale of each entry
    weight = s.square() * (p * q) / W.square().sum().clamp_min(1e-30)
    return PreparedMatrix(name, (p, q), Y, weight, {k: v.contiguous() for k, v in frozen.items()}, lowrank, meta)


def build_container(pm: PreparedMatrix, config: CompressionConfig, result: GroupResult) -> ReALLMWeight:
    """The ReALLMWeight of one member matrix of an exported group."""
    frozen = dict(pm.frozen)
    frozen["latent_codes"] = result.codes[pm.name]
    meta = dict(pm.meta, decoder=result.decoder_meta, shared_numel=result.shared_numel)
    return ReALLMWeight(pm.shape, config, frozen, dict(pm.lowrank), meta, dict(result.shared))
