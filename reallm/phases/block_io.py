"""Plain helpers of the block-wise phase (no Lightning): block capture, block calls, teacher loading.

- `capture_block_inputs(model, windows)`: the hidden states entering decoder block 0 and the
  keyword arguments the model passes to every block (rotary `position_embeddings`, the causal
  `attention_mask`, `position_ids`, ...), recorded by a forward pre-hook on block 0 that stops
  the forward there (nothing after the embeddings runs).
- `call_block(block, hidden, call)`: a block called as the model calls it, on any batch size.
- `load_teacher_block(source, index, config, prefix, like=student_block)`: decoder block
  `index` of the *original* model, its tensors read one by one from the base model's safetensors
  (`safetensors.safe_open`): the original model is never loaded whole.
- `ActivationCache`: (N, L, H) activations in CPU memory or memory-mapped on disk, bf16 / fp32;
  `check_activation_cache_fits` refuses, before anything is computed, a cache the host cannot hold.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reallm.core.errors import UserError
from reallm.core.hf_models import model_device, resolve_safetensors

__all__ = [
    "ActivationCache",
    "activation_cache_bytes",
    "available_memory_bytes",
    "check_activation_cache_fits",
    "BlockCall",
    "call_block",
    "capture_block_inputs",
    "iter_batches",
    "load_teacher_block",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------
@dataclass
class BlockCall:
    """How the model calls its decoder blocks: extra positional args and keyword args.

    Captured from a batch of one sequence, so every tensor in it has batch dimension 1 (or none)
    and broadcasts over any batch of sequences of the same length L.
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BlockCall:
        def move(o):
            if isinstance(o, Tensor):
                if dtype is not None and o.is_floating_point():
                    return o.to(device=device, dtype=dtype)
                return o.to(device)
            if isinstance(o, tuple):
                return tuple(move(v) for v in o)
            if isinstance(o, list):
                return [move(v) for v in o]
            if isinstance(o, dict):
                return {k: move(v) for k, v in o.items()}
            return o

        return BlockCall(move(self.args), move(self.kwargs))


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at block 0."""


_NO_CACHE = {"past_key_values": None, "past_key_value": None, "layer_past": None, "use_cache": False}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    windows: Iterable[Tensor],
    out: ActivationCache | None = None,
    *,
    cache_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor | ActivationCache, BlockCall]:
    """The inputs of `block` (the first decoder block) for every window, and the block's call.

    Args:
        model: the causal LM (compressed or not; only what runs before block 0 is used).
        block: its first decoder block.
        windows: batches of token windows, LongTensor (B, L), all of the same L.
        out: an ActivationCache of shape (N, L, H) to fill in order; None returns one tensor.
        cache_dtype: dtype of the returned tensor when `out` is None.
    Returns:
        (hidden states (N, L, H) or `out`, BlockCall with the extra args / kwargs of the blocks).
    """
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen["hidden"] = hidden
        seen["args"] = tuple(args[1:])
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    def run(ids: Tensor) -> Tensor:
        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(input_ids=ids.to(model_device(model)), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "hidden" not in seen:
            raise RuntimeError("block capture: the model never called its first decoder block")
        return seen["hidden"]

    was_training = model.training
    model.eval()
    call: BlockCall | None = None
    chunks: list[Tensor] = []
    row = 0
    try:
        for ids in windows:
            ids = ids if isinstance(ids, Tensor) else ids["input_ids"]
            ids = ids.long()
            if call is None:  # the block kwargs, from a batch of one sequence (broadcastable)
                run(ids[:1])
                kwargs = {**seen["kwargs"], **{k: v for k, v in _NO_CACHE.items() if k in seen["kwargs"]}}
                call = BlockCall(seen["args"], kwargs).to("cpu")
            hidden = run(ids).detach()  # (B, L, H)
            if out is not None:
                out.write(row, hidden)
            else:
                chunks.append(hidden.to("cpu", cache_dtype))
            row += hidden.shape[0]
    finally:
        model.train(was_training)
    if call is None:
        raise UserError("no calibration sequence: the training dataloader is empty")
    if out is not None:
        if row != out.n:
            raise RuntimeError(f"block capture: {row} sequences captured, the cache holds {out.n}")
        return out, call
    return torch.cat(chunks), call


def call_block(block: nn.Module, hidden: Tensor, call: BlockCall) -> Tensor:
    """block(hidden, *args, **kwargs) as the model calls it; the hidden-state output (B, L, H)."""
    out = block(hidden, *call.args, **call.kwargs)
    if isinstance(out, tuple | list):
        out = out[0]
    elif hasattr(out, "hidden_states") and not isinstance(out, Tensor):
        out = out[0]
    return out


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


# ---------------------------------------------------------------------------------------------
# activation cache
# ---------------------------------------------------------------------------------------------
class ActivationCache:
    """N activations of shape (L, H), in CPU memory or memory-mapped from a file, at `dtype`.

    `read(rows)` returns fp32 rows on the requested device; `write(start, x)` stores rows.
    On disk the file is a raw array (`torch.from_file(..., shared=True)`), so only the rows in use
    are paged in: GPU memory holds one block and one micro-batch, CPU memory what the OS caches.
    """

    def __init__(self, n: int, seq_len: int, hidden: int, dtype: torch.dtype = torch.float32,
                 path: str | os.PathLike | None = None) -> None:
        self.n, self.seq_len, self.hidden, self.dtype = n, seq_len, hidden, dtype
        self.path = Path(path) if path is not None else None
        numel = n * seq_len * hidden
        if self.path is None:
            self.data = torch.empty(n, seq_len, hidden, dtype=dtype)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)  # never reuse stale contents
            with open(self.path, "wb") as f:
                f.truncate(numel * torch.empty(0, dtype=dtype).element_size())
            self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(
                n, seq_len, hidden)

    def read(self, rows: slice | Tensor, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Tensor:
        return self.data[rows].to(device=device, dtype=dtype, non_blocking=False)  # (b, L, H)

    def write(self, start: int, x: Tensor) -> None:
        self.data[start:start + x.shape[0]] = x.detach().to("cpu", self.dtype)

    def write_rows(self, rows: slice, x: Tensor) -> None:
        self.data[rows] = x.detach().to("cpu", self.dtype)

    def close(self) -> None:
        self.data = torch.empty(0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return self.n


def activation_cache_bytes(n: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the block-wise phase's two caches, inputs and targets: N × L × H × element size × 2
    (e.g. 1024 × 4096 × 4096 × 4 bytes × 2 = 137 GB in fp32, half that in bf16)."""
    return 2 * n * seq_len * hidden * torch.empty(0, dtype=dtype).element_size()


def available_memory_bytes() -> int | None:
    """Memory the host can still give this process (Linux `MemAvailable`, through psutil when it is
    installed); None when it cannot be told."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk_bytes(directory: str | os.PathLike) -> int:
    """Free bytes on the file system of `directory` (its nearest existing parent)."""
    d = Path(directory).absolute()
    while not d.exists():
        d = d.parent
    return shutil.disk_usage(d).free


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_activation_cache_fits(n: int, seq_len: int, hidden: int, dtype: torch.dtype,
                                directory: str | os.PathLike | None = None) -> int:
    """Refuse (UserError, one line) a block-wise activation cache the host cannot hold; its bytes otherwise.

    Args:
        n: calibration sequences N.
        seq_len: tokens per sequence L.
        hidden: hidden size H of the model.
        dtype: storage dtype of the cache.
        directory: where the disk cache lives (`cache: disk`); None: CPU memory (`cache: cpu`).
    """
    need = activation_cache_bytes(n, seq_len, hidden, dtype)
    what = (f"{n} sequences × {seq_len} tokens × {hidden} hidden × {torch.empty(0, dtype=dtype).element_size()} "
            f"bytes ({str(dtype).replace('torch.', '')}) × 2 for inputs and targets")
    if directory is None:
        have = available_memory_bytes()
        if have is not None and need > have:
            raise UserError(f"the block-wise activation cache needs {_size(need)} ({what}) but the host has "
                            f"{_size(have)} of memory available: use --model.init_args.cache disk, "
                            f"--model.init_args.cache_dtype bfloat16 (if not already), or fewer sequences "
                            f"(--data.init_args.train_sequences)")
    else:
        have = free_disk_bytes(directory)
        if need > have:
            raise UserError(f"the block-wise activation cache needs {_size(need)} ({what}) but {directory} has "
                            f"{_size(have)} free: use --model.init_args.activation_dir on a larger disk, "
                            f"--model.init_args.cache_dtype bfloat16 (if not already), or fewer sequences "
                            f"(--data.init_args.train_sequences)")
    return need


# ---------------------------------------------------------------------------------------------
# teacher loading
# ---------------------------------------------------------------------------------------------
def _block_key_prefixes(prefix: str, index: int, base_model_prefix: str | None) -> list[str]:
    # "model.layers" → "model.layers.3."; checkpoints of the bare base model (GPT-2's "h.3.") drop
    # the head model's attribute prefix
    out = [f"{prefix}.{index}."]
    if base_model_prefix and prefix.startswith(base_model_prefix + "."):
        out.append(f"{prefix[len(base_model_prefix) + 1:]}.{index}.")
    return out


def _init_context():
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # pragma: no cover - other transformers versions
        return contextlib.nullcontext()


def build_block(like: nn.Module, config, index: int) -> nn.Module:
    """A fresh (uninitialised) block of the same class as `like`, for layer `index`.

    The call is chosen from the constructor's signature, so that a TypeError raised *inside* the
    constructor (a real bug) surfaces as it is:

    - a `layer_idx` parameter (Hugging Face decoder layers): `cls(config, layer_idx=index)`;
    - a second positional parameter that is required or names a layer index: `cls(config, index)`;
    - otherwise `cls(config)`.
    """
    cls = type(like)
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature (e.g. a C extension type)
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in params)
    if not positional and not var_positional:
        raise UserError(f"cannot build a teacher block: the constructor of {cls.__name__} takes no model config "
                        f"(or its signature cannot be read)")
    with _init_context():
        if any(p.name == "layer_idx" and p.kind != p.POSITIONAL_ONLY for p in params):
            return cls(config, layer_idx=index)
        if len(positional) >= 2:
            second = positional[1]
            if second.default is inspect.Parameter.empty or any(
                    word in second.name for word in ("layer", "idx", "index")):
                return cls(config, index)
        return cls(config)


@torch.no_grad()
def load_teacher_block(
    source: str | dict[str, Path],
    index: int,
    config,
    prefix: str,
    *,
    like: nn.Module,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    base_model_prefix: str | None = "model",
) -> nn.Module:
    """Decoder block `index` of the original model, read tensor by tensor from its safetensors.

    Args:
        source: the base model (directory or hub id), or its `resolve_safetensors` map.
        index: the block index.
        config: the model's Hugging Face config (the compressed model's `config`).
        prefix: the blocks' module path in the model ("model.layers", "transformer.h").
        like: a block of the model (its class is used; e.g. the compressed student block).
        device: where the block is built (only this block is ever resident there).
        dtype: dtype of the teacher's floating tensors (None keeps the stored dtype).
        base_model_prefix: the model's `base_model_prefix` (for checkpoints of the bare model).
    Returns:
        the block, in eval mode, with no parameter requiring a gradient.
    """
    from safetensors import safe_open

    files = resolve_safetensors(source) if isinstance(source, str) else source
    block = build_block(like, config, index)
    expected = block.state_dict()
    key_prefix = next((kp for kp in _block_key_prefixes(prefix, index, base_model_prefix)
                       if any(k.startswith(kp) for k in files)), None)
    if key_prefix is None:
        raise UserError(f"base model has no tensors for block {index} (looked for '{prefix}.{index}.*')")
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        full = key_prefix + k
        if full not in files:
            raise UserError(f"base model: tensor {full!r} of block {index} is missing from its safetensors")
        by_file.setdefault(files[full], []).append(k)
    state: dict[str, Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in keys:
                t = f.get_tensor(key_prefix + k)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                state[k] = t
    block.load_state_dict(state, strict=True)
    block.to(device=device)
    if dtype is not None:
        block.to(dtype=dtype)
    block.eval().requires_grad_(False)
    return block
