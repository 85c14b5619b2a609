"""A compressed linear's stored tensors: buffers that no dtype cast touches, and the fine-tuning of some of them.

The frozen part is kept in its stored form (packed codes, fp16 codebooks, scale codes, permutation, ...), as
buffers named `frozen__<key>` (this matrix's) and `shared__<key>` (shared with other layers: a model-wide
codebook, a decoder; the checkpoint stores it once), a "." in a key written "__". Floating tensors are kept
as their raw bytes (uint8, 1-D), so `.to(dtype)`, `.half()`, precision plugins and FSDP mixed precision (which
cast only floating tensors) never change them: only device moves apply.

Trainable stored tensors (codes stay frozen): `make_stored_trainable` turns the stored floating tensors of
some items ("codebook", "scales") into fp32 parameters of `stored_params` (same names as their buffers); the
forward reads them rounded to their stored dtype, so what trains is exactly what is saved and the accounted
bits do not change. `write_back_stored` puts them back into the buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reallm.core.errors import UserError
from reallm.core.io import tensor_digest
from reallm.formats import PIPELINE_TRAINABLE, get_codec
from reallm.weight.config import CompressionConfig

__all__ = ["STORED_ITEMS", "StoredTensors", "buffer_name", "check_stored_items", "make_stored_trainable",
           "read_stored", "register_stored", "write_back_stored"]

StoredSpecs = dict[str, tuple]  # key → (stored dtype, stored shape)


def buffer_name(key: str, prefix: str) -> str:
    """The buffer of stored tensor `key` ("frozen__" or "shared__" prefix, "." written "__")."""
    return prefix + key.replace(".", "__")


def register_stored(module: nn.Module, prefix: str, tensors: dict[str, Tensor]) -> StoredSpecs:
    """Register `tensors` as buffers `<prefix><name>`: integer tensors as they are, floating ones as their
    raw bytes (uint8, 1-D). Returns {name: (dtype, shape)} to read them back with `read_stored`."""
    specs = {}
    for k, t in tensors.items():
        t = t.detach()
        specs[k] = (t.dtype, tuple(t.shape))
        if t.is_floating_point():
            t = t.contiguous().reshape(-1).view(torch.uint8)  # bytes: .to(dtype) / .half() skip them
        module.register_buffer(buffer_name(k, prefix), t)
    return specs


def read_stored(module: nn.Module, prefix: str, specs: StoredSpecs) -> dict[str, Tensor]:
    """The stored tensors in their stored dtype and shape (views of the buffers, no copy)."""
    out = {}
    for k, (dtype, shape) in specs.items():
        t = module._buffers[buffer_name(k, prefix)]
        out[k] = t.view(dtype).view(shape) if t.dtype != dtype else t
    return out


class StoredTensors(nn.Module):
    """Base of `reallm.layer.linear.ReALLMLinear`: its stored tensors as buffers, and the trained ones.

    The subclass calls `init_stored` in its `__init__`, sets `config` and defines `clear_cache()` (called when
    a stored tensor starts or stops being trained).
    """

    config: CompressionConfig
    _frozen_specs: StoredSpecs
    _shared_specs: StoredSpecs
    stored_params: nn.ParameterDict

    def clear_cache(self) -> None:
        raise NotImplementedError

    def init_stored(self, frozen: dict[str, Tensor], shared: dict[str, Tensor]) -> None:
        """Register the frozen part's stored tensors (`frozen__*`), the shared ones (`shared__*`) and an empty
        `stored_params` (stored tensors being fine-tuned, filled by `make_stored_trainable`)."""
        self._frozen_specs = register_stored(self, "frozen__", frozen)
        # shared with other layers (a model-wide codebook, a decoder): the checkpoint stores it once
        self._shared_specs = register_stored(self, "shared__", shared)
        self.stored_params = nn.ParameterDict()

    # -- reading ---------------------------------------------------------------------------------
    def _frozen_tensors(self, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return self._with_trained(read_stored(self, "frozen__", self._frozen_specs), "frozen__", values)

    def _shared_tensors(self, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return self._with_trained(read_stored(self, "shared__", self._shared_specs), "shared__", values)

    def _with_trained(self, tensors: dict[str, Tensor], prefix: str, values: dict[str, Tensor] | None):
        """Stored tensors, those being trained replaced by their parameter (or `values`) rounded to the stored
        dtype: the forward sees exactly what would be saved. The value stays fp32 with a straight-through
        gradient (a gradient taken in fp16 would flush the small ones to zero)."""
        source = values if values is not None else self.stored_params
        for k in tensors:
            key = buffer_name(k, prefix)
            if key in source:
                t = source[key]
                tensors[k] = t + (t.detach().to(tensors[k].dtype).to(t.dtype) - t.detach())
        return tensors

    def stored_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(frozen, shared) stored tensors at their stored dtype, detached (a trained tensor is an fp32
        parameter): what a container or a checkpoint keeps."""
        frozen = {k: v.detach().to(self._frozen_specs[k][0]) for k, v in self._frozen_tensors().items()}
        shared = {k: v.detach().to(self._shared_specs[k][0]) for k, v in self._shared_tensors().items()}
        return frozen, shared

    # -- training stored tensors (codes stay frozen) -----------------------------------------------
    def trainable_stored_keys(self, items: tuple[str, ...] = ("codebook", "scales")) -> list[str]:
        """Buffer names (`frozen__*`, `shared__*`) of the stored floating tensors that fine-tuning may train
        for `items` (the format's `trainable`, plus the pipeline's block-scale maxima)."""
        codec = get_codec(self.config.quantizer)
        wanted = {k for item in items for k in codec.trainable.get(item, ())}
        if codec.blockwise and codec.absmax_scales:
            wanted |= {k for item in items for k in PIPELINE_TRAINABLE.get(item, ())}
        out = []
        for prefix, specs in (("frozen__", self._frozen_specs), ("shared__", self._shared_specs)):
            out += [buffer_name(k, prefix) for k, (dt, _) in specs.items() if k in wanted and dt.is_floating_point]
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


# ---------------------------------------------------------------------------------------------
# over a model
# ---------------------------------------------------------------------------------------------
STORED_ITEMS = ("codebook", "scales")


def check_stored_items(items) -> tuple[str, ...]:
    """The `train_stored` option of the fine-tuning phases, checked (UserError naming a bad item)."""
    items = tuple(items or ())
    bad = [i for i in items if i not in STORED_ITEMS]
    if bad:
        raise UserError(f"train_stored takes {list(STORED_ITEMS)}, got {bad[0]!r}")
    return items


def make_stored_trainable(model: nn.Module, items: tuple[str, ...] = ("codebook", "scales"), *,
                          shared: bool = True) -> int:
    """Fine-tune stored tensors of every compressed linear while the codes stay frozen (issue: trainable
    codebooks and scales): for `items` ("codebook": VQ codebooks, autoencoder latent codebooks;
    "scales": the block-scale maxima and offset, RTN's min and step), each stored floating tensor becomes
    an fp32 parameter; the forward computes with it cast to its stored dtype, so what trains is exactly what
    is saved and the accounted bits do not change. A tensor shared by several layers (a model-wide codebook)
    becomes one parameter (`shared=False` leaves shared tensors frozen: block-wise tuning must not change the
    blocks already tuned). Returns the number of trainable values added. `write_back_stored` undoes it."""
    shared_params: dict[tuple[str, str], nn.Parameter] = {}
    n = 0
    for layer in model.modules():
        if not isinstance(layer, StoredTensors):
            continue
        frozen = read_stored(layer, "frozen__", layer._frozen_specs)
        shared_tensors = read_stored(layer, "shared__", layer._shared_specs)
        for key in layer.trainable_stored_keys(items):
            if key in layer.stored_params or (key.startswith("shared__") and not shared):
                continue
            if key.startswith("shared__"):
                value = shared_tensors[key[len("shared__"):].replace("__", ".")]
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


def write_back_stored(model: nn.Module) -> None:
    """`StoredTensors.write_back_stored` for every compressed linear of `model`."""
    for layer in model.modules():
        if isinstance(layer, StoredTensors):
            layer.write_back_stored()
