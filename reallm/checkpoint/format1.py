"""The checkpoint format, version 1: reading the directories this project wrote before format 2 (issue 16).

    reallm.json            format version, base model, per-layer configs / metadata / bits,
                           SHA-256 of every tensor file and of the other files (config, tokenizer),
                           adapter sets, and the SHA-256 of its own content (`meta_sha256`)
    reallm.safetensors     the frozen parts ("<layer>.frozen.<name>"), tensors shared by several
                           layers once ("shared.<sha>"), and every non-compressed parameter of the
                           model ("dense.<name>": embeddings, norms, head, biases)
    adapters.safetensors   the trainable parts of the default adapter set
    adapters/<name>.safetensors   further adapter sets over the same frozen base
    config.json (+ tokenizer files)   the base model's Hugging Face config

No new format-1 checkpoint is written: `load_model` rebuilds the model (which `save_compressed` then writes
as format 2); the only writes are a further adapter set (`save_adapters`) and the re-seal of a reallm.json
edited on purpose (`write_meta`). Nothing is pickled. Every byte that decides what the model computes is
covered by a digest (the SHA-256 of every file, in reallm.json, itself sealed), so a corrupted or truncated
file is refused with a CheckpointError, never loaded as a different model (tests/test_hardening.py).
A layer's record and tensors are rebuilt by format 2's `build_layer` (the records are the same).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from reallm.checkpoint import format2 as fmt
from reallm.core.errors import CheckpointError
from reallm.core.hf_models import set_module
from reallm.core.io import atomic_save_safetensors, atomic_write_text, sha256_file
from reallm.layer.linear import ReALLMLinear, RuntimeMode, iter_reallm_layers

__all__ = [
    "ADAPTER_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FROZEN_FILE",
    "META_FILE",
    "adapters_fingerprint",
    "frozen_digests",
    "load_layer",
    "load_model",
    "meta_digest",
    "read_adapters",
    "read_meta",
    "save_adapters",
    "verify_aux_files",
    "write_meta",
]

FORMAT_NAME = "reallm"  # reallm.json's "format" field (read_meta gives it for either format)
FORMAT_VERSION = 1
FROZEN_FILE = "reallm.safetensors"
ADAPTER_FILE = "adapters.safetensors"
META_FILE = "reallm.json"


# ---------------------------------------------------------------------------------------------
# reallm.json
# ---------------------------------------------------------------------------------------------
def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of reallm.json's content without its own `meta_sha256` field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write reallm.json atomically, sealed with the SHA-256 of its content (`meta_sha256`).
    Use it to re-seal a reallm.json edited on purpose (read_meta refuses edited ones)."""
    meta = {**meta, "meta_sha256": meta_digest(meta)}
    path = Path(directory) / META_FILE
    atomic_write_text(path, json.dumps(meta, indent=1, sort_keys=True))
    return path


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """reallm.json of a format-1 directory, checked: valid JSON, format and version, its seal, its fields."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a format-1 checkpoint)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a ReALLM checkpoint (format field is missing or wrong)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported by this reallm (a reallm.json is version 1)")
    sealed = meta.get("meta_sha256")
    if sealed is not None and sealed != meta_digest(meta):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or was edited; after an "
                              f"edit on purpose, re-seal it with reallm.checkpoint.format1.write_meta)")
    for key, kind in (("layers", dict), ("files", dict), ("adapter_sets", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} is missing or malformed")
    return meta


# ---------------------------------------------------------------------------------------------
# files and their digests
# ---------------------------------------------------------------------------------------------
def verify_aux_files(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Check the checksums of the non-tensor files recorded in reallm.json (config, tokenizer)."""
    directory = Path(directory)
    for name, expected in (meta.get("aux_files") or {}).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or truncated)")


def _frozen_path(directory: Path, meta: dict[str, Any]) -> Path:
    """Where the frozen part lives (its own file, or the one it references)."""
    ref = meta.get("frozen_ref")
    return (directory / ref).resolve() if ref else directory / FROZEN_FILE


def _load_verified(directory: Path, rel: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = _frozen_path(directory, meta) if rel == FROZEN_FILE else directory / rel
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    expected = meta.get("files", {}).get(rel)
    if expected is None:
        raise CheckpointError(f"{path}: no checksum recorded in {META_FILE}")
    if sha256_file(path) != expected:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or truncated)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _need(tensors: dict[str, torch.Tensor], key: str, file: Path) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{file}: missing tensor {key!r}")
    return tensors[key]


def frozen_digests(directory: str | os.PathLike, meta: dict[str, Any]) -> dict[str, str]:
    """Layer → content digest of its frozen tensors and bias (format 2's digest, computed from the files)."""
    directory = Path(directory)
    frozen = _load_verified(directory, FROZEN_FILE, meta)
    out = {}
    for name, rec in meta["layers"].items():
        keys = [*rec.get("frozen_keys", []), *(["bias"] if rec.get("bias") else [])]
        out[name] = fmt.content_digest({k: _need(frozen, f"{name}.{k}", _frozen_path(directory, meta)) for k in keys})
    return out


# ---------------------------------------------------------------------------------------------
# adapter sets
# ---------------------------------------------------------------------------------------------
def read_adapters(directory: str | os.PathLike, meta: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of adapter set `name` (one that reallm.json lists), checked against their SHA-256."""
    return _load_verified(Path(directory), meta["adapter_sets"][name], meta)


def adapters_fingerprint(meta: dict[str, Any], name: str) -> str | None:
    """The SHA-256 of adapter set `name`'s file (None: no such set)."""
    entry = meta.get("adapter_sets", {}).get(name)
    return meta["files"].get(entry) if entry else None


def save_adapters(directory: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Add (or replace) adapter set `name` (stored tensors, "<layer>.lora_A.value", ...) and re-seal
    reallm.json with its SHA-256."""
    directory = Path(directory)
    meta = read_meta(directory)
    rel = ADAPTER_FILE if name == "default" else f"adapters/{name}.safetensors"
    (directory / rel).parent.mkdir(exist_ok=True)
    atomic_save_safetensors(tensors, directory / rel)
    meta["files"][rel] = sha256_file(directory / rel)
    meta["adapter_sets"][name] = rel
    write_meta(directory, meta)
    return directory / rel


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load_layer(directory: str | os.PathLike, meta: dict[str, Any], name: str, adapters: str) -> ReALLMLinear:
    """One compressed layer (one that reallm.json lists, with adapter set `adapters`), without the model."""
    directory = Path(directory)
    sets = meta["adapter_sets"]
    frozen = _load_verified(directory, FROZEN_FILE, meta)
    adapter_tensors = _load_verified(directory, sets[adapters], meta)
    return fmt.build_layer(name, meta["layers"][name], frozen, adapter_tensors, _frozen_path(directory, meta),
                           directory / sets[adapters])


def _dense_names(model: nn.Module) -> set[str]:
    """Every persistent parameter/buffer name outside the ReALLM layers."""
    compressed = {name for name, _ in iter_reallm_layers(model)}
    return {k for k in model.state_dict() if k.rpartition(".")[0] not in compressed}


def load_model(directory: str | os.PathLike, *, adapters: str = "default", mode: RuntimeMode = "resident") -> nn.Module:
    """The model of a format-1 directory, every file checked against its digest first: the skeleton from
    config.json, the compressed linears from their stored tensors, the other tensors at their stored dtype.
    It gets the `reallm` quantizer, so that `save_pretrained` writes it as format 2."""
    # transformers' model classes and quantizer registry take seconds to import: only a load needs them
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from reallm.checkpoint.quantizer import attach_quantizer

    directory = Path(directory)
    meta = read_meta(directory)
    sets = meta.get("adapter_sets", {})
    if adapters not in sets:
        raise CheckpointError(f"{directory / META_FILE}: no adapter set {adapters!r} (has {sorted(sets)})")
    verify_aux_files(directory, meta)
    frozen = _load_verified(directory, FROZEN_FILE, meta)
    adapter_rel = sets[adapters]
    adapter_tensors = _load_verified(directory, adapter_rel, meta)
    frozen_path, adapter_path = _frozen_path(directory, meta), directory / adapter_rel
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / fmt.CONFIG_FILE}: cannot read the model config ({e})") from None
    dtype = getattr(torch, meta["dtype"]) if meta.get("dtype") else None
    with init_empty_weights(include_buffers=False):  # parameters on "meta"; buffers (RoPE tables) real
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)

    for name, rec in meta["layers"].items():
        layer = fmt.build_layer(name, rec, frozen, adapter_tensors, frozen_path, adapter_path, mode)
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{directory / META_FILE}: layer {name!r} does not exist in the model") from None
        set_module(model, name, layer)

    dense = {k[len("dense."):]: v for k, v in frozen.items() if k.startswith("dense.")}
    for alias, target in meta.get("aliases", {}).items():
        if target in dense:
            dense[alias] = dense[target]
    missing = sorted(_dense_names(model) - set(dense))
    if missing:
        raise CheckpointError(f"{frozen_path}: missing tensor 'dense.{missing[0]}' ({len(missing)} missing)")
    model.load_state_dict(dense, strict=False, assign=True)  # the file's tensors, at their stored dtype
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # the skeleton's head and embedding are two meta tensors until tied again
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{frozen_path}: missing tensor 'dense.{left[0]}' ({len(left)} missing)")
    attach_quantizer(model, meta.get("base_model"))  # model.save_pretrained writes it as format 2
    return model
