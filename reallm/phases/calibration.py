"""Calibration statistics of calibration-aware phase 1: every compressed linear's input second moments.

For each selected linear y = W x, over every token of a few calibration windows:

    h = E[x²]   (q,)       always (the diagonal: what weighted VQ needs, 4·q bytes)
    H = E[x xᵀ] (q, q)     when q ≤ full_max (the AQLM output error tr((W − Ŵ) H (W − Ŵ)ᵀ) exactly)

accumulated by forward pre-hooks on the *base* model, batch by batch, in float64 sums on the activations'
device: nothing but the running sums (q or q² values per layer) is kept, never the activations. The sums
are taken in a fixed order (windows in order, one batch at a time) and in float64, so the result does not
depend on the batch size beyond float64 rounding (tests/test_calibration.py). With full_max = 1024 (the
default) stories260K (q = 64 / 172) gets every full matrix; a 7B model (q = 4096 / 11008) gets the diagonal
only (its full matrices would take 224 × 4096² × 4 bytes = 15 GB; raise full_max where that fits).

No Lightning: the phase-1 modules (`reallm.phases.compress`) call `input_second_moments` with the windows
of a text datamodule and keep the result in their run directory (`save_moments` / `load_moments`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reallm.core.hf_models import linear_weight, model_device
from reallm.core.io import atomic_save_safetensors

__all__ = ["CalibrationConfig", "InputMoments", "describe", "input_second_moments", "load_moments",
           "save_moments", "windows_digest"]


@dataclass
class CalibrationConfig:
    """Calibration-aware phase 1: weight the quantizer and the adaptive choice by the layers' inputs.

    Args:
        path: calibration text: a local file (.txt, .json/.jsonl, .parquet), "wikitext2", "c4" (train
            shard 00000) or a Hugging Face dataset id, as the text datamodule's train_path.
        windows: calibration sequences N (random windows of seq_len tokens, sampled with `seed`).
        seq_len: tokens per window (None: the model's context, at most 2048).
        batch_size: windows per forward pass while accumulating (the result does not depend on it).
        full_max: keep the full q × q matrix E[x xᵀ] for inputs of width q ≤ full_max (else the diagonal only).
        seed: seed of the window sampling.
        cache_dir: token-window cache of the text datamodule (default ~/.cache/reallm/tokens).
    """

    path: str = ""
    windows: int = 128
    seq_len: int | None = None
    batch_size: int = 8
    full_max: int = 1024
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("calibration.path: give the calibration text (a file, wikitext2, c4, or a hub id)")
        if self.windows < 1 or self.batch_size < 1:
            raise ValueError(f"calibration.windows and calibration.batch_size must be ≥ 1, got "
                             f"{self.windows} and {self.batch_size}")
        if self.full_max < 0:
            raise ValueError(f"calibration.full_max must be ≥ 0, got {self.full_max}")


@dataclass
class InputMoments:
    """The result: layer name → E[x xᵀ] (q, q) or E[x²] (q,) in fp32 (float64 sums divided by `tokens`),
    the number of tokens and windows they were taken over, and a description for results.json."""

    moments: dict[str, Tensor]
    tokens: int
    windows: int
    info: dict[str, Any] = field(default_factory=dict)

    def kind(self, name: str) -> str:
        return "full" if self.moments[name].dim() == 2 else "diagonal"


class _Accumulator:
    """Running float64 sums of x² (q,) and x xᵀ (q, q) of one linear's inputs."""

    def __init__(self, q: int, full: bool) -> None:
        self.q, self.full = q, full
        self.diag: Tensor | None = None
        self.outer: Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        flat = x.detach().reshape(-1, self.q).to(torch.float64)  # (tokens, q)
        if self.diag is None:
            self.diag = torch.zeros(self.q, dtype=torch.float64, device=flat.device)
            if self.full:
                self.outer = torch.zeros(self.q, self.q, dtype=torch.float64, device=flat.device)
        self.diag += (flat * flat).sum(dim=0)
        if self.full:
            self.outer += flat.T @ flat
        self.count += flat.shape[0]

    def result(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("calibration: a selected linear never ran in the forward pass")
        total = self.outer if self.full else self.diag
        return (total / self.count).to(torch.float32).cpu()


@torch.no_grad()
def input_second_moments(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Tensor],
    *,
    full_max: int = 1024,
) -> InputMoments:
    """Second moments of the inputs of the linears `names` of `model` over the token windows of `batches`.

    Args:
        model: the (uncompressed) causal LM, on the device the pass runs on.
        names: the linears (nn.Linear or GPT-2 Conv1D) whose inputs are measured.
        batches: LongTensor windows (B, L) (or dicts with "input_ids"), consumed one batch at a time.
        full_max: the full (q, q) matrix for q ≤ full_max, the diagonal (q,) otherwise.
    Returns:
        InputMoments (fp32 tensors on the CPU).
    """
    accs: dict[str, _Accumulator] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        q = linear_weight(module).shape[1]
        accs[name] = _Accumulator(q, q <= full_max)
        handles.append(module.register_forward_pre_hook(accs[name]))
    was_training = model.training
    model.eval()
    device = model_device(model)
    windows = tokens = 0
    try:
        for batch in batches:
            ids = (batch if isinstance(batch, Tensor) else batch["input_ids"]).long()
            model(input_ids=ids.to(device), use_cache=False)
            windows += ids.shape[0]
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if windows == 0:
        raise ValueError("calibration: no window (the calibration text gave no sequence)")
    moments = {name: acc.result() for name, acc in accs.items()}
    return InputMoments(moments, tokens, windows)


def windows_digest(windows: Tensor) -> str:
    """A short SHA-256 of the calibration windows (N, L), which identifies the statistics they give."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def save_moments(path: str | Path, result: InputMoments, key: dict[str, Any]) -> None:
    """Write the statistics atomically (safetensors; `key` and the counts in its metadata)."""
    meta = {"key": json.dumps(key, sort_keys=True), "tokens": str(result.tokens), "windows": str(result.windows),
            "info": json.dumps(result.info, sort_keys=True, default=str)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.contiguous() for k, v in result.moments.items()}, path, metadata=meta)


def load_moments(path: str | Path, key: dict[str, Any]) -> InputMoments | None:
    """The statistics saved at `path` when they were computed for the same `key` (None otherwise)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("key") != json.dumps(key, sort_keys=True):
                return None
            moments = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return None  # an unreadable file is recomputed
    return InputMoments(moments, int(meta["tokens"]), int(meta["windows"]), json.loads(meta.get("info", "{}")))


def describe(config: CalibrationConfig, result: InputMoments, digest: str) -> dict[str, Any]:
    """What results.json records of the calibration (`calibration: {...}`)."""
    kinds = [result.kind(n) for n in result.moments]
    return {**asdict(config), "tokens": result.tokens, "windows_used": result.windows, "windows_sha256": digest,
            "full_matrices": kinds.count("full"), "diagonal_only": kinds.count("diagonal"),
            "statistic": "E[x x^T] per compressed linear (full for q <= full_max, else its diagonal)",
            "weighted": "VQ codebooks and codes (weighted k-means / assignment); the adaptive choice's error "
                        "term is the relative output error; NF/RTN codes unchanged (nearest level is weight-free)"}
