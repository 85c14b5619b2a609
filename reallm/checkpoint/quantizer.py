"""The `reallm` quantization method of Hugging Face transformers: `from_pretrained` / `save_pretrained`.

Importing this module registers, with transformers' own registries (`transformers.quantizers.auto.
register_quantization_config` / `register_quantizer`; `import reallm` arranges for the import, see
`reallm.checkpoint.registration`):

- `ReALLMConfig`, the `quantization_config` of config.json (`quant_method: "reallm"`; fields in
  `reallm.checkpoint.format2`);
- `ReALLMHfQuantizer`, which `AutoModelForCausalLM.from_pretrained` calls for such a directory or Hub id:
  before Hugging Face loads any weight it reads the compressed layers' stored tensors itself (through the
  shards' index), checks every digest, and puts an empty placeholder where each compressed linear goes, so
  that the loader's "missing keys" initialisation has nothing of ours to overwrite; Hugging Face then loads
  the dense tensors (embeddings, norms, head) at their usual names, at their stored dtype; afterwards the
  placeholders are replaced by the `ReALLMLinear` layers (resident form, default adapters).
  `model.save_pretrained(dir)` asks it for the state dict to write (`get_state_dict_and_metadata`): the
  stored tensors of every compressed layer, and a fresh `quantization_config` describing them, sealed.

`attach_quantizer(model)` gives a model compressed in memory (`reallm.compress_`, the version-1 loader)
the same quantizer, so that `save_pretrained` works on it too. The format itself is `reallm.checkpoint.format2`;
the loader module `trust_remote_code` users import is `reallm.checkpoint.remote_code`.

Importing this module imports transformers' quantizer registry (seconds): its users (`reallm.checkpoint.
compressed`, `reallm.checkpoint.format1`, `reallm.model.surgery`) import it inside the functions that need it,
so that `import reallm` stays light (`reallm.checkpoint.registration`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from reallm.checkpoint import format2 as fmt
from reallm.checkpoint.remote_code import LOADER_CLASS, LOADER_MODULE, drop_loader_reference
from reallm.core.errors import CheckpointError, UserError
from reallm.core.hf_models import is_linear, linear_weight, set_module
from reallm.core.io import LIBRARY_VERSION
from reallm.layer.linear import RUNTIME_MODES, set_runtime_mode

if TYPE_CHECKING:  # transformers.modeling_utils may be importing this module (reallm.checkpoint.registration)
    from transformers import PreTrainedModel

__all__ = ["ReALLMConfig", "ReALLMHfQuantizer", "attach_quantizer", "reallm_version"]


def reallm_version() -> str:
    return LIBRARY_VERSION


class ReALLMConfig(QuantizationConfigMixin):
    """The `quantization_config` of a ReALLM checkpoint (config.json), as transformers sees it.

    `save_pretrained` writes it from the model's compressed layers; nobody needs to build one by hand.
    Every argument is a field of config.json (described in `reallm.checkpoint.format2`).

    Args:
        format_version: the checkpoint format (2; a newer one is refused with one line).
        layers: per compressed linear: record (shape, compression config, meta, digests, ...).
        shared: digests of the tensors shared by several layers.
        dense: dense tensor name → SHA-256.
        adapter_sets: "default" (in the weights) and further sets in their own files.
        files: further files of the directory → SHA-256 (tokenizer, loader module).
        generation_config_sha256: content digest of generation_config.json.
        base_model: the uncompressed model it was made from (hub id or path).
        dtype: the saved model's dtype ("float32", "bfloat16", ...).
        runtime_mode: how the compressed linears run after loading ("resident", "cache" or "auto").
        reallm_version: the version of the library that wrote it.
        extra: what the writing phase adds (method, phase, ...).
        config_sha256: content digest of config.json without this field.
    """

    def __init__(
        self,
        format_version: int = fmt.FORMAT_VERSION,
        layers: dict[str, Any] | None = None,
        shared: list[str] | None = None,
        dense: dict[str, str] | None = None,
        adapter_sets: dict[str, Any] | None = None,
        files: dict[str, str] | None = None,
        generation_config_sha256: str | None = None,
        base_model: str | None = None,
        dtype: str | None = None,
        runtime_mode: str = "resident",
        reallm_version: str | None = None,
        extra: dict[str, Any] | None = None,
        config_sha256: str | None = None,
        quant_method: str = fmt.QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        fmt.check_version(format_version, "quantization_config")
        if runtime_mode not in RUNTIME_MODES:
            raise CheckpointError(f"quantization_config: runtime_mode must be one of {RUNTIME_MODES}, "
                                  f"got {runtime_mode!r}")
        self.quant_method = fmt.QUANT_METHOD
        self.format_version = format_version
        self.reallm_version = reallm_version
        self.base_model = base_model
        self.dtype = dtype
        self.runtime_mode = runtime_mode
        self.layers = dict(layers or {})
        self.shared = list(shared or [])
        self.dense = dict(dense or {})
        self.adapter_sets = dict(adapter_sets or {"default": {"stored": "weights"}})
        self.files = dict(files or {})
        self.generation_config_sha256 = generation_config_sha256
        self.extra = dict(extra or {})
        self.config_sha256 = config_sha256
        for k, v in kwargs.items():  # fields of a later minor revision round-trip unchanged
            setattr(self, k, v)


class _AwaitingLayer(nn.Module):
    """Stands in for a compressed linear while Hugging Face loads the dense tensors: it holds no tensor, so
    the loader's initialisation of "missing" parameters has nothing of the compressed layer to overwrite.
    Replaced by the real layer before `from_pretrained` returns."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        # plain attributes, not parameters: some models' weight initialisation reads a submodule's weight by
        # name (GPT-2 rescales `c_proj.weight`); an empty tensor gives it nothing to do and nothing to load
        self.weight = torch.empty(0, device="cpu")
        self.bias = torch.empty(0, device="cpu")

    def forward(self, *args, **kwargs):  # pragma: no cover - never left in a returned model
        raise RuntimeError(f"compressed layer {self.name!r} was not loaded")


class ReALLMHfQuantizer(HfQuantizer):
    """transformers' side of a ReALLM checkpoint (see the module docstring)."""

    requires_calibration = True  # a reallm checkpoint is made by reallm (compress_ / train.py), not on load
    quantization_config: ReALLMConfig

    def __init__(self, quantization_config: ReALLMConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._pending: dict[str, nn.Module] = {}
        self._keep_stored_dtypes = True
        self.save_options: dict[str, Any] = {}  # set by reallm.checkpoint.compressed.save_compressed for its next save

    # -- loading ------------------------------------------------------------------------------
    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """`dtype="auto"` (the default) resolves to the saved dtype: then every tensor keeps the dtype it was
        stored in (fp32 norms of a bf16 model stay fp32); another dtype casts the dense tensors to it, as for
        any Hugging Face model (the compressed layers always keep their stored dtypes)."""
        saved = self.quantization_config.dtype
        self._keep_stored_dtypes = saved is None or dtype == getattr(torch, saved, None)
        return dtype

    def get_new_dtype(self, converter, param, dtype):
        return None if self._keep_stored_dtypes else super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs):
        qc = self.quantization_config.to_dict()
        if not checkpoint_files or not str(checkpoint_files[0]).endswith(".safetensors"):
            raise CheckpointError("a ReALLM checkpoint loads from safetensors files (none was found)")
        directory = Path(checkpoint_files[0]).parent
        config = fmt.read_config_file(directory / fmt.CONFIG_FILE)
        if fmt.json_digest(config["quantization_config"]) != fmt.json_digest(qc):
            raise CheckpointError(f"{directory / fmt.CONFIG_FILE}: the quantization_config given to from_pretrained "
                                  f"differs from the checkpoint's")
        local = Path(str(getattr(model.config, "name_or_path", "") or "")).is_dir()
        fmt.verify_files(directory, qc, strict=local)
        check_skeleton(model, qc["layers"], directory / fmt.CONFIG_FILE)
        # transformers calls this inside its model-building contexts (default device "meta", default dtype the
        # requested one): the layers are built on the CPU, in fp32 wherever a dtype is not given
        with torch.device("cpu"), _default_dtype(torch.float32), fmt.TensorFiles(checkpoint_files) as files:
            fmt.verify_dense(qc, files)
            layers = fmt.read_layers(qc, files, mode=qc["runtime_mode"])
        for name in layers:
            set_module(model, name, _AwaitingLayer(name))
        self._pending = layers
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {fmt.unexpected_key_pattern(qc)}
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        for name, layer in self._pending.items():
            set_module(model, name, layer.to(_device_near(model, name)))
        self._pending = {}
        if self.quantization_config.runtime_mode == "auto":  # one decision for the model, not one per layer
            set_runtime_mode(model, "auto")
        drop_loader_reference(model.config)
        _allow_casts(model)
        return model

    # -- saving -------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        """The tensors `save_pretrained` writes, and a fresh quantization_config describing them (set on
        `model.config` before transformers writes config.json)."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state, described, ours = fmt.stored_state(model)
        if not described["layers"]:
            raise CheckpointError("the model has no ReALLM layers: run reallm.compress_ first")
        state = remove_tied_weights_from_state_dict(state, model)  # what transformers keeps of tied weights
        for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
            state.pop(key, None)
        as_written = _reverted(model, state)
        dense = {k: fmt.tensor_sha256(v) for k, v in as_written.items() if k not in ours}
        options, self.save_options = self.save_options, {}
        old = self.quantization_config
        qc = ReALLMConfig(
            layers=described["layers"], shared=described["shared"], dense=dense,
            files=options.get("files", {}), base_model=options.get("base_model", old.base_model),
            dtype=str(model.dtype).removeprefix("torch."), runtime_mode=old.runtime_mode,
            reallm_version=reallm_version(), extra=options.get("extra", old.extra),
        )
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            text = model.generation_config.to_json_string(use_diff=True, keys_to_pop=["compile_config"])
            qc.generation_config_sha256 = fmt.json_digest(json.loads(text))
        self.quantization_config = qc
        model.config.quantization_config = qc
        # what save_pretrained sets on the config right after this call, set now so that the seal covers it
        model.config.dtype = qc.dtype
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
        drop_loader_reference(model.config)
        if options.get("loader"):
            model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}),
                                     "AutoConfig": f"{LOADER_MODULE}.{LOADER_CLASS}"}
        written = json.loads(model.config.to_json_string(use_diff=True))  # what config.save_pretrained writes,
        written.pop("transformers_weights", None)  # which it removes first
        qc.config_sha256 = fmt.config_digest(written)
        # no metadata of ours: safetensors writes a header's metadata entries in a random order (a Rust
        # HashMap), so beyond transformers' single "format" entry the bytes would differ between two saves
        return state, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # the DoRA parameters (lora_A, lora_B, magnitude) train; the frozen part never does

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """`model.dequantize()`: every compressed linear becomes a plain nn.Linear with its effective weight."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        for name, layer in fmt.compressed_layers(model):
            dense = _conv1d(layer) if layer.layout == "conv1d" else layer.merge()
            set_module(model, name, dense.to(dtype) if dtype is not None else dense)
        return model


@torch.no_grad()
def _conv1d(layer: nn.Module) -> nn.Module:
    """GPT-2's layer type (weight stored (in, out)) with a compressed layer's effective weight and bias."""
    from transformers.pytorch_utils import Conv1D

    W = layer.dequantize()  # (p, q) fp32
    dense = Conv1D(layer.out_features, layer.in_features).to(W.device)
    dense.weight.copy_(W.T)
    dense.bias.copy_(layer.bias.float() if layer.bias is not None else torch.zeros_like(dense.bias))
    return dense


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _reverted(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the key renamings transformers applies when writing it (for the digests' names)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(state))


def check_skeleton(model: nn.Module, layers: dict[str, Any], where: Path) -> None:
    """Every recorded layer exists in the model built from config.json, as a linear of the recorded shape."""
    kind = f"{type(model).__name__} (model type {getattr(model.config, 'model_type', '?')!r})"
    for name, rec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: layer {name!r} does not exist in {kind}: this checkpoint cannot be "
                                  f"rebuilt in that architecture") from None
        if not is_linear(module):
            raise CheckpointError(f"{where}: layer {name!r} is a {type(module).__name__} in {kind}, not a linear "
                                  f"layer: this checkpoint cannot be rebuilt in that architecture")
        shape = list(linear_weight(module).shape)
        if shape != list(rec.get("shape", [])):
            raise CheckpointError(f"{where}: layer {name!r} has shape {rec.get('shape')} in the checkpoint and "
                                  f"{shape} in {kind}")


def _device_near(model: nn.Module, name: str) -> torch.device:
    """The device of the tensors next to module `name` (its parent's, or a further ancestor's)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:i]))
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def attach_quantizer(model: nn.Module, base_model: str | None = None) -> ReALLMHfQuantizer | None:
    """Give a Hugging Face model with ReALLM layers (from `compress_` or the version-1 loader) the `reallm`
    quantizer, as `from_pretrained` does, so that `model.save_pretrained(dir)` writes a ReALLM checkpoint.
    Returns the quantizer (None for a model that is not a `PreTrainedModel`).

    Args:
        model: the model.
        base_model: the uncompressed model it comes from (default: its config's name_or_path).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    current = getattr(model, "hf_quantizer", None)
    if isinstance(current, ReALLMHfQuantizer):
        return current
    if current is not None:
        method = current.quantization_config.quant_method
        raise UserError(f"the model is already quantized with {getattr(method, 'value', method)!r}: ReALLM "
                        f"compresses an unquantized model")
    base = base_model or getattr(model.config, "_name_or_path", None) or None
    quantizer = ReALLMHfQuantizer(ReALLMConfig(base_model=base, dtype=str(model.dtype).removeprefix("torch.")),
                                  pre_quantized=True)
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    model.quantization_method = fmt.QUANT_METHOD
    _allow_casts(model)
    return quantizer


def _allow_casts(model: nn.Module) -> None:
    """transformers refuses `.half()` / `.float()` on a model whose `is_quantized` is set (in 5.23 that is all
    the flag does); ReALLM layers support dtype casts (their stored tensors ignore them, `reallm.layer.linear`),
    so the flag stays off: the model is told apart by `hf_quantizer` / `quantization_method`."""
    model.is_quantized = False


def _register() -> None:
    """Register the config class and the quantizer with transformers (once per process)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(fmt.QUANT_METHOD) is not ReALLMConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(fmt.QUANT_METHOD, None)  # a reloaded module's older classes
        register_quantization_config(fmt.QUANT_METHOD)(ReALLMConfig)
    if AUTO_QUANTIZER_MAPPING.get(fmt.QUANT_METHOD) is not ReALLMHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(fmt.QUANT_METHOD, None)
        register_quantizer(fmt.QUANT_METHOD)(ReALLMHfQuantizer)


_register()
