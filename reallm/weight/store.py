"""Finished matrices on disk, so that an interrupted phase 1 resumes where it stopped.

A :class:`WeightStore` is a folder of compressed matrices by index: ``<index:05d>.safetensors`` (the
container's tensors, its shared tensors under ``shared.``) and ``<index:05d>.json`` (``{"name", "key",
"container", "stats"}``). Both are written atomically, the tensors first, so a matrix counts as stored
once its JSON file names it; a pair left half-written, or one written for another matrix or another
configuration (``key``), reads as missing and is recomputed. Phase 1 keeps every finished matrix in
``run_dir/partial/`` and the autoencoder phase every evaluated candidate in ``run_dir/partial/cand/<label>/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from reallm.core.io import atomic_save_safetensors, atomic_write_text
from reallm.weight.container import ReALLMWeight

__all__ = ["WeightStore"]


class WeightStore:
    """Compressed matrices with their statistics, by index, in one folder (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        """
        Args:
            directory: the folder (created on the first save).
        """
        self.directory = Path(directory)

    def base(self, index: int) -> Path:
        """The path of matrix `index` without suffix (``.safetensors`` and ``.json`` are added)."""
        return self.directory / f"{index:05d}"

    def save(self, index: int, name: str, weight: ReALLMWeight, stats: dict[str, Any], key: str | None = None) -> None:
        """Store `weight` (with its shared tensors) as matrix `index`.

        Args:
            index: the matrix's position among the phase's matrices.
            name: its layer name (checked on load).
            weight: the container.
            stats: JSON-able facts kept with it (relative error, original dtype, ...).
            key: the configuration it was made with (``CompressionConfig.key()``), checked on load when given.
        """
        base = self.base(index)
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = weight.to_dict()
        tensors.update({f"shared.{k}": v for k, v in weight.shared.items()})
        atomic_save_safetensors(tensors, base.with_suffix(".safetensors"))
        record = {"name": name, "container": meta, "stats": stats} if key is None else \
            {"name": name, "key": key, "container": meta, "stats": stats}
        atomic_write_text(base.with_suffix(".json"), json.dumps(record))

    def _record(self, index: int, name: str, key: str | None) -> dict[str, Any] | None:
        base = self.base(index)
        try:
            record = json.loads(base.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("name") != name or (key is not None and record.get("key") != key):
            return None
        return record if base.with_suffix(".safetensors").is_file() else None

    def has(self, index: int, name: str, key: str | None = None) -> bool:
        """Whether matrix `index` is stored for layer `name` (and configuration `key` when given), without
        reading its tensors."""
        return self._record(index, name, key) is not None

    def load(self, index: int, name: str, key: str | None = None) -> tuple[ReALLMWeight, dict[str, Any]] | None:
        """(container, stats) of matrix `index`, or None when it is missing, half-written, or stored for
        another layer (or another configuration `key`, when given)."""
        record = self._record(index, name, key)
        if record is None:
            return None
        try:
            tensors = load_file(self.base(index).with_suffix(".safetensors"))
        except (OSError, SafetensorError):
            return None  # incomplete leftovers are recomputed
        shared = {k[len("shared."):]: v for k, v in tensors.items() if k.startswith("shared.")}
        return ReALLMWeight.from_dict(tensors, record["container"], shared), record.get("stats", {})
