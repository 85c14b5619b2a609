"""Storage precisions of the trainable parts (low-rank factors, DoRA magnitude).

A tensor "stored as" float16 / bfloat16 / int8 is kept in that form on disk; the layer computes with
exactly the stored values (`fake_store`), with a straight-through gradient during training, so a
saved and reloaded model gives the same outputs as the one in memory and the accounted bits are
the bits of what is saved.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _int8_scale(t: Tensor) -> Tensor:
    # one absmax scale per column (per rank vector for a (p, r) factor), stored in fp16
    scale = t.abs().amax(dim=0) / 127.0  # (r,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float16)
    return scale


def encode_stored(t: Tensor, dtype_name: str) -> dict[str, Tensor]:
    """Tensors to save for `t` at the given storage precision ("value", and "scale" for int8)."""
    if dtype_name in FLOAT_DTYPES:
        return {"value": t.detach().to(FLOAT_DTYPES[dtype_name]).contiguous()}
    if dtype_name == "int8":
        if t.dim() != 2:
            raise ValueError("int8 storage expects a 2-D factor (p, r)")
        scale = _int8_scale(t.detach().float())
        codes = torch.round(t.detach().float() / scale.float()).clamp(-127, 127).to(torch.int8)
        return {"value": codes.contiguous(), "scale": scale.contiguous()}
    raise ValueError(f"unknown storage dtype {dtype_name!r}")


def decode_stored(parts: dict[str, Tensor], dtype_name: str) -> Tensor:
    """Inverse of `encode_stored`, in fp32."""
    if dtype_name in FLOAT_DTYPES:
        return parts["value"].float()
    if dtype_name == "int8":
        return parts["value"].float() * parts["scale"].float()
    raise ValueError(f"unknown storage dtype {dtype_name!r}")


def round_to_storage(t: Tensor, dtype_name: str) -> Tensor:
    """`t` rounded to what its storage keeps (no gradient)."""
    if dtype_name == "float32":
        return t.detach().float()
    return decode_stored(encode_stored(t, dtype_name), dtype_name)


def fake_store(t: Tensor, dtype_name: str) -> Tensor:
    """Forward: the stored value of `t`; backward: the gradient copied straight through."""
    if dtype_name == "float32":
        return t
    return t + (round_to_storage(t, dtype_name).to(t.dtype) - t).detach()


def stored_nbits(parts: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() * 8 for v in parts.values())


def storage_bits_of(dtype_name: str) -> int:
    """Bits per element of a storage precision name."""
    return {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8}[dtype_name]
