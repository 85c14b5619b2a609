"""A checkpoint directory of either format: which format it is, what it says about itself, its weights files.

`checkpoint_version` tells format 1 (reallm.json, `reallm.checkpoint.format1`) from format 2 (config.json
with a `reallm` quantization_config, `reallm.checkpoint.format2`); `read_meta` gives either one's metadata,
checked, in one shape; `weight_files` lists a format-2 directory's safetensors files (one, or the shards its
index names). Nothing here builds a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reallm.checkpoint import format1 as f1
from reallm.checkpoint import format2 as fmt
from reallm.core.errors import CheckpointError

__all__ = ["WEIGHTS_FILE", "WEIGHTS_INDEX", "checkpoint_version", "read_meta", "weight_files"]

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def checkpoint_version(directory: str | os.PathLike) -> int:
    """1 (reallm.json) or 2 (config.json with a reallm quantization_config); CheckpointError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a ReALLM checkpoint directory (it does not exist)")
    if (directory / f1.META_FILE).is_file():
        return 1
    config = directory / fmt.CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{directory}: not a ReALLM checkpoint (neither {fmt.CONFIG_FILE} nor {f1.META_FILE})")
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(qc, dict) or qc.get("quant_method") != fmt.QUANT_METHOD:
        raise CheckpointError(f"{config}: not a ReALLM checkpoint (no quantization_config with quant_method "
                              f"{fmt.QUANT_METHOD!r})")
    return 2


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint says about itself, checked (version, seal): {"format_version", "base_model",
    "layers": {name: record}, "adapter_sets", "extra", "dtype", ...}, for either format."""
    directory = Path(directory)
    if checkpoint_version(directory) == 1:
        return f1.read_meta(directory)
    config = fmt.read_config_file(directory / fmt.CONFIG_FILE)
    qc = config["quantization_config"]
    return {"format": f1.FORMAT_NAME, **qc, "model_class": (config.get("architectures") or [None])[0]}


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a format-2 checkpoint (one, or every shard its index names)."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (a shard listed in {WEIGHTS_INDEX})")
        return files
    if not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: missing")
    return [directory / WEIGHTS_FILE]
