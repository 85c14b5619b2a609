"""ReALLM checkpoints: save, load, adapter sets, dense export.

Format version 2 (written since issue 16) is a Hugging Face model directory: `model.save_pretrained(dir)`
writes it and `AutoModelForCausalLM.from_pretrained(dir)` loads it once reallm is imported (the `reallm`
quantization method, `reallm.checkpoint.quantizer`); the layout, fields and digests are described in
`reallm.checkpoint.format2`. `save_compressed` writes it atomically, with the tokenizer, the loader module for
`trust_remote_code` users and a model card; `load_compressed` loads it through `from_pretrained`.

Format version 1 (earlier checkpoints of this project) is read as before:

    reallm.json            format version, base model, per-layer configs / metadata / bits,
                           SHA-256 of every tensor file and of the other files (config, tokenizer),
                           adapter sets, and the SHA-256 of its own content (`meta_sha256`)
    reallm.safetensors     the frozen parts ("<layer>.frozen.<name>"), tensors shared by several
                           layers once ("shared.<sha>"), and every non-compressed parameter of the
                           model ("dense.<name>": embeddings, norms, head, biases)
    adapters.safetensors   the trainable parts of the default adapter set
    adapters/<name>.safetensors   further adapter sets over the same frozen base
    config.json (+ tokenizer files)   the base model's Hugging Face config

Nothing is pickled. Every byte that decides what the model computes is covered by a digest, so a corrupted
or truncated file is refused with a CheckpointError, never loaded as a different model
(tests/test_hardening.py fuzzes this).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from reallm.checkpoint import format2 as fmt
from reallm.core.errors import CheckpointError
from reallm.core.hf_models import set_module
from reallm.core.io import (
    atomic_save_safetensors,
    atomic_write_text,
    publish_dir,
    sha256_file,
)
from reallm.layer.linear import RuntimeMode, iter_reallm_layers, set_runtime_mode

FORMAT_NAME = "reallm"
FORMAT_VERSION = fmt.FORMAT_VERSION
# format version 1
FROZEN_FILE = "reallm.safetensors"
ADAPTER_FILE = "adapters.safetensors"
META_FILE = "reallm.json"
# format version 2
CONFIG_FILE = fmt.CONFIG_FILE
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MODEL_CARD = "README.md"


# ---------------------------------------------------------------------------------------------
# which format
# ---------------------------------------------------------------------------------------------
def checkpoint_version(directory: str | os.PathLike) -> int:
    """1 (reallm.json) or 2 (config.json with a reallm quantization_config); CheckpointError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a ReALLM checkpoint directory (it does not exist)")
    if (directory / META_FILE).is_file():
        return 1
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{directory}: not a ReALLM checkpoint (neither {CONFIG_FILE} nor {META_FILE})")
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
        return _read_meta_v1(directory)
    config = fmt.read_config_file(directory / CONFIG_FILE)
    qc = config["quantization_config"]
    return {"format": FORMAT_NAME, **qc, "model_class": (config.get("architectures") or [None])[0]}


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
    from transformers import PreTrainedModel

    from reallm.checkpoint.quantizer import LOADER_FILE, LOADER_SOURCE, attach_quantizer, drop_loader_reference

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
        fmt.read_config_file(tmp / CONFIG_FILE)  # the seal matches what transformers wrote
        from reallm.checkpoint.hub import write_model_card

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
    if meta["format_version"] != 1:
        return {name: rec["sha256"] for name, rec in meta["layers"].items()}
    frozen = _load_verified(directory, FROZEN_FILE, meta)
    out = {}
    for name, rec in meta["layers"].items():
        keys = [*rec.get("frozen_keys", []), *(["bias"] if rec.get("bias") else [])]
        out[name] = fmt.content_digest({k: _need(frozen, f"{name}.{k}", _frozen_path(directory, meta)) for k in keys})
    return out


def reseal_config(directory: str | os.PathLike, edit=None) -> Path:
    """Rewrite config.json of a format-2 checkpoint with a fresh seal (after an edit on purpose: `edit` is
    called with the parsed config dict and may change it in place). Atomic."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if edit is not None:
        edit(config)
    config["quantization_config"]["config_sha256"] = fmt.config_digest(config)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def save_adapters(model: nn.Module, directory: str | os.PathLike, name: str) -> Path:
    """Add (or replace) a named adapter set over the frozen base of an existing checkpoint."""
    directory = Path(directory)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"adapter set name must be alphanumeric (with - or _), got {name!r}")
    if checkpoint_version(directory) == 1:
        return _save_adapters_v1(model, directory, name)
    qc = fmt.read_config_file(directory / CONFIG_FILE)["quantization_config"]
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
    reseal_config(directory, lambda c: c["quantization_config"]["adapter_sets"].__setitem__(
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
        return _load_verified(directory, sets[name], meta)
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
    entry = meta.get("adapter_sets", {}).get(name)
    if meta["format_version"] == 1:
        return meta["files"].get(entry) if entry else None
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
        frozen = _load_verified(directory, FROZEN_FILE, meta)
        adapter_tensors = _load_verified(directory, sets[adapters], meta)
        return fmt.build_layer(name, meta["layers"][name], frozen, adapter_tensors, _frozen_path(directory, meta),
                               directory / sets[adapters])
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
) -> nn.Module:
    """Rebuild a compressed model from a checkpoint directory (no base weights needed).

    Format 2 goes through `AutoModelForCausalLM.from_pretrained` (the `reallm` quantizer); format 1 through
    this module's own loader. Either way the compressed linears are filled with their stored tensors only
    (nothing is decoded), the other parameters keep their stored dtype, and every digest is checked first.

    Args:
        directory: the checkpoint directory (`save_compressed`, `model.save_pretrained`, or format 1).
        adapters: the adapter set to load ("default" or a name given to `save_adapters`).
        device: where to put the model (default CPU).
        mode: runtime mode of every compressed linear: "resident" (packed in memory, decoded on the fly)
            or "cache" (decoded once into a dense copy in the compute dtype); see `reallm.layer.linear`.
    """
    directory = Path(directory)
    if checkpoint_version(directory) == 1:
        model = _load_compressed_v1(directory, adapters=adapters, mode=mode)
    else:
        model = _load_compressed_v2(directory, adapters=adapters, mode=mode)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_compressed_v2(directory: Path, *, adapters: str, mode: RuntimeMode) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = fmt.read_config_file(directory / CONFIG_FILE)  # named one-line errors before transformers reads it
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
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

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
# format version 1 (read, and adapter sets added to it)
# ---------------------------------------------------------------------------------------------
def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of reallm.json's content without its own `meta_sha256` field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write reallm.json (format 1) atomically, sealed with the SHA-256 of its content (`meta_sha256`).
    Use it to re-seal a reallm.json edited on purpose (read_meta refuses edited ones)."""
    meta = {**meta, "meta_sha256": meta_digest(meta)}
    path = Path(directory) / META_FILE
    atomic_write_text(path, json.dumps(meta, indent=1, sort_keys=True))
    return path


def _read_meta_v1(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a ReALLM checkpoint (format field is missing or wrong)")
    version = meta.get("format_version")
    if version != 1:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported by this reallm (a reallm.json is version 1)")
    sealed = meta.get("meta_sha256")
    if sealed is not None and sealed != meta_digest(meta):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or was edited; after an "
                              f"edit on purpose, re-seal it with reallm.checkpoint.compressed.write_meta)")
    for key, kind in (("layers", dict), ("files", dict), ("adapter_sets", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} is missing or malformed")
    return meta


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
    """Where a version-1 checkpoint's frozen part lives (its own file, or the one it references)."""
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


def _save_adapters_v1(model: nn.Module, directory: Path, name: str) -> Path:
    meta = read_meta(directory)
    rel = ADAPTER_FILE if name == "default" else f"adapters/{name}.safetensors"
    (directory / rel).parent.mkdir(exist_ok=True)
    atomic_save_safetensors(adapter_state(model), directory / rel)
    meta["files"][rel] = sha256_file(directory / rel)
    meta["adapter_sets"][name] = rel
    write_meta(directory, meta)
    return directory / rel


def _dense_names(model: nn.Module) -> set[str]:
    """Every persistent parameter/buffer name outside the ReALLM layers."""
    compressed = {name for name, _ in iter_reallm_layers(model)}
    return {k for k in model.state_dict() if k.rpartition(".")[0] not in compressed}


def _load_compressed_v1(directory: Path, *, adapters: str, mode: RuntimeMode) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

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
        raise CheckpointError(f"{directory / CONFIG_FILE}: cannot read the model config ({e})") from None
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
    from reallm.checkpoint.quantizer import attach_quantizer

    attach_quantizer(model, meta.get("base_model"))  # model.save_pretrained writes it as format 2
    return model


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def export_dense(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write a standard Hugging Face model directory with every ReALLM layer merged (W_ft).

    Layers are merged one at a time into the state dict (the model itself is not modified).
    """
    from reallm.checkpoint.quantizer import drop_loader_reference

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
