"""The "auto" runtime mode: keep the decoded weights of a model's compressed linears where they fit.

"cache" mode (a dense copy of Q̂ per layer) is several times faster than "resident" mode (a decode at every
forward) but holds p·q values per layer in the compute dtype. "auto" takes the cache wherever a stated share of
the free memory allows, and stays resident elsewhere:

- one `AutoRuntime` is shared by every ReALLMLinear of a model (`set_runtime_mode(model, "auto")`), so that the
  decision is made once for the whole model;
- it is made lazily, at the first forward of any of its layers since they were last moved or cast: Lightning
  moves a phase's model onto its device after `configure_model`, a user may call `.to("cuda")` after
  `load_compressed`, and a cast changes the compute dtype; only a forward sees the final device and dtype.
  A move or cast of any layer drops the decision, and the next forward makes it again;
- per device the layers are on: free = the device's free memory (`free_memory`) plus the dense copies its layers
  already hold (a new decision reuses or frees them); budget = `memory_fraction` × free;
- dense bytes of a layer: p·q × the element size of the compute dtype (the dtype of the input of the first
  forward; fp32 for a non-floating input);
- in model order, each layer is cached when it still fits what is left of the budget (first fit), after the
  layers whose format is cached in every mode (an expensive decoder, `AUTO_CACHE_MACS_PER_WEIGHT`) have been
  counted; the other layers stay resident. A layer whose stored tensors are being trained never caches (its
  dense copy would be stale after every step) and is not counted.

The decision is recorded (`AutoRuntime.report`, in `runtime_report` and results.json `runtime.auto`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from reallm.core.errors import UserError

__all__ = ["AUTO_MEMORY_FRACTION", "AutoRuntime", "check_memory_fraction", "free_memory", "host_available_memory"]

#: the share of a device's free memory that "auto" lets the dense copies take: the other half is left to
#: activations, the KV cache, a teacher or an optimiser, and to other processes on the machine
AUTO_MEMORY_FRACTION = 0.5

Choice = Literal["cache", "resident"]


def check_memory_fraction(fraction: float) -> float:
    """`fraction` as a float, or a one-line UserError when it is not in (0, 1]."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise UserError(f"runtime_memory_fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def host_available_memory() -> int | None:
    """Bytes of host memory available to a new allocation without swapping: psutil's `available` when psutil
    is installed, else `MemAvailable` of /proc/meminfo (Linux); None when neither is readable. Neither sees a
    container's cgroup limit (lower the share there)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file counts kB
    return None


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: on CUDA the driver's free memory plus what PyTorch's caching allocator has
    reserved and holds unused (it serves new tensors from that first); on the CPU `host_available_memory`;
    None on another device (unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + unused)
    if device.type == "cpu":
        return host_available_memory()
    return None


class AutoRuntime:
    """The shared decision of the "auto" runtime mode for the layers of one model (see the module docstring).

    The layers are ReALLMLinear modules (duck-typed here: `out_features`, `in_features`, `stored_params`,
    `decoder_is_costly`, `effective_mode`, `held_dense_bytes()`, `release_dense()`, `stored_device`), in model order.
    Each layer's choice is kept on the layer (`auto_choice`), so that a deep copy of the model keeps its
    decision consistent.

    Args:
        memory_fraction: the share of each device's free memory that the dense copies may take, in (0, 1].
    """

    def __init__(self, memory_fraction: float = AUTO_MEMORY_FRACTION) -> None:
        self.memory_fraction = check_memory_fraction(memory_fraction)
        self.layers: list[Any] = []
        self.record: dict[str, Any] | None = None  # the decision; None: not decided since the last move or cast

    def add(self, layer: Any) -> None:
        self.layers.append(layer)
        self.reset()

    def remove(self, layer: Any) -> None:
        self.layers = [m for m in self.layers if m is not layer]
        self.reset()

    def reset(self) -> None:
        """Forget the decision (a layer moved or was cast): the next forward decides again."""
        self.record = None

    def choice(self, layer: Any) -> Choice:
        """What the decision gave `layer` ("resident" before any decision: nothing dense is built early)."""
        return "resident" if self.record is None else layer.auto_choice

    def ensure_decided(self, x: torch.Tensor) -> None:
        """Decide now unless decided already; `x` is a layer's input (its dtype is the compute dtype)."""
        if self.record is None:
            self.decide(x.dtype if x.is_floating_point() else torch.float32)

    def decide(self, dtype: torch.dtype) -> dict[str, Any]:
        """Choose "cache" or "resident" for every layer (dense copies in `dtype`), device by device; release the
        dense copies of the layers left resident. Returns the record (`report`)."""
        devices: dict[str, dict[str, Any]] = {}
        for device, group in _by_device(self.layers).items():
            picked, devices[str(device)] = _plan_device(device, group, dtype, self.memory_fraction)
            for layer, choice in zip(group, picked):
                layer.auto_choice = choice
        self.record = _summary(devices, dtype, self.memory_fraction)
        for layer in self.layers:
            if layer.effective_mode != "cache":
                layer.release_dense()
        return self.record

    def report(self) -> dict[str, Any]:
        """The last decision (results.json `runtime.auto`): the chosen mode ("cache", "resident" or "partial"),
        the share, free / budget / dense / cached bytes and layer counts, overall and per device."""
        if self.record is None:
            return {"decided": False, "memory_fraction": self.memory_fraction, "layers": len(self.layers)}
        return self.record


def _by_device(layers: Iterable[Any]) -> dict[torch.device, list[Any]]:
    """The layers grouped by the device of their stored tensors, model order kept within a group."""
    groups: dict[torch.device, list[Any]] = {}
    for layer in layers:
        groups.setdefault(layer.stored_device, []).append(layer)
    return groups


def _plan_device(device: torch.device, layers: list[Any], dtype: torch.dtype,
                 fraction: float) -> tuple[list[Choice], dict[str, Any]]:
    """First fit in model order, for the layers on one device (the module docstring's rule).

    Returns (the choice of each layer, in the order of `layers`; the device's record). Free memory that cannot
    be measured gives no budget (everything stays resident but the layers cached in every mode)."""
    candidates = [i for i, m in enumerate(layers) if not len(m.stored_params)]
    ordered = sorted(candidates, key=lambda i: not layers[i].decoder_is_costly)  # stable: model order in each part
    measured = free_memory(device)
    held = sum(layers[i].held_dense_bytes() for i in candidates)
    budget = 0 if measured is None else int(fraction * (measured + held))
    choices: list[Choice] = ["resident"] * len(layers)
    used = 0
    for i in ordered:
        need = layers[i].out_features * layers[i].in_features * dtype.itemsize
        if layers[i].decoder_is_costly or used + need <= budget:
            choices[i] = "cache"
            used += need
    dense = sum(layers[i].out_features * layers[i].in_features for i in candidates) * dtype.itemsize
    record = {"free_bytes": measured, "held_bytes": held, "budget_bytes": budget, "dense_bytes": dense,
              "cached_bytes": used, "layers": len(layers), "cached_layers": choices.count("cache")}
    return choices, record


def _summary(devices: dict[str, dict[str, Any]], dtype: torch.dtype, fraction: float) -> dict[str, Any]:
    """The model's record: sums over its devices, the chosen mode, and the per-device records."""
    def total(key: str) -> int | None:
        values = [d[key] for d in devices.values()]
        return None if any(v is None for v in values) else sum(values)

    layers, cached = total("layers"), total("cached_layers")
    chosen = "cache" if cached == layers and layers else "resident" if not cached else "partial"
    return {"decided": True, "chosen": chosen, "memory_fraction": fraction,
            "dtype": str(dtype).removeprefix("torch."), "order": "model order, first fit",
            "free_bytes": total("free_bytes"), "held_bytes": total("held_bytes"), "budget_bytes": total("budget_bytes"),
            "dense_bytes": total("dense_bytes"), "cached_bytes": total("cached_bytes"),
            "layers": layers, "cached_layers": cached, "devices": devices}
