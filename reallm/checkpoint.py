"""The ReALLM checkpoint format: a directory, written atomically.

    reallm.json            format version, base model, per-layer configs / metadata / bits,
                           SHA-256 of every tensor file and of the other files (config, tokenizer),
                           adapter sets, and the SHA-256 of its own content (`meta_sha256`)
    reallm.safetensors     the frozen parts ("<layer>.frozen.<name>"), tensors shared by several
                           layers once ("shared.<sha>"), and every non-compressed parameter of the
                           model ("dense.<name>": embeddings, norms, head, biases)
    adapters.safetensors   the trainable parts of the default adapter set
                           ("<layer>.lora_A.value", "<layer>.lora_B.value", "<layer>.magnitude.value")
    adapters/<name>.safetensors   further adapter sets over the same frozen base
    config.json (+ tokenizer files)   the base model's Hugging Face config

Nothing is pickled. `load_compressed` needs only this directory. Every byte that decides what
the model computes is covered by a checksum, so a corrupted or truncated file is refused with a
CheckpointError, never loaded as a different model (tests/test_hardening.py fuzzes this).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from reallm.container import ReALLMWeight
from reallm.nn.dora import ReALLMLinear
from reallm.surgery import _set_module, iter_reallm_layers

FORMAT_NAME = "reallm"
FORMAT_VERSION = 1
FROZEN_FILE = "reallm.safetensors"
ADAPTER_FILE = "adapters.safetensors"
META_FILE = "reallm.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is (names the file and the problem)."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary directory into place (replacing an older one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _dense_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every persistent parameter/buffer outside the ReALLM layers; tied copies as aliases."""
    compressed = {name for name, _ in iter_reallm_layers(model)}
    dense: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in compressed:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        dense[key] = t
    return dense, aliases


def _layer_record(name: str, layer: ReALLMLinear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weight = layer.container()
    tensors, meta = weight.to_dict()
    frozen = {k: v for k, v in tensors.items() if k.startswith("frozen.")}
    meta["shared"] = {k: _tensor_digest(v) for k, v in weight.shared.items()}
    meta["frozen_keys"] = sorted(frozen)  # every tensor the layer needs, checked on load
    meta["bias"] = layer.bias is not None
    meta["layout"] = layer.layout
    meta["stats"] = layer.stats
    meta["bits"] = weight.bits()
    meta["lora_scale"] = layer.lora_scale
    if layer.bias is not None:
        frozen["bias"] = layer.bias
    return frozen, meta


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parts of every ReALLM layer, in stored form."""
    out = {}
    for name, layer in iter_reallm_layers(model):
        out.update({f"{name}.{k}": v for k, v in layer.adapter_tensors().items()})
    return out


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    tokenizer=None,
    extra: dict[str, Any] | None = None,
    frozen_from: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (after compress_) as a ReALLM checkpoint directory, atomically.

    The directory appears only once complete: everything is written into a temporary sibling
    directory which is then renamed. An interrupted save leaves no `directory`.

    With `frozen_from` (the checkpoint the model was loaded from; fine-tuning phases), the frozen
    part is referenced, not copied: reallm.json points to that checkpoint's reallm.safetensors
    (by relative path and SHA-256) and only the adapters are written.
    """
    final = Path(directory).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    layers = list(iter_reallm_layers(model))
    if not layers:
        raise CheckpointError("the model has no ReALLM layers: run reallm.compress_ first")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        frozen: dict[str, torch.Tensor] = {}
        records: dict[str, Any] = {}
        for name, layer in layers:
            tensors, meta = _layer_record(name, layer)
            frozen.update({f"{name}.{k}": v for k, v in tensors.items()})
            for k, v in layer.container().shared.items():
                frozen[f"shared.{meta['shared'][k]}"] = v
            records[name] = meta
        dense, aliases = _dense_state(model)
        frozen.update({f"dense.{k}": v for k, v in dense.items()})
        files: dict[str, str] = {}
        frozen_ref = None
        if frozen_from is not None:
            src = Path(frozen_from).absolute()
            src_meta = read_meta(src)
            src_file = _frozen_path(src, src_meta)
            frozen_ref = os.path.relpath(src_file, final)
            files[FROZEN_FILE] = src_meta["files"][FROZEN_FILE]
        else:
            atomic_save_safetensors(frozen, tmp / FROZEN_FILE)
            files[FROZEN_FILE] = sha256_file(tmp / FROZEN_FILE)
        atomic_save_safetensors(adapter_state(model), tmp / ADAPTER_FILE)
        files[ADAPTER_FILE] = sha256_file(tmp / ADAPTER_FILE)
        hf_config = getattr(model, "config", None)
        if hf_config is not None:
            hf_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # every other file (model config, generation config, tokenizer) is checksummed as well
        aux_files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())
                     if p.is_file() and p.name not in (FROZEN_FILE, ADAPTER_FILE, META_FILE)}
        base = base_model or getattr(hf_config, "_name_or_path", None)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "base_model": base,
            "model_class": type(model).__name__,
            "dtype": str(next(iter(dense.values())).dtype).replace("torch.", "") if dense else None,
            "layers": records,
            "aliases": aliases,
            "files": files,
            "aux_files": aux_files,
            "frozen_ref": frozen_ref,
            "adapter_sets": {"default": ADAPTER_FILE},
            "extra": extra or {},
        }
        write_meta(tmp, meta)
        _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_adapters(model: nn.Module, directory: str | os.PathLike, name: str) -> Path:
    """Add (or replace) a named adapter set over the frozen base of an existing checkpoint."""
    directory = Path(directory)
    meta = read_meta(directory)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"adapter set name must be alphanumeric (with - or _), got {name!r}")
    rel = ADAPTER_FILE if name == "default" else f"adapters/{name}.safetensors"
    (directory / rel).parent.mkdir(exist_ok=True)
    atomic_save_safetensors(adapter_state(model), directory / rel)
    meta["files"][rel] = sha256_file(directory / rel)
    meta["adapter_sets"][name] = rel
    write_meta(directory, meta)
    return directory / rel


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """reallm.json, checked for format and version."""
    directory = Path(directory)
    path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a ReALLM checkpoint directory (it does not exist)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete ReALLM checkpoint)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a ReALLM checkpoint (format field is missing or wrong)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported by this reallm "
            f"(it reads version {FORMAT_VERSION})"
        )
    sealed = meta.get("meta_sha256")
    if sealed is not None and sealed != meta_digest(meta):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or was edited; after an "
                              f"edit on purpose, re-seal it with reallm.checkpoint.write_meta)")
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
    """Where a checkpoint's frozen part lives (its own file, or the one it references)."""
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


def _build_layer(name: str, rec: dict[str, Any], frozen: dict[str, torch.Tensor],
                 adapter_tensors: dict[str, torch.Tensor], frozen_path: Path, adapter_path: Path,
                 cache_frozen: bool = True) -> ReALLMLinear:
    """One ReALLMLinear from its reallm.json record and the loaded tensor files."""
    prefix = f"{name}.frozen."
    tensors = {k[len(name) + 1:]: v for k, v in frozen.items() if k.startswith(prefix)}
    shared = {k: _need(frozen, f"shared.{digest}", frozen_path) for k, digest in rec["shared"].items()}
    for k in rec.get("frozen_keys", []):
        _need(frozen, f"{name}.{k}", frozen_path)
    sub = {k[len(name) + 1:]: v for k, v in adapter_tensors.items() if k.startswith(name + ".")}
    # the low-rank factors live with the adapters: lora_B ↔ L1 (p, r), lora_A ↔ L2 (q, r)
    for ours, theirs in (("L1", "lora_B"), ("L2", "lora_A")):
        tensors.update({f"lowrank.{ours}.{k[len(theirs) + 1:]}": v for k, v in sub.items()
                        if k.startswith(theirs + ".")})
    try:
        weight = ReALLMWeight.from_dict(tensors, rec, shared)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{frozen_path}: layer {name!r} cannot be rebuilt ({e})") from None
    bias = _need(frozen, f"{name}.bias", frozen_path) if rec.get("bias") else None
    layer = ReALLMLinear(weight, bias, cache_frozen=cache_frozen, lora_scale=rec.get("lora_scale", 1.0))
    layer.layout = rec.get("layout", "linear")
    layer.stats = dict(rec.get("stats", {}))
    try:
        layer.load_adapter_tensors(sub)
    except KeyError as e:
        raise CheckpointError(f"{adapter_path}: missing tensor '{name}.{e.args[0]}.value'") from None
    return layer


def load_layer(directory: str | os.PathLike, name: str, *, adapters: str = "default") -> ReALLMLinear:
    """One compressed layer of a checkpoint, without building the model (for figures and checks)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if name not in meta["layers"]:
        raise CheckpointError(f"{directory / META_FILE}: no layer {name!r}")
    sets = meta.get("adapter_sets", {})
    if adapters not in sets:
        raise CheckpointError(f"{directory / META_FILE}: no adapter set {adapters!r} (has {sorted(sets)})")
    frozen = _load_verified(directory, FROZEN_FILE, meta)
    adapter_tensors = _load_verified(directory, sets[adapters], meta)
    return _build_layer(name, meta["layers"][name], frozen, adapter_tensors, _frozen_path(directory, meta),
                        directory / sets[adapters])


def load_compressed(
    directory: str | os.PathLike,
    *,
    adapters: str = "default",
    device: torch.device | str | None = None,
    cache_frozen: bool = True,
) -> nn.Module:
    """Rebuild a compressed model from a checkpoint directory (no base weights needed).

    Args:
        directory: the checkpoint directory written by `save_compressed`.
        adapters: the adapter set to load ("default" or a name given to `save_adapters`).
        device: where to put the model (default CPU).
        cache_frozen: passed to every ReALLMLinear.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

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
        raise CheckpointError(f"{directory / 'config.json'}: cannot read the model config ({e})") from None
    dtype = getattr(torch, meta["dtype"]) if meta.get("dtype") else None
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)

    for name, rec in meta["layers"].items():
        layer = _build_layer(name, rec, frozen, adapter_tensors, frozen_path, adapter_path, cache_frozen)
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{directory / META_FILE}: layer {name!r} does not exist in the model") from None
        _set_module(model, name, layer)

    dense = {k[len("dense."):]: v for k, v in frozen.items() if k.startswith("dense.")}
    for alias, target in meta.get("aliases", {}).items():
        if target in dense:
            dense[alias] = dense[target]
    expected_dense = set(_dense_state(model)[0]) | set(_dense_state(model)[1])
    missing = sorted(expected_dense - set(dense))
    if missing:
        raise CheckpointError(f"{frozen_path}: missing tensor 'dense.{missing[0]}' ({len(missing)} missing)")
    own = model.state_dict(keep_vars=True)
    for key, t in dense.items():  # each dense tensor keeps its stored dtype (e.g. fp32 norms in a bf16 model)
        if key in own and own[key].dtype != t.dtype:
            own[key].data = own[key].data.to(t.dtype)  # in place: tied parameters stay one object
    model.load_state_dict(dense, strict=False)
    if device is not None:
        model.to(device)
    model.eval()
    return model


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
    dense, aliases = _dense_state(model)
    state = dict(dense)
    for name, layer in iter_reallm_layers(model):
        dtype = getattr(torch, layer.stats.get("orig_dtype", "float32"))
        W = layer.dequantize().to(dtype)
        state[f"{name}.weight"] = W.T.contiguous() if layer.layout == "conv1d" else W
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
