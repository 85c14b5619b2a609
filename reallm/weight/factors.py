"""The stored form of one matrix's low-rank factors L1 (p, r) and L2 (q, r), and back.

    store_lowrank(L1, L2, dtype) → {"L1.value": ..., "L2.value": ..., (int8: "L1.scale", "L2.scale")}
    decode_lowrank(stored, dtype) → (L1 (p, r), L2 (q, r)) fp32, exactly the stored values

The precision of each stored tensor is `reallm.ops.precision`'s (`CompressionConfig.lowrank_dtype`). Computing
the factors (SVD, alternating with the frozen part) is `reallm.ops.lowrank`; this module only keeps them.
"""

from __future__ import annotations

from torch import Tensor

from reallm.ops import precision as storage

__all__ = ["decode_lowrank", "store_lowrank"]


def _sub(d: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in d.items() if k.startswith(prefix + ".")}


def store_lowrank(L1: Tensor, L2: Tensor, dtype_name: str) -> dict[str, Tensor]:
    """The stored form of the factors L1 (p, r), L2 (q, r) ("L1.value", "L2.value", int8 scales)."""
    out = {f"L1.{k}": v for k, v in storage.encode_stored(L1, dtype_name).items()}
    out.update({f"L2.{k}": v for k, v in storage.encode_stored(L2, dtype_name).items()})
    return out


def decode_lowrank(lowrank: dict[str, Tensor], dtype_name: str) -> tuple[Tensor, Tensor]:
    """Inverse of `store_lowrank`: (L1 (p, r), L2 (q, r)) in fp32, exactly the stored values."""
    return (storage.decode_stored(_sub(lowrank, "L1"), dtype_name),
            storage.decode_stored(_sub(lowrank, "L2"), dtype_name))
