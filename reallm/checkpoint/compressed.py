"""Saving and loading whole compressed models: `save_compressed`, `load_compressed`, adapter sets,
`export_dense`, and reading one layer or the digests of a checkpoint without building the model.

`save_compressed` writes checkpoint format 2 (`reallm.checkpoint.format2`): a Hugging Face model directory
that `model.save_pretrained(dir)` writes through the `reallm` quantization method
(`reallm.checkpoint.quantizer`) and `AutoModelForCausalLM.from_pretrained(dir)` loads once reallm is
imported; `save_compressed` writes it atomically, with the tokenizer, the loader module for
`trust_remote_code` users (`reallm.checkpoint.remote_code`) and a model card (`reallm.checkpoint.card`).
`load_compressed` loads format 2 through `from_pretrained`, and format 1 (the earlier reallm.json
directories) through `reallm.checkpoint.format1`; `reallm.checkpoint.directory` tells them apart.
`export_dense` writes a plain Hugging Face model with every compressed layer merged.

Nothing is pickled. Every byte that decides what the model computes is covered by a digest, so a corrupted
or truncated file is refused with a CheckpointError, never loaded as a different model
(tests/test_hardening.py fuzzes this).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging as hf_logging

from reallm.checkpoint import format1 as f1
from reallm.checkpoint import format2 as fmt
from reallm.checkpoint.card import write_model_card
from reallm.checkpoint.directory import WEIGHTS_FILE, checkpoint_version, read_meta, weight_files
from reallm.checkpoint.remote_code import LOADER_FILE, LOADER_SOURCE, drop_loader_reference
from reallm.core.errors import CheckpointError
from reallm.core.io import atomic_save_safetensors, atomic_write_text, publish_dir, sha256_file
from reallm.layer.auto_runtime import AUTO_MEMORY_FRACTION, check_memory_fraction
from reallm.layer.linear import RuntimeMode, check_runtime_mode, iter_reallm_layers, set_runtime_mode

__all__ = [
    "adapter_state",
    "adapters_fingerprint",
    "export_dense",
    "frozen_digests",
    "load_compressed",
    "load_layer",
    "read_adapters",
    "save_adapters",
    "save_compressed",
]


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parts of every ReALLM layer, in stored form."""
    out = {}
    for name, layer in iter_reallm_layers(model):
        out.update({f"{name}.{k}": v for k, v in layer.adapter_tensors().items()})
    return out


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    tokenizer=None,
    extra: dict[str, Any] | None = None,
    frozen_from: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    command: str | None = None,
) -> Path:
    """Write `model` (after compress_, or loaded) as a ReALLM checkpoint directory (format 2), atomically.

    The directory is what `model.save_pretrained` writes (config.json with the quantization_config,
    model.safetensors or shards), plus the tokenizer, the loader module `configuration_reallm.py` (for
    `trust_remote_code=True` users) and a model card (README.md). Everything is written into a temporary
    sibling directory which is then renamed: an interrupted save leaves no `directory`.

    Args:
        model: a Hugging Face causal LM with ReALLM layers.
        directory: where to write it (replaced if it exists).
        base_model: the uncompressed model it comes from (hub id or path; the model card and the block-wise
            phase's teachers use it).
        tokenizer: saved beside the model (recommended: the directory is then all a user needs).
        extra: facts of the writing phase kept in the quantization_config (method, phase, ...).
        frozen_from: the checkpoint the model was loaded from (fine-tuning phases): its frozen parts must be
            unchanged (checked layer by layer against its digests; the new checkpoint is complete on its own).
        max_shard_size: weights files above this size are split into shards with an index.
        command: the command that made the model (model card).
    """
    # transformers' model classes and quantizer registry take seconds to import: only a save needs them
    from transformers import PreTrainedModel

    from reallm.checkpoint.quantizer import attach_quantizer

    final = Path(directory).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    layers = list(iter_reallm_layers(model))
    if not layers:
        raise CheckpointError("the model has no ReALLM layers: run reallm.compress_ first")
    if not isinstance(model, PreTrainedModel):
        raise CheckpointError(f"save_compressed writes Hugging Face models (a {type(model).__name__} is not a "
                              f"PreTrainedModel)")
    quantizer = attach_quantizer(model, base_model)
    extra = dict(extra or {})
    if frozen_from is not None:
        extra["frozen_from"] = _check_frozen_unchanged(model, Path(frozen_from))
    base = base_model or quantizer.quantization_config.base_model
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / LOADER_FILE, LOADER_SOURCE)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        quantizer.save_options = {"files": files, "base_model": base, "extra": extra, "loader": True}
        with _no_transformers_progress_bars():
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        fmt.read_config_file(tmp / fmt.CONFIG_FILE)  # the seal matches what transformers wrote
        write_model_card(tmp, model=model, command=command, location=final)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        quantizer.save_options = {}
        drop_loader_reference(model.config)
    return final


def _check_frozen_unchanged(model: nn.Module, source: Path) -> dict[str, Any]:
    """The frozen part of every layer of `model` equals the one stored in checkpoint `source`."""
    stored = frozen_digests(source)
    ours = {name: fmt.layer_state(name, layer)[2]["sha256"] for name, layer in iter_reallm_layers(model)}
    if stored.keys() != ours.keys():
        raise CheckpointError(f"{source}: its compressed layers are not the model's ({len(stored)} against "
                              f"{len(ours)})")
    changed = sorted(n for n in ours if ours[n] != stored[n])
    if changed:
        raise CheckpointError(f"the frozen part of layer {changed[0]!r} differs from the one in {source} "
                              f"({len(changed)} layers differ): fine-tuning changes only the adapters")
    return {"checkpoint": str(source.absolute()), "frozen_sha256": fmt.json_digest(stored)}


def frozen_digests(directory: str | os.PathLike) -> dict[str, str]:
    """Layer → content digest of its frozen tensors and bias (format 2: recorded; format 1: computed)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta["format_version"] == 1:
        return f1.frozen_digests(directory, meta)
    return {name: rec["sha256"] for name, rec in meta["layers"].items()}


def save_adapters(model: nn.Module, directory: str | os.PathLike, name: str) -> Path:
    """Add (or replace) a named adapter set over the frozen base of an existing checkpoint."""
    directory = Path(directory)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"adapter set name must be alphanumeric (with - or _), got {name!r}")
    if checkpoint_version(directory) == 1:
        return f1.save_adapters(directory, name, adapter_state(model))
    qc = fmt.read_config_file(directory / fmt.CONFIG_FILE)["quantization_config"]
    if name == "default":
        raise CheckpointError(f"{directory}: the default adapter set is part of the weights; save the whole "
                              f"checkpoint (save_compressed) to replace it")
    ours = {n for n, _ in iter_reallm_layers(model)}
    if ours != set(qc["layers"]):
        raise CheckpointError(f"{directory}: the model's compressed layers are not the checkpoint's")
    rel = f"adapters/{name}.safetensors"
    (directory / rel).parent.mkdir(exist_ok=True)
    atomic_save_safetensors(adapter_state(model), directory / rel)
    digest = sha256_file(directory / rel)
    fmt.reseal_config(directory, lambda c: c["quantization_config"]["adapter_sets"].__setitem__(
        name, {"file": rel, "sha256": digest}))
    return directory / rel


def read_adapters(directory: str | os.PathLike, name: str = "default") -> dict[str, torch.Tensor]:
    """The stored tensors of an adapter set ("<layer>.lora_A.value", ...), checked against their digests."""
    directory = Path(directory)
    meta = read_meta(directory)
    sets = meta.get("adapter_sets", {})
    if name not in sets:
        raise CheckpointError(f"{directory}: no adapter set {name!r} (has {sorted(sets)})")
    if meta["format_version"] == 1:
        return f1.read_adapters(directory, meta, name)
    if name != "default":
        return fmt.read_adapter_file(directory, meta, name)
    out = {}
    with fmt.TensorFiles(weight_files(directory)) as files:
        for layer, rec in meta["layers"].items():
            part = {k: files.get(f"{layer}.{k}") for k in rec["adapter_keys"]}
            if fmt.content_digest(part) != rec["adapters_sha256"]:
                raise CheckpointError(f"{files.file_of(layer + '.' + rec['adapter_keys'][0])}: checksum mismatch "
                                      f"of the adapters of layer {layer!r} (the file is corrupted)")
            out.update({f"{layer}.{k}": v for k, v in part.items()})
    return out


def adapters_fingerprint(directory: str | os.PathLike, name: str = "default") -> str | None:
    """A digest that changes whenever the adapter set `name` of a checkpoint changes (resume checks)."""
    meta = read_meta(directory)
    if meta["format_version"] == 1:
        return f1.adapters_fingerprint(meta, name)
    entry = meta.get("adapter_sets", {}).get(name)
    if entry is None:
        return None
    if name != "default":
        return entry.get("sha256")
    return fmt.json_digest({n: rec["adapters_sha256"] for n, rec in meta["layers"].items()})


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load_layer(directory: str | os.PathLike, name: str, *, adapters: str = "default") -> nn.Module:
    """One compressed layer of a checkpoint, without building the model (for figures and checks)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if name not in meta["layers"]:
        raise CheckpointError(f"{directory}: no layer {name!r}")
    sets = meta.get("adapter_sets", {})
    if adapters not in sets:
        raise CheckpointError(f"{directory}: no adapter set {adapters!r} (has {sorted(sets)})")
    if meta["format_version"] == 1:
        return f1.load_layer(directory, meta, name, adapters)
    qc = {**meta, "layers": {name: meta["layers"][name]},
          "shared": sorted(set(meta["layers"][name]["shared"].values()))}
    with fmt.TensorFiles(weight_files(directory)) as files:
        layer = fmt.read_layers(qc, files)[name]
    if adapters != "default":
        tensors = fmt.read_adapter_file(directory, meta, adapters)
        layer.load_adapter_tensors({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    return layer


def load_compressed(
    directory: str | os.PathLike,
    *,
    adapters: str = "default",
    device: torch.device | str | None = None,
    mode: RuntimeMode = "resident",
    memory_fraction: float = AUTO_MEMORY_FRACTION,
) -> nn.Module:
    """Rebuild a compressed model from a checkpoint directory (no base weights needed).

    Format 2 goes through `AutoModelForCausalLM.from_pretrained` (the `reallm` quantizer); format 1 through
    `reallm.checkpoint.format1.load_model`. Either way the compressed linears are filled with their stored
    tensors only (nothing is decoded), the other parameters keep their stored dtype, and every digest is
    checked first.

    Args:
        directory: the checkpoint directory (`save_compressed`, `model.save_pretrained`, or format 1).
        adapters: the adapter set to load ("default" or a name given to `save_adapters`).
        device: where to put the model (default CPU).
        mode: runtime mode of every compressed linear: "resident" (packed in memory, decoded on the fly; the
            default: a loaded model holds only its stored form unless asked), "cache" (decoded once into a dense
            copy in the compute dtype) or "auto" (cached where `memory_fraction` of the free memory of the
            device holds the dense copies, decided at the first forward); see `reallm.layer.linear`.
        memory_fraction: the share of free memory "auto" may fill, in (0, 1] (`reallm.layer.auto_runtime`).
    """
    check_runtime_mode(mode)
    check_memory_fraction(memory_fraction)
    directory = Path(directory)
    built = "resident" if mode == "auto" else mode  # "auto" joins the layers into one decision below
    if checkpoint_version(directory) == 1:
        model = f1.load_model(directory, adapters=adapters, mode=built)
    else:
        model = _load_format2(directory, adapters=adapters, mode=built)
    if mode == "auto":
        set_runtime_mode(model, "auto", memory_fraction=memory_fraction)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_format2(directory: Path, *, adapters: str, mode: RuntimeMode) -> nn.Module:
    from transformers import AutoModelForCausalLM  # transformers' model classes: seconds, only a load needs them

    config = fmt.read_config_file(directory / fmt.CONFIG_FILE)  # named one-line errors before transformers reads it
    qc = config["quantization_config"]
    if adapters not in qc["adapter_sets"]:
        raise CheckpointError(f"{directory}: no adapter set {adapters!r} (has {sorted(qc['adapter_sets'])})")
    extra_set = fmt.read_adapter_file(directory, qc, adapters) if adapters != "default" else None
    weight_files(directory)  # a missing shard is named here
    try:
        with _no_transformers_progress_bars():  # a local directory: no download to show
            model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", local_files_only=True)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"{directory}: cannot be loaded by transformers ({first})") from None
    if extra_set is not None:
        fmt.apply_adapter_tensors(model, extra_set, directory / qc["adapter_sets"][adapters]["file"])
    if mode != qc["runtime_mode"]:
        set_runtime_mode(model, mode)
    return model


@contextmanager
def _no_transformers_progress_bars():
    """transformers 5 draws a bar for every load and save ("Loading weights", "Writing model shards"); the
    commands of this project keep stderr for their own bars and one-line errors. The previous setting of
    transformers and huggingface_hub is restored."""
    transformers_on, hub_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if hub_off:
            disable_progress_bars()
        else:
            enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def export_dense(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write a standard Hugging Face model directory with every ReALLM layer merged (W_ft).

    Layers are merged one at a time into the state dict (the model itself is not modified).
    """
    final = Path(directory).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    compressed = dict(iter_reallm_layers(model))
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in compressed}
    for name, layer in compressed.items():
        dtype = getattr(torch, layer.stats.get("orig_dtype", "float32"))
        W = layer.dequantize().to(dtype)
        state[f"{name}.weight"] = W.T.contiguous() if layer.layout == "conv1d" else W
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    state = _without_aliases(state)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config = copy.deepcopy(model.config)  # a plain model: no quantization_config, no loader module
        for attr in ("quantization_config", "_is_quantized"):
            if attr in config.__dict__:
                delattr(config, attr)
        drop_loader_reference(config)
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One key per shared tensor (a tied head is the embedding; safetensors refuses aliases)."""
    seen: set[tuple] = set()
    out = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out
