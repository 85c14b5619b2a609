"""Hugging Face models at the bottom of the project: loading (model, tokenizer, single tensors from the
base model's safetensors), and their structure (linear layers, the stack of decoder blocks, swapping a
module). Nothing here imports the rest of the project but `reallm.core.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from reallm.core.errors import UnsupportedModelError, UserError

try:  # GPT-2 style layers: weight stored (in, out), y = x W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

__all__ = [
    "clean_name",
    "decoder_block_index",
    "find_decoder_blocks",
    "has_tokenizer",
    "is_linear",
    "linear_weight",
    "load_hf_model",
    "load_tokenizer",
    "maybe_tokenizer",
    "model_context",
    "model_device",
    "read_weight",
    "resolve_safetensors",
    "set_module",
]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_hf_model(model_name_or_path: str, dtype: str | None = None) -> nn.Module:
    """A Hugging Face causal LM from a hub id or a local directory, with a clear error.
    `dtype`: "float32", "bfloat16", ...; None or "auto" keeps the checkpoint's own dtype."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)} if dtype and dtype != "auto" else {"dtype": "auto"}
    try:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {model_name_or_path!r}: {first}") from None


def load_tokenizer(model_name_or_path: str | None):
    """``AutoTokenizer.from_pretrained(model_name_or_path)`` with a clear error when no model is given."""
    if not model_name_or_path:
        raise ValueError(
            "no tokenizer: set model_name_or_path (a Hugging Face model id or a local model directory "
            "with its tokenizer, e.g. ../shared/models/stories260K)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_name_or_path)


def maybe_tokenizer(*sources: str | None):
    """The tokenizer of the first source that has one (saved beside a checkpoint), or None."""
    from transformers import AutoTokenizer

    for source in sources:
        if not source:
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    return None


def has_tokenizer(directory: str | Path) -> bool:
    """Whether a directory holds a saved Hugging Face tokenizer (its tokenizer_config.json or tokenizer.json)."""
    d = Path(directory)
    return (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context(model_name_or_path: str | None) -> int | None:
    """The context length of a model (its config's ``max_position_embeddings``, or ``n_positions`` etc.),
    read from its Hugging Face config (a hub id, a model directory or a ReALLM checkpoint directory);
    None when there is no readable config or it names no context."""
    if not model_name_or_path:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError, KeyError):
        return None
    if hasattr(config, "get_text_config"):  # multimodal configs keep the language model's apart
        config = config.get_text_config()
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_safetensors(source: str) -> dict[str, Path]:
    """tensor name → safetensors file of the base model (a local directory or a hub id).

    Handles single files (`model.safetensors`) and sharded ones (`model.safetensors.index.json`).
    A hub id is resolved with huggingface_hub (files downloaded to its cache, as transformers does).
    """
    d = Path(source).expanduser()
    index_name, single_name = "model.safetensors.index.json", "model.safetensors"
    unreachable: list[str] = []  # hub files neither cached nor downloadable (offline)
    if d.is_dir():
        fetch = lambda name: d / name if (d / name).is_file() else None  # noqa: E731
    else:
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
        except ImportError as e:  # pragma: no cover
            raise UserError(f"cannot resolve base model {source!r}: huggingface_hub missing ({e})") from None

        def fetch(name: str) -> Path | None:
            try:
                return Path(hf_hub_download(source, name))
            except LocalEntryNotFoundError:  # offline and not in the cache: unknown whether it exists
                unreachable.append(name)
                return None
            except EntryNotFoundError:
                return None
            except Exception as e:  # unknown repo, gated, ...
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot fetch {name} of base model {source!r}: {first}") from None

    index = fetch(index_name)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {f: fetch(f) for f in sorted(set(weight_map.values()))}
        missing = [f for f, p in files.items() if p is None]
        if missing:
            raise UserError(f"base model {source!r}: shard {missing[0]} listed in {index_name} is missing")
        return {k: files[f] for k, f in weight_map.items()}
    single = fetch(single_name)
    if single is None and unreachable:
        raise UserError(f"base model {source!r}: {single_name} is not in the local Hugging Face cache and "
                        f"the Hub cannot be reached")
    if single is None:
        raise UserError(f"base model {source!r} has no {single_name} (block-wise distillation reads the "
                        f"original blocks from safetensors files)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: Path(single) for k in f.keys()}



def read_weight(source: str, name: str, layout: str = "linear") -> torch.Tensor | None:
    """One original weight (p, q), fp32, read from the base model's safetensors (nothing else is
    loaded); None when the base model or the tensor cannot be read."""
    from safetensors import safe_open

    try:
        files = resolve_safetensors(source)
    except (UserError, OSError, ValueError):
        return None
    key = f"{name}.weight"
    for k in [key] + [k for k in files if k.endswith(key)]:
        if k in files:
            with safe_open(str(files[k]), framework="pt") as f:
                W = f.get_tensor(k).float()
            return W.T.contiguous() if layout == "conv1d" else W
    return None


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a plain dense layer, before compression)."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def _is_linear_like(module: nn.Module) -> bool:
    # a dense layer, or any module with nn.Linear's interface (a compressed linear keeps it)
    return is_linear(module) or (isinstance(getattr(module, "in_features", None), int)
                                 and isinstance(getattr(module, "out_features", None), int))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear layout (out × in), whatever the layer type."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.T  # Conv1D keeps (in, out)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, blocks): the ModuleList holding the transformer blocks (model.model.layers, transformer.h,
    ...), compressed or not.

    Found structurally: the longest nn.ModuleList whose length equals `config.num_hidden_layers` (any
    length without a config) and whose first block contains a linear layer (dense or compressed).
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        if not any(_is_linear_like(m) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        kind = type(model).__name__
        raise UnsupportedModelError(
            f"unsupported architecture {kind}: no list of decoder blocks with linear layers was found"
        )
    return best


def decoder_block_index(name: str, blocks_prefix: str | None = None) -> int | None:
    """The decoder block a module name belongs to: the component after `blocks_prefix` when the name is
    inside the blocks (`model.layers.3.self_attn.q_proj` → 3), else (or without a prefix, e.g. for names read
    from results.json) the first integer component of the name; None when there is none (`lm_head`)."""
    if blocks_prefix and name.startswith(blocks_prefix + "."):
        head = name[len(blocks_prefix) + 1:].split(".")[0]
        if head.isdigit():
            return int(head)
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_forward_module.")


def clean_name(name: str) -> str:
    """A parameter or module name without the parts FSDP, activation checkpointing, torch.compile and
    Lightning's module wrapper insert (`_fsdp_wrapped_module.model.layers.0...` → `model.layers.0...`)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule `name` (dotted path) of `model` by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
