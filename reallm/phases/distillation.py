"""Teacher distillation of phase 3 (no Lightning): the KL loss, the teacher's targets, their cache on disk.

Loss (per next-token position t of a window, the L − 1 positions the causal-LM loss uses):

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v),   p = softmax(z_teacher / T),  q = softmax(z_student / T)

averaged over positions and multiplied by T² (Hinton et al., 2015: the gradients keep their scale when T
changes). With the teacher's top-k tokens only (`topk`), p and q are compared on the k tokens plus one
bucket holding the rest of the mass (1 − Σ_k p, 1 − Σ_k q): an exact KL of the coarsened distributions,
zero when the student matches the teacher, and the full KL for k = V.

Teacher targets are the teacher's log-probabilities at T: `TeacherTargets` (full (B, L − 1, V), or top-k
values (B, L − 1, k) with their token ids). `TeacherLogitCache` keeps them on disk for small runs, one row
per training window, computed once: fp16 log-probabilities (2 bytes per value) and, for top-k, int16 token
ids (int32 when V > 32767), memory-mapped, i.e. N × (L − 1) × k × 4 bytes for top-k with int16 ids
(2048 windows of 512 tokens, k = 64: 268 MB) or N × (L − 1) × V × 2 bytes in full. Its directory name is a
hash of the teacher, the windows, T, k and the storage, so that another window set or setting gets another
cache and the same one is reused; rows are found by the windows' tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reallm.core.errors import UserError
from reallm.core.io import atomic_write_json

__all__ = ["TeacherLogitCache", "TeacherTargets", "kl_to_teacher", "teacher_targets"]

_CACHE_VERSION = 1


@dataclass
class TeacherTargets:
    """The teacher's log-probabilities at temperature T for positions 0 .. L − 2 of each window.

    logprobs: (B, L − 1, V) full, or (B, L − 1, k) for the top-k tokens `indices` (B, L − 1, k) int64.
    """

    logprobs: Tensor
    indices: Tensor | None = None

    def to(self, device: torch.device | str) -> TeacherTargets:
        return TeacherTargets(self.logprobs.to(device), None if self.indices is None else self.indices.to(device))


def teacher_targets(teacher_logits: Tensor, temperature: float = 1.0, topk: int | None = None) -> TeacherTargets:
    """Targets from the teacher's logits (B, L, V): log-softmax at T of the first L − 1 positions, all V
    tokens (topk None or ≥ V) or the k most probable."""
    z = teacher_logits[:, :-1].float() / temperature  # (B, L − 1, V)
    logp = torch.log_softmax(z, dim=-1)
    if topk is None or topk >= logp.shape[-1]:
        return TeacherTargets(logp)
    values, indices = torch.topk(logp, topk, dim=-1)  # (B, L − 1, k)
    return TeacherTargets(values, indices)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable (Mächler's two branches), floored at log(1e-7): the rest bucket of a
    top-k distribution never has exactly zero mass, so that neither the value nor its gradient is infinite.
    Each branch sees only its own inputs (torch.where would otherwise pass the other branch's inf gradient)."""
    x = x.clamp(max=-1e-7)
    near = x > -0.6931  # −ln 2
    other = torch.full_like(x, -1.0)
    a = torch.log(-torch.expm1(torch.where(near, x, other)))
    b = torch.log1p(-torch.exp(torch.where(near, other, x)))
    return torch.where(near, a, b)


def kl_to_teacher(student_logits: Tensor, targets: TeacherTargets, temperature: float = 1.0) -> Tensor:
    """Mean over positions of KL(teacher ‖ student) at temperature T, times T² (see the module docstring).

    Args:
        student_logits: (B, L, V) logits of the student (the last position is not used).
        targets: the teacher's `TeacherTargets` for the same windows.
        temperature: T.
    """
    logq = torch.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)  # (B, L − 1, V)
    logp = targets.logprobs.float()
    if targets.indices is None:
        kl = F.kl_div(logq, logp, reduction="none", log_target=True).sum(dim=-1)  # (B, L − 1)
    else:
        logq_k = torch.gather(logq, -1, targets.indices)  # (B, L − 1, k)
        p_k = logp.exp()
        kl_k = (p_k * (logp - logq_k)).sum(dim=-1)  # (B, L − 1)
        # the rest bucket: p_r log(p_r / q_r) with p_r = 1 − Σ_k p, q_r = 1 − Σ_k q (0 log 0 = 0)
        log_pr = _log1mexp(torch.logsumexp(logp, dim=-1))
        log_qr = _log1mexp(torch.logsumexp(logq_k, dim=-1))
        p_r = log_pr.exp()
        kl = kl_k + torch.where(p_r > 0, p_r * (log_pr - log_qr), torch.zeros_like(p_r))
    return kl.mean() * temperature**2


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
def _model_identity(source: str) -> dict[str, Any]:
    """What identifies the teacher: its path (resolved) and, for a local directory, its weight files' sizes and
    modification times (a hub id is identified by itself)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"model": source}
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return {"model": str(path.resolve()), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _window_key(window: Tensor) -> bytes:
    return hashlib.blake2b(window.to(torch.int64).contiguous().numpy().tobytes(), digest_size=16).digest()


class TeacherLogitCache:
    """The teacher's targets for every training window, on disk (memory-mapped), computed once.

    Args:
        root: the caches' directory (each cache is a sub-directory named by its key).
        windows: the training windows (N, L), LongTensor; row i of the cache is window i.
        teacher: the teacher model's identity (`model_source()`: a hub id or a directory).
        vocab: V.
        temperature: T of the stored log-probabilities.
        topk: the k most probable tokens per position (None or ≥ V: all V).
    """

    def __init__(self, root: str | os.PathLike, windows: Tensor, teacher: str, vocab: int, temperature: float,
                 topk: int | None) -> None:
        self.windows = windows.long()
        self.n, self.seq_len = (int(s) for s in self.windows.shape)
        self.vocab = int(vocab)
        self.topk = None if topk is None or topk >= vocab else int(topk)
        self.temperature = float(temperature)
        self.index_dtype = torch.int16 if self.vocab <= 32767 else torch.int32
        identity = {"version": _CACHE_VERSION, "teacher": _model_identity(teacher),
                    "windows": hashlib.sha256(self.windows.contiguous().numpy().tobytes()).hexdigest(),
                    "temperature": self.temperature, "topk": self.topk, "vocab": self.vocab, "values": "float16",
                    "indices": str(self.index_dtype).replace("torch.", "") if self.topk else None}
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
        self.identity = identity
        self.dir = Path(root).expanduser() / self.key
        self._rows = {}
        for i in range(self.n):
            self._rows.setdefault(_window_key(self.windows[i]), i)
        self._values: Tensor | None = None
        self._indices: Tensor | None = None

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.topk or self.vocab

    @property
    def nbytes(self) -> int:
        """Bytes on disk: fp16 log-probabilities, plus the token ids for top-k."""
        per = 2 + (torch.empty(0, dtype=self.index_dtype).element_size() if self.topk else 0)
        return self.n * (self.seq_len - 1) * self.k * per

    def describe(self) -> dict[str, Any]:
        stored = (f"top-{self.topk} teacher log-probabilities at T={self.temperature:g} (fp16) and their token ids "
                  f"({str(self.index_dtype).replace('torch.', '')}) per position" if self.topk else
                  f"all {self.vocab} teacher log-probabilities at T={self.temperature:g} (fp16) per position")
        return {"dir": str(self.dir), "windows": self.n, "positions_per_window": self.seq_len - 1,
                "stored": stored, "bytes": self.nbytes}

    def check_size(self, max_bytes: float) -> None:
        """UserError (one line) when the cache would exceed `max_bytes`."""
        if self.nbytes > max_bytes:
            raise UserError(f"the teacher logit cache would take {self.nbytes / 1e9:.2f} GB ({self.n} windows × "
                            f"{self.seq_len - 1} positions × {self.k} values) > the limit of {max_bytes / 1e9:.2f} GB: "
                            f"use a smaller --model.init_args.teacher_topk, fewer training windows, "
                            f"--model.init_args.teacher stream, or raise --model.init_args.teacher_cache_max_gb")

    # -- files -----------------------------------------------------------------------------------
    def exists(self) -> bool:
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return meta.get("identity") == self.identity and meta.get("complete") is True

    def _arrays(self, directory: Path, create: bool) -> tuple[Tensor, Tensor | None]:
        shape = (self.n, self.seq_len - 1, self.k)
        numel = self.n * (self.seq_len - 1) * self.k

        def mapped(name: str, dtype: torch.dtype) -> Tensor:
            path = directory / name
            if create:
                with open(path, "wb") as f:
                    f.truncate(numel * torch.empty(0, dtype=dtype).element_size())
            return torch.from_file(str(path), shared=create, size=numel, dtype=dtype).view(shape)

        values = mapped("logprobs.bin", torch.float16)
        indices = mapped("indices.bin", self.index_dtype) if self.topk else None
        return values, indices

    @torch.no_grad()
    def build(self, teacher_logits: Callable[[Tensor], Tensor], batch_size: int) -> None:
        """Compute every row with `teacher_logits` (windows (b, L) → logits (b, L, V)) and publish the cache
        atomically (a temporary directory renamed into place; a concurrent builder's result is kept)."""
        tmp = self.dir.with_name(f".{self.key}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            values, indices = self._arrays(tmp, create=True)
            for s in range(0, self.n, batch_size):
                t = teacher_targets(teacher_logits(self.windows[s:s + batch_size]), self.temperature, self.topk)
                values[s:s + batch_size] = t.logprobs.to("cpu", torch.float16)
                if indices is not None:
                    indices[s:s + batch_size] = t.indices.to("cpu", self.index_dtype)
            del values, indices
            atomic_write_json(tmp / "meta.json", {"identity": self.identity, "complete": True, **self.describe()})
            try:
                os.replace(tmp, self.dir)
            except OSError:  # another process published the same cache first
                if not self.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def open(self) -> None:
        """Map the finished cache read-only."""
        if not self.exists():
            raise UserError(f"teacher logit cache {self.dir} is missing or incomplete")
        self._values, self._indices = self._arrays(self.dir, create=False)

    def lookup(self, ids: Tensor) -> TeacherTargets:
        """The cached targets of the windows `ids` (B, L), found by their tokens; UserError for a window the cache
        was not built for."""
        if self._values is None:
            self.open()
        if ids.shape[1] != self.seq_len:
            raise UserError(f"teacher cache: windows of {ids.shape[1]} tokens, the cache holds {self.seq_len}")
        rows = []
        for w in ids.cpu():
            row = self._rows.get(_window_key(w))
            if row is None:
                raise UserError("teacher cache: a training window is not among the windows the cache was built for")
            rows.append(row)
        index = torch.tensor(rows)
        values = self._values[index].float()  # (B, L − 1, k)
        indices = self._indices[index].long() if self._indices is not None else None
        return TeacherTargets(values, indices)
