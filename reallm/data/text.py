"""The text datamodule: protocol windows (`reallm.eval`) served to Lightning, and their token cache.

Evaluation windows follow ``docs/protocol.md`` (the WikiText and C4 rules,
`reallm.data.windows`); training windows are calibration samples from the same module. Every source's
windows are built once per (data, tokenizer, rule, L, seed, counts) and cached under ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from reallm.core.errors import UserError
from reallm.core.hf_models import load_tokenizer, model_context
from reallm.data.base import BaseDataModule
from reallm.data.sources import TextSource, c4_train_file, resolve_source, with_rules
from reallm.data.windows import sampling, source_windows

__all__ = ["DEFAULT_SEQ_LEN_CAP", "TextDataModule"]

DEFAULT_SEQ_LEN_CAP = 2048  # protocol.md: evaluation at L = 2048 for 7B-class models (4096 on request)
_CACHE_VERSION = 1  # bump when the window construction changes, to invalidate old caches
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


class _Windows(Dataset):
    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.windows[i]


class TextDataModule(BaseDataModule):
    """Token windows for causal language models: protocol evaluation windows and calibration windows.

    ``val_dataloader()`` gives one dataloader per evaluation dataset (batches of ``LongTensor (B, L)``),
    named by :attr:`dataset_names`; ``train_dataloader()`` gives the training windows, shuffled with
    the seed. :attr:`eval_info` records how each evaluation set was built (for results files).
    """

    def __init__(
        self,
        path: str | list[str] = "wikitext2",
        model_name_or_path: str | None = None,
        seq_len: int | None = None,
        seq_len_cap: int = DEFAULT_SEQ_LEN_CAP,
        allow_beyond_context: bool = False,
        eval_rule: str | list[str] = "auto",
        max_eval_windows: int | None = None,
        train_path: str | list[str] | None = None,
        train_sequences: int = 1024,
        train_rule: str | list[str] = "auto",
        c4_train_shard: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            path: Evaluation data, one or several: a local file (.txt; .json/.jsonl/.parquet with a "text"
                field), a preset ("wikitext2": WikiText-2 raw test split; "c4": the first C4 validation
                shard), or a Hugging Face dataset id with a "text" column ("id", "id:config",
                "id@split").
            model_name_or_path: Model whose tokenizer is used (hub id or local directory).
            seq_len: Context L: tokens per window (2048 or 4096 for 7B-class models, 512 for stories260K).
                None: the model's context (its config's max_position_embeddings), capped at seq_len_cap.
                A window longer than the model's context is refused unless allow_beyond_context.
            seq_len_cap: The largest context seq_len=None chooses (protocol.md: 2048; the paper calibrates
                on 4096 tokens).
            allow_beyond_context: Accept a seq_len longer than the model's context (positions the model was
                never trained on: perplexities are not comparable).
            eval_rule: How evaluation windows are built, one rule for every source or a list with one per
                source (in the order of path): "wikitext" (text tokenized once, floor(N/L) non-overlapping
                windows), "c4" (256 random windows of random documents with at least L tokens,
                random.Random(0)), or "auto" (per source: c4 for the c4 preset and for C4 shard files named
                c4-*.json[l][.gz], wikitext otherwise).
            max_eval_windows: Keep only the first this many windows of each evaluation set (quick runs;
                recorded in eval_info). None: all.
            train_path: Training text (same kinds as path), for fine-tuning / calibration phases. None:
                no training dataloader. With several sources, train_sequences is split evenly.
            train_sequences: Number of training windows of L tokens sampled from the training text.
            train_rule: How training windows are sampled, one rule or one per training source: "wikitext"
                (random offsets into the one token stream), "c4" (random document with at least L tokens,
                random offset), or "auto" (per source, as for eval_rule).
            c4_train_shard: Which C4 train shard the "c4" training preset reads (0..1023:
                en/c4-train.<shard>-of-01024.json.gz). Phase 2 calibrates on shard 0; phase 3 trains on
                shard 1 (configs/e2e.yaml), so that the two never share sequences (method.md §7).
            batch_size: Windows per batch.
            num_workers: DataLoader worker processes.
            cache_dir: Directory of the token-window cache (default ~/.cache/reallm/tokens).
            seed: Seed of training-window sampling and shuffling (the C4 evaluation sample always uses 0).
        """
        super().__init__(model_name_or_path=model_name_or_path, seed=seed)
        self.save_hyperparameters()
        if seq_len is not None and seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if seq_len_cap < 2:
            raise ValueError(f"seq_len_cap must be >= 2, got {seq_len_cap}")
        self._seq_len_arg = None if seq_len is None else int(seq_len)
        self.seq_len_cap = int(seq_len_cap)
        self.allow_beyond_context = bool(allow_beyond_context)
        self._seq_len: int | None = None
        self.option_prefix = "--data.init_args."  # how the user spells this module's options (for errors)
        self.eval_rule = eval_rule
        self.train_rule = train_rule
        self.max_eval_windows = max_eval_windows
        self.train_sequences = int(train_sequences)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "reallm" / "tokens").expanduser()

        # Resolved now, so that a missing local file fails before any model work.
        paths = [path] if isinstance(path, str) else list(path)
        if not paths:
            raise ValueError("path: give at least one evaluation dataset")
        self.eval_sources = with_rules([resolve_source(p, "eval") for p in paths], eval_rule, "eval_rule")
        train_paths = [train_path] if isinstance(train_path, str) else list(train_path or [])
        c4_train_file(c4_train_shard)  # a bad shard number fails here, whatever the sources
        self.train_sources = with_rules([resolve_source(p, "train", c4_train_shard) for p in train_paths],
                                         train_rule, "train_rule")

        self._tokenizer = None
        self.val_windows: list[Tensor] | None = None
        self.train_windows: Tensor | None = None
        self._eval_info: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------- names
    @property
    def dataset_names(self) -> list[str]:
        names, seen = [], {}
        for src in self.eval_sources:
            seen[src.name] = seen.get(src.name, 0) + 1
            names.append(src.name if seen[src.name] == 1 else f"{src.name}_{seen[src.name]}")
        return names

    @property
    def eval_info(self) -> list[dict[str, Any]]:
        """Per evaluation set (after setup): name, source, rule, context, windows, tokens (WikiText rule:
        N, the length of the tokenized text), max_eval_windows."""
        return self._eval_info

    @property
    def seq_len(self) -> int:
        """The context L of every window: the seq_len given, or the model's context capped at
        seq_len_cap (resolved on first use, from the model's config)."""
        if self._seq_len is None:
            self._seq_len = self._resolve_seq_len()
        return self._seq_len

    def _resolve_seq_len(self) -> int:
        opt = self.option_prefix
        context = model_context(self.model_name_or_path)
        if self._seq_len_arg is None:
            if context is None:
                raise UserError(f"cannot tell the context of {self.model_name_or_path!r} (no model config with "
                                f"max_position_embeddings): give {opt}seq_len")
            return min(context, self.seq_len_cap)
        if context is not None and self._seq_len_arg > context and not self.allow_beyond_context:
            raise UserError(f"seq_len {self._seq_len_arg} exceeds the context {context} of {self.model_name_or_path!r} "
                            f"(max_position_embeddings): use {opt}seq_len {context} or less (unset: the model's "
                            f"context, at most {self.seq_len_cap}), or {opt}allow_beyond_context true to force it")
        return self._seq_len_arg

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name_or_path)
            max_len = getattr(self._tokenizer, "model_max_length", None)
            if isinstance(max_len, int) and max_len < 10**8 and self.seq_len > max_len:
                rank_zero_warn(
                    f"seq_len={self.seq_len} exceeds the tokenizer's model_max_length={max_len} "
                    f"of {self.model_name_or_path!r}"
                )
        return self._tokenizer

    # ---------------------------------------------------------------------------------------- counts
    def _split_train_counts(self) -> list[int]:
        k = len(self.train_sources)
        return [self.train_sequences // k + (i < self.train_sequences % k) for i in range(k)]

    # ---------------------------------------------------------------------------------------- cache
    def _tokenizer_identity(self) -> dict[str, Any]:
        if not self.model_name_or_path:
            load_tokenizer(self.model_name_or_path)  # raises the clear error
        ident: dict[str, Any] = {"tokenizer": str(self.model_name_or_path)}
        d = Path(str(self.model_name_or_path)).expanduser()
        if d.is_dir():
            ident["tokenizer"] = str(d.resolve())
            ident["files"] = [
                [f, (d / f).stat().st_size, (d / f).stat().st_mtime_ns]
                for f in _TOKENIZER_FILES
                if (d / f).is_file()
            ]
        return ident

    def _cache_file(self, src: TextSource, role: str, rule: str, count: int | None, seed: int | None) -> Path:
        key = {
            "version": _CACHE_VERSION,
            "role": role,
            "source": src.identity(),
            "tokenizer": self._tokenizer_identity(),
            "rule": rule,
            "seq_len": self.seq_len,
            "count": count,
            "seed": seed,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.cache_dir / f"{src.name}-{role}-{rule}-L{self.seq_len}-{digest}.pt"

    def _windows(self, src: TextSource, role: str, count: int | None = None) -> tuple[Tensor, dict]:
        """(windows (n, L), meta) of one source, from the cache or built and cached."""
        count, seed = sampling(src.rule, role, count, self.seed)
        path = self._cache_file(src, role, src.rule, count, seed)
        if path.is_file():
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return obj["windows"].long(), obj["meta"]

        rank_zero_info(f"tokenizing {src.spec!r} ({role}, {src.rule} rule, L={self.seq_len}) -> {path}")
        windows, meta = source_windows(src, self.tokenizer, self.seq_len, role, count, seed)

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        dtype = torch.int32 if int(windows.max()) < 2**31 else torch.long
        torch.save({"windows": windows.to(dtype), "meta": meta}, tmp)
        os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file, never half
        return windows, meta

    # ---------------------------------------------------------------------------------------- hooks
    def _uses(self) -> tuple[bool, bool]:
        """(evaluation windows, training windows): what the run of the attached trainer reads. A phase
        prepares only that, e.g. a fit without validation (block-wise distillation) never touches its
        evaluation sources. Without a trainer (direct use): everything."""
        trainer = self.trainer
        if trainer is None:
            return True, True
        fn = trainer.state.fn
        if fn == "fit":
            from lightning.pytorch.utilities.model_helpers import is_overridden

            # Lightning's own condition for running the validation loop during fit
            validates = trainer.limit_val_batches != 0 and is_overridden("validation_step", trainer.lightning_module)
            return validates, True
        return fn in ("validate", "test"), False

    def prepare_data(self) -> None:
        """Download and tokenize, once (rank 0), what the run will read, filling the cache."""
        evaluates, trains = self._uses()
        if evaluates:
            for src in self.eval_sources:
                self._windows(src, "eval")
        if trains:
            for src, count in zip(self.train_sources, self._split_train_counts()):
                self._windows(src, "train", count)

    def setup(self, stage: str | None = None) -> None:
        evaluates, trains = self._uses()
        if evaluates or stage in ("validate", "test"):
            self._setup_eval()
        if trains and stage in (None, "fit"):
            self._setup_train()

    def _setup_eval(self) -> None:
        if self.val_windows is None:
            self.val_windows, self._eval_info = [], []
            for name, src in zip(self.dataset_names, self.eval_sources):
                windows, meta = self._windows(src, "eval")
                total = windows.shape[0]
                if self.max_eval_windows is not None:
                    windows = windows[: self.max_eval_windows]
                self.val_windows.append(windows)
                self._eval_info.append(
                    {
                        "name": name,
                        "source": src.spec,
                        "rule": meta["rule"],
                        "context": self.seq_len,
                        "windows": windows.shape[0],
                        "windows_total": total,
                        "tokens": meta["tokens"],
                        "max_eval_windows": self.max_eval_windows,
                    }
                )

    def _setup_train(self) -> None:
        if self.train_sources and self.train_windows is None:
            parts = [
                self._windows(src, "train", count)[0]
                for src, count in zip(self.train_sources, self._split_train_counts())
                if count > 0
            ]
            self.train_windows = torch.cat(parts)

    # ---------------------------------------------------------------------------------------- loaders
    def _loader(self, windows: Tensor, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            _Windows(windows),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.train_sources:
            raise ValueError("TextDataModule has no training data: set train_path")
        self._setup_train()
        return self._loader(self.train_windows, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        self._setup_eval()  # asked for: built now even if setup() judged it unused
        return [self._loader(w) for w in self.val_windows]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
