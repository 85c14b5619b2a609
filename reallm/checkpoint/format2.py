"""The checkpoint format, version 2: a Hugging Face model directory that `from_pretrained` loads.

    config.json   the model's own Hugging Face config, plus `quantization_config`:
        quant_method "reallm", format_version 2, reallm_version, base_model, dtype (the saved model's),
        runtime_mode ("resident": how the compressed linears run after loading),
        layers: {name: record}  one per compressed linear: shape, compression config, the codec's meta,
                 shared-tensor digests, bias, layout (linear / conv1d), lora_scale, bits, stats,
                 frozen_keys and adapter_keys (every tensor the layer needs), sha256 (content digest of its
                 frozen tensors and bias) and adapters_sha256 (of its default adapters)
        shared:  [digest, ...]  tensors used by several layers (a model-wide codebook), stored once
        dense:   {tensor name: sha256}  every other tensor of the weights files (embeddings, norms, head)
        adapter_sets: {"default": {"stored": "weights"}, name: {"file": "adapters/<name>.safetensors",
                       "sha256": ...}}
        files:   {file name: sha256}  tokenizer files and the loader module (written by save_compressed)
        generation_config_sha256: content digest of generation_config.json
        extra:   what the phase that wrote it adds (method, phase, ...)
        config_sha256: content digest of config.json itself, this field left out
    model.safetensors  (or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the
                       shard size, as `save_pretrained` writes them)
        <dense name>                  embeddings, norms, head, ... at their stored dtype (a tied head once)
        <layer>.frozen.<name>         the layer's stored frozen tensors at their stored dtype (packed codes,
                                      fp16 codebooks, uint8 scale codes, packed permutation, ...)
        <layer>.bias                  its original bias
        <layer>.lora_A.value, <layer>.lora_B.value (+ .scale for int8), <layer>.magnitude.value
                                      the default adapter set in stored form (L2ᵀ, L1, the DoRA magnitude)
        reallm.shared.<digest>        a tensor shared by several layers, once
    adapters/<name>.safetensors       further adapter sets over the same frozen part (adapter keys as above)
    generation_config.json, tokenizer files, README.md (model card), configuration_reallm.py (the loader
    module `trust_remote_code=True` imports: it imports reallm, which registers the quantizer)

Why content digests rather than file checksums (format version 1 kept the SHA-256 of every file): the
weights files are written by `save_pretrained` (sharded as it chooses) after the config, so the config
cannot carry their checksums; it carries the digest of what they must contain instead, tensor by tensor,
and the loader checks every tensor it reads against it. A flipped byte in a tensor, a truncated shard, a
missing or unexpected tensor, or an edited config.json is refused with one line, before anything loads.

Nothing here knows a stored format by name: a layer's tensors are whatever its codec stored
(`reallm.formats`), read back by `ReALLMWeight.from_dict`.

This module is the format itself: the records and digests, reading and checking the stored tensors of the
layers, the named adapter files, re-sealing config.json. Saving and loading whole models is
`reallm.checkpoint.compressed` (through transformers: `reallm.checkpoint.quantizer`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from reallm.core.errors import CheckpointError
from reallm.core.io import atomic_write_text, sha256_file, tensor_digest
from reallm.layer.linear import ReALLMLinear, RuntimeMode
from reallm.ops import precision as storage
from reallm.weight.container import ReALLMWeight

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "TensorFiles",
    "apply_adapter_tensors",
    "build_layer",
    "config_digest",
    "content_digest",
    "json_digest",
    "layer_state",
    "read_adapter_file",
    "read_config_file",
    "read_layers",
    "reseal_config",
    "stored_state",
    "tensor_sha256",
    "verify_dense",
    "verify_files",
]

FORMAT_VERSION = 2
QUANT_METHOD = "reallm"
SHARED_PREFIX = "reallm.shared."
ADAPTER_PARTS = ("lora_A", "lora_B", "magnitude")
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


# ---------------------------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------------------------
def _update_with_tensor(h, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{str(t.dtype).removeprefix('torch.')}:".encode())
    h.update(t.view(torch.uint8).numpy())  # the raw bytes, without a copy


def tensor_sha256(t: Tensor, shape: Iterable[int] | None = None) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(f"{list(t.shape if shape is None else shape)}:".encode())
    _update_with_tensor(h, t)
    return h.hexdigest()


def content_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over several named tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{list(t.shape)}:".encode())
        _update_with_tensor(h, t)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """SHA-256 of canonical JSON (sorted keys, no spaces): independent of how a file was indented."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_digest(config: dict[str, Any]) -> str:
    """The content digest of a config.json dict, its own `quantization_config.config_sha256` left out."""
    body = copy.deepcopy(config)
    if isinstance(body.get("quantization_config"), dict):
        body["quantization_config"].pop("config_sha256", None)
    return json_digest(body)


# ---------------------------------------------------------------------------------------------
# writing: what a compressed layer stores
# ---------------------------------------------------------------------------------------------
def compressed_layers(model: nn.Module) -> list[tuple[str, ReALLMLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ReALLMLinear)]


def layer_state(name: str, layer: ReALLMLinear) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """One compressed layer as stored: (frozen tensors and bias, default adapters, record).

    Keys are relative to the layer ("frozen.<name>", "bias", "lora_A.value", ...); the record is what
    config.json keeps for it (see the module docstring)."""
    weight = layer.container()
    _, record = weight.to_dict()  # shape, config, meta, shared_keys
    frozen = {f"frozen.{k}": v for k, v in weight.frozen.items()}
    adapters = layer.adapter_tensors()
    record.update(
        shared={k: tensor_digest(v) for k, v in weight.shared.items()},
        frozen_keys=sorted(frozen),
        bias=layer.bias is not None,
        layout=layer.layout,
        stats=layer.stats,
        bits=weight.bits(),
        lora_scale=layer.lora_scale,
        adapter_keys=sorted(adapters),
    )
    if layer.bias is not None:
        frozen["bias"] = layer.bias
    record["sha256"] = content_digest(frozen)
    record["adapters_sha256"] = content_digest(adapters)
    return frozen, adapters, record


def _storage_key(t: Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr()) if t.numel() else (id(t),)


def stored_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any], set[str]]:
    """Every tensor the weights files hold (module docstring), the records of the compressed layers and the
    set of keys that belong to them (the others are the model's dense tensors, at their usual names).

    The compressed layers' tensors never share storage with one another (safetensors refuses aliases and
    `save_pretrained` would drop one of two identical ones): a tensor seen twice is copied."""
    layers = compressed_layers(model)
    names = {name for name, _ in layers}
    state: dict[str, Tensor] = {}
    records: dict[str, Any] = {}
    shared: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for name, layer in layers:
        frozen, adapters, record = layer_state(name, layer)
        for k, t in {**frozen, **adapters}.items():
            t = t.detach()
            key = _storage_key(t)
            if key in seen:
                t = t.clone()
            seen.add(_storage_key(t))
            state[f"{name}.{k}"] = t
        for k, t in layer._shared_tensors().items():
            shared.setdefault(record["shared"][k], t.detach())
        records[name] = record
    for digest, t in shared.items():
        state[SHARED_PREFIX + digest] = t.clone() if _storage_key(t) in seen else t
        seen.add(_storage_key(state[SHARED_PREFIX + digest]))
    ours = set(state)
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in names:
            state[key] = t
    return state, {"layers": records, "shared": sorted(shared)}, ours


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
class TensorFiles:
    """The tensors of a checkpoint's safetensors files (one file or shards), read one at a time.

    Args:
        files: the weights files (what `from_pretrained` resolved: one file, or every shard of the index).
    """

    def __init__(self, files: Iterable[str | Path]) -> None:
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.where: dict[str, Path] = {}
        for f in files:
            path = Path(f)
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (a weights file of the checkpoint)")
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError, ValueError) as e:
                self.close()
                raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None
            self._handles[path] = handle
            for key in handle.keys():
                if key in self.where:
                    self.close()
                    raise CheckpointError(f"{path}: tensor {key!r} is also in {self.where[key].name}")
                self.where[key] = path

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> set[str]:
        return set(self.where)

    def file_of(self, key: str) -> Path:
        return self.where.get(key) or next(iter(self._handles), Path("model.safetensors"))

    def get(self, key: str) -> Tensor:
        path = self.where.get(key)
        if path is None:
            raise CheckpointError(f"{self.file_of(key)}: missing tensor {key!r}")
        try:
            return self._handles[path].get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor {key!r} is unreadable ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_config_file(path: Path) -> dict[str, Any]:
    """config.json of a format-2 checkpoint, checked: valid JSON, a reallm quantization_config of a version
    this code reads, and the content digest it was sealed with."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}: not a ReALLM checkpoint (no quantization_config with quant_method "
                              f"{QUANT_METHOD!r})")
    check_version(qc.get("format_version"), path)
    if qc.get("config_sha256") != config_digest(config):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or was edited; after an edit on "
                              f"purpose, re-seal it with reallm.checkpoint.format2.reseal_config)")
    for key, kind in (("layers", dict), ("dense", dict), ("shared", list), ("adapter_sets", dict), ("files", dict)):
        if not isinstance(qc.get(key), kind):
            raise CheckpointError(f"{path}: quantization_config field {key!r} is missing or malformed")
    return config


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
    config["quantization_config"]["config_sha256"] = config_digest(config)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def check_version(version: Any, where: Path | str) -> None:
    """Refuse a format version this code does not read (one line naming it)."""
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{where}: ReALLM checkpoint format version {version!r} is not supported by this reallm (it reads "
            f"versions 1 and {FORMAT_VERSION}){': upgrade reallm' if newer else ''}")


def verify_files(directory: Path, qc: dict[str, Any], strict: bool = True) -> None:
    """The files config.json lists (tokenizer, loader module) and generation_config.json, against their
    digests. `strict`: a listed file that is absent is an error (a local directory); otherwise absent files
    are skipped (a Hub snapshot holds only what was downloaded so far)."""
    for name, expected in qc.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            if strict:
                raise CheckpointError(f"{path}: missing")
            continue
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or truncated)")
    expected = qc.get("generation_config_sha256")
    path = directory / GENERATION_CONFIG_FILE
    if expected is None:
        return
    if not path.is_file():
        if strict:
            raise CheckpointError(f"{path}: missing")
        return
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: checksum mismatch (not valid JSON: corrupted or truncated)") from None
    if json_digest(content) != expected:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or was edited)")


def _need(tensors: dict[str, Tensor], key: str, file: Path) -> Tensor:
    if key not in tensors:
        raise CheckpointError(f"{file}: missing tensor {key!r}")
    return tensors[key]


def build_layer(name: str, rec: dict[str, Any], frozen: dict[str, Tensor], adapter_tensors: dict[str, Tensor],
                frozen_path: Path, adapter_path: Path, mode: RuntimeMode = "resident") -> ReALLMLinear:
    """One ReALLMLinear from its record and its stored tensors (nothing is decoded: the DoRA magnitude comes
    from the adapters).

    Args:
        name: the layer's name in the model.
        rec: its record (config.json's quantization_config, or reallm.json of format version 1).
        frozen: "<name>.frozen.<k>", "<name>.bias" and "shared.<digest>" tensors (others are ignored).
        adapter_tensors: "<name>.lora_A.value", ... (others are ignored).
        frozen_path, adapter_path: the files named in errors.
        mode: the layer's runtime mode.
    """
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
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{frozen_path}: layer {name!r} cannot be rebuilt ({_first_line(e)})") from None
    bias = _need(frozen, f"{name}.bias", frozen_path) if rec.get("bias") else None
    magnitude = None
    if weight.config.dora and weight.rank:
        parts = {k[len("magnitude."):]: v for k, v in sub.items() if k.startswith("magnitude.")}
        if not parts:
            raise CheckpointError(f"{adapter_path}: missing tensor '{name}.magnitude.value'")
        magnitude = storage.decode_stored(parts, weight.config.magnitude_dtype)
    layer = ReALLMLinear(weight, bias, mode=mode, lora_scale=rec.get("lora_scale", 1.0), magnitude=magnitude,
                         name=name)
    layer.layout = rec.get("layout", "linear")
    layer.stats = dict(rec.get("stats", {}))
    try:
        layer.load_adapter_tensors(sub)
    except KeyError as e:
        raise CheckpointError(f"{adapter_path}: missing tensor '{name}.{e.args[0]}.value'") from None
    return layer


def read_layers(qc: dict[str, Any], files: TensorFiles, mode: RuntimeMode = "resident") -> dict[str, ReALLMLinear]:
    """Every compressed layer of a format-2 checkpoint, built from the tensors of `files`, each checked against
    its digest (CheckpointError naming the first problem; nothing is returned half)."""
    shared: dict[str, Tensor] = {}
    for digest in qc["shared"]:
        key = SHARED_PREFIX + digest
        t = files.get(key)
        if tensor_digest(t) != digest:
            raise CheckpointError(f"{files.file_of(key)}: checksum mismatch of tensor {key!r} (the file is corrupted)")
        shared[f"shared.{digest}"] = t
    layers: dict[str, ReALLMLinear] = {}
    for name, rec in qc["layers"].items():
        if not isinstance(rec, dict) or "frozen_keys" not in rec or "adapter_keys" not in rec:
            raise CheckpointError(f"{CONFIG_FILE}: the record of layer {name!r} is malformed")
        frozen = {k: files.get(f"{name}.{k}") for k in [*rec["frozen_keys"], *(["bias"] if rec.get("bias") else [])]}
        path = files.file_of(f"{name}.{rec['frozen_keys'][0]}" if rec["frozen_keys"] else name)
        if content_digest(frozen) != rec.get("sha256"):
            raise CheckpointError(f"{path}: checksum mismatch of the stored tensors of layer {name!r} (the file is "
                                  f"corrupted)")
        adapters = {k: files.get(f"{name}.{k}") for k in rec["adapter_keys"]}
        if content_digest(adapters) != rec.get("adapters_sha256"):
            raise CheckpointError(f"{path}: checksum mismatch of the adapters of layer {name!r} (the file is "
                                  f"corrupted)")
        layers[name] = build_layer(name, rec, {**{f"{name}.{k}": v for k, v in frozen.items()}, **shared},
                                   {f"{name}.{k}": v for k, v in adapters.items()}, path, path, mode)
    return layers


def compressed_keys(qc: dict[str, Any]) -> set[str]:
    """The weights-file keys that belong to the compressed layers and the shared tensors."""
    keys = {SHARED_PREFIX + d for d in qc["shared"]}
    for name, rec in qc["layers"].items():
        keys.update(f"{name}.{k}" for k in [*rec.get("frozen_keys", []), *rec.get("adapter_keys", [])])
        if rec.get("bias"):
            keys.add(f"{name}.bias")
    return keys


def verify_dense(qc: dict[str, Any], files: TensorFiles) -> None:
    """Every dense tensor against its digest, and no tensor in the files that config.json does not list."""
    for key, expected in qc["dense"].items():
        if tensor_sha256(files.get(key)) != expected:
            raise CheckpointError(f"{files.file_of(key)}: checksum mismatch of tensor {key!r} (the file is corrupted)")
    unknown = sorted(files.keys() - set(qc["dense"]) - compressed_keys(qc))
    if unknown:
        raise CheckpointError(f"{files.file_of(unknown[0])}: unexpected tensor {unknown[0]!r} (not listed in "
                              f"{CONFIG_FILE}: the file is corrupted or belongs to another checkpoint)")


# ---------------------------------------------------------------------------------------------
# adapter sets
# ---------------------------------------------------------------------------------------------
def read_adapter_file(directory: Path, qc: dict[str, Any], name: str) -> dict[str, Tensor]:
    """The tensors of a named adapter set stored in its own file (checked against its SHA-256)."""
    sets = qc.get("adapter_sets", {})
    entry = sets.get(name)
    if not isinstance(entry, dict) or "file" not in entry:
        raise CheckpointError(f"{directory / CONFIG_FILE}: no adapter set {name!r} (has {sorted(sets)})")
    path = directory / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted or truncated)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None


@torch.no_grad()
def apply_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source: Path | str) -> None:
    """Load an adapter set (stored form, "<layer>.lora_A.value", ...) into every compressed layer of `model`:
    all of them or none (every layer's tensors are checked before the first is copied)."""
    layers = compressed_layers(model)
    parts = {}
    for name, layer in layers:
        sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        need = set(layer.adapter_tensors())
        missing = sorted(need - set(sub))
        if missing:
            raise CheckpointError(f"{source}: missing tensor '{name}.{missing[0]}'")
        parts[name] = sub
    extra = sorted(set(tensors) - {f"{n}.{k}" for n, sub in parts.items() for k in sub})
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} (no such compressed layer)")
    for name, layer in layers:
        layer.load_adapter_tensors(parts[name])
        layer.clear_cache()


def unexpected_key_pattern(qc: dict[str, Any]) -> str:
    """A regex matching the weights-file keys of the compressed layers (which Hugging Face's loader must not
    report as unexpected: the quantizer reads them itself)."""
    names = "|".join(re.escape(n) for n in sorted(qc["layers"]))
    parts = "|".join(["frozen", "bias", *ADAPTER_PARTS])
    shared = rf"^{re.escape(SHARED_PREFIX)}"
    return rf"^(?:{names})\.(?:{parts})(?:\.|$)|{shared}" if names else shared
