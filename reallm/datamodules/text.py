"""Language-model text: evaluation windows by the protocol rules, training windows by calibration sampling.

Evaluation follows ``../shared/docs/protocol.md`` (the GPTQ protocol):

- **WikiText rule** (WikiText-2 and any other text): the rows joined with ``"\\n\\n"`` (a plain ``.txt``
  file: its whole text as is), tokenized once as one text with the tokenizer's BOS added once at the
  start; ``floor(N / L)`` non-overlapping windows of ``L`` tokens.
- **C4 rule**: with ``random.Random(0)``, 256 times: draw a random document until one has at least ``L``
  tokens (each document tokenized with BOS at its start), then a random window of ``L`` tokens in it.

Training windows are GPTQ-style calibration samples, deterministic for a seed: random offsets into
the one token stream (WikiText rule) or random document / random offset (C4 rule).

Everything tokenized is cached once per (data, tokenizer, rule, L, seed, counts) under ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from reallm.datamodules.base import BaseDataModule
from reallm.hf import load_tokenizer

__all__ = [
    "PRESETS",
    "RULES",
    "TextDataModule",
    "TextSource",
    "c4_train_file",
    "c4_windows",
    "load_texts",
    "load_tokenizer",
    "model_context",
    "resolve_source",
    "stream_windows",
    "tokenize",
    "wikitext_windows",
]

RULES = ("wikitext", "c4")
C4_EVAL_WINDOWS = 256  # protocol: 256 windows of L tokens
C4_EVAL_SEED = 0  # protocol: Python's random seeded 0 (fixed, whatever the datamodule's seed)
DEFAULT_SEQ_LEN_CAP = 2048  # protocol.md: evaluation at L = 2048 for 7B-class models (4096 on request)
C4_TRAIN_SHARDS = 1024  # allenai/c4 "en": en/c4-train.00000-of-01024.json.gz ... 01023
_CACHE_VERSION = 1  # bump when the window construction changes, to invalidate old caches

# Hub presets. "wikitext" is the legacy id of Salesforce/wikitext; the canonical id is used so that the
# load does not depend on a redirect.
PRESETS: dict[str, dict[str, Any]] = {
    "wikitext2": {
        "path": "Salesforce/wikitext",
        "config": "wikitext-2-raw-v1",
        "eval": {"split": "test"},
        "train": {"split": "train"},
        "rule": "wikitext",
    },
    "c4": {
        "path": "allenai/c4",
        "config": None,
        "eval": {
            "split": "validation",
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        },
        # shard 00000 by default; TextDataModule(c4_train_shard=k) reads shard k (phase 3 reads 00001 so that
        # it does not train on phase 2's calibration shard, method.md §7)
        "train": {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
        "rule": "c4",
    },
}

# C4's own shard files ("c4-validation.00000-of-00008.json.gz", "c4-train.00001-of-01024.json.gz"): evaluated
# and sampled with the C4 rule when given as local files, like the "c4" preset.
_C4_FILE = re.compile(r"^c4-.+\.jsonl?(\.gz)?$", re.IGNORECASE)

_FILE_FORMATS = {".txt": "txt", ".text": "txt", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextSource:
    """Where one text dataset comes from, resolved from a user spec (see :func:`resolve_source`)."""

    spec: str  # what the user wrote
    kind: str  # "file" | "preset" | "hub"
    name: str  # dataset name (results key)
    path: str  # local file path or hub id
    config: str | None = None  # hub config name
    split: str | None = None  # hub split (None: chosen at load, see load_texts)
    data_files: dict[str, str] | None = field(default=None, hash=False)
    file_format: str | None = None  # "txt" | "json" | "parquet" for local files
    rule: str = "wikitext"  # the rule its windows are built with ("auto": chosen from the source)

    def identity(self) -> dict[str, Any]:
        """What identifies the data content, for the cache key (local files: path, size, mtime)."""
        if self.kind == "file":
            st = os.stat(self.path)
            return {"file": str(Path(self.path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"hub": self.path, "config": self.config, "split": self.split, "data_files": self.data_files}


def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":  # datasets' json loader reads .json.gz / .jsonl.gz
        suffixes = suffixes[:-1]
        fmt = _FILE_FORMATS.get(suffixes[-1]) if suffixes else None
        return fmt if fmt == "json" else None
    return _FILE_FORMATS.get(suffixes[-1]) if suffixes else None


def c4_train_file(shard: int) -> str:
    """The path of C4 train shard ``shard`` inside ``allenai/c4`` (0 -> ``en/c4-train.00000-of-01024.json.gz``)."""
    if not isinstance(shard, int) or not 0 <= shard < C4_TRAIN_SHARDS:
        raise ValueError(f"c4_train_shard must be an integer in [0, {C4_TRAIN_SHARDS - 1}], got {shard!r}")
    return f"en/c4-train.{shard:05d}-of-{C4_TRAIN_SHARDS:05d}.json.gz"


def resolve_source(spec: str, role: str = "eval", c4_train_shard: int = 0) -> TextSource:
    """Resolve a data spec into a :class:`TextSource`, checking that a local file exists.

    ``spec`` is one of:

    - a local file: ``.txt`` (the text is the file, exactly), ``.json`` / ``.jsonl`` (``.gz`` too) or
      ``.parquet`` with a ``"text"`` field, one row per document; C4's own shard files, named
      ``c4-*.json[l][.gz]`` (e.g. ``c4-validation.00000-of-00008.json.gz``), get the C4 rule, any other
      file the WikiText rule;
    - a preset: ``"wikitext2"`` (hub ``Salesforce/wikitext``, ``wikitext-2-raw-v1``, test split for
      evaluation, train split for training) or ``"c4"`` (hub ``allenai/c4``, shard
      ``en/c4-validation.00000-of-00008.json.gz`` for evaluation, ``en/c4-train.<c4_train_shard>-of-01024.json.gz``
      for training, shard 00000 by default);
    - a Hugging Face dataset id with a ``"text"`` column, optionally ``"id:config"`` and/or ``"id@split"``
      (default split: ``test``, else ``validation`` for evaluation; ``train`` for training).

    ``role`` is ``"eval"`` or ``"train"`` (it picks the preset's split / shard); ``c4_train_shard`` picks the
    training shard of the ``"c4"`` preset (0..1023; evaluation always uses the protocol's validation shard).

    Raises:
        FileNotFoundError: ``spec`` names a local file (a path, or a name with a file extension) that
            does not exist.
    """
    if role not in ("eval", "train"):
        raise ValueError(f"role must be 'eval' or 'train', got {role!r}")
    spec = str(spec)
    path = Path(spec).expanduser()
    fmt = _file_format(path)
    looks_local = spec.startswith(("/", "./", "../", "~", ".\\")) or fmt is not None or path.exists()
    if looks_local:
        if not path.is_file():
            raise FileNotFoundError(f"text data file not found: {str(path)!r} (from data spec {spec!r})")
        if fmt is None:
            raise ValueError(
                f"unsupported text file {str(path)!r}: expected one of "
                f"{sorted(_FILE_FORMATS)} (json also as .json.gz / .jsonl.gz)"
            )
        name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
        name = Path(name).stem  # "tinystories_valid.txt" -> "tinystories_valid", "c4.jsonl.gz" -> "c4"
        rule = "c4" if _C4_FILE.match(path.name) else "wikitext"
        return TextSource(spec=spec, kind="file", name=name, path=str(path), file_format=fmt, rule=rule)

    key = spec.lower()
    if key in PRESETS:
        preset = PRESETS[key]
        part = preset[role]
        if key == "c4" and role == "train":
            part = {**part, "data_files": {"train": c4_train_file(c4_train_shard)}}
        return TextSource(
            spec=spec,
            kind="preset",
            name=key,
            path=preset["path"],
            config=preset["config"],
            split=part["split"],
            data_files=part.get("data_files"),
            rule=preset["rule"],
        )

    hub_id, _, split = spec.partition("@")  # "id[:config][@split]"
    hub_id, _, config = hub_id.partition(":")
    split = split or ("train" if role == "train" else None)
    config = config or None
    return TextSource(
        spec=spec, kind="hub", name=hub_id.rstrip("/").split("/")[-1], path=hub_id, config=config, split=split
    )


def load_texts(source: str | TextSource, role: str = "eval") -> Sequence[str]:
    """The rows (documents) of a text source, in their stored order.

    A ``.txt`` file gives one row: its whole text exactly as stored (no newline translation). Local
    json / jsonl / parquet files and hub datasets are read with :func:`datasets.load_dataset` and give
    their ``"text"`` column (a lazy column: rows are read on access).
    """
    src = source if isinstance(source, TextSource) else resolve_source(source, role)
    if src.kind == "file" and src.file_format == "txt":
        with open(src.path, encoding="utf-8", newline="") as f:
            return [f.read()]

    import datasets

    if src.kind == "file":
        ds = datasets.load_dataset(src.file_format, data_files=src.path, split="train")
    else:
        ds = datasets.load_dataset(src.path, src.config, data_files=src.data_files, split=src.split)
        if isinstance(ds, datasets.DatasetDict):  # no split given: evaluation on test, else validation
            for split in ("test", "validation"):
                if split in ds:
                    ds = ds[split]
                    break
            else:
                raise ValueError(
                    f"dataset {src.path!r} has no 'test' or 'validation' split (splits: {list(ds)}); "
                    f"name one as '{src.spec}@<split>'"
                )
    if "text" not in ds.column_names:
        raise ValueError(f"text source {src.spec!r} has no 'text' column (columns: {ds.column_names})")
    return ds["text"]


# --------------------------------------------------------------------------------------------------
# tokenization and windows (pure functions, no Lightning)
# --------------------------------------------------------------------------------------------------
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


def tokenize(tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text`` as one sequence, with the tokenizer's BOS once at the start (if it has one)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if add_bos and bos is not None else []) + list(ids)


def wikitext_windows(token_ids: Tensor | Sequence[int], seq_len: int) -> Tensor:
    """The WikiText rule: ``floor(N / L)`` consecutive non-overlapping windows, ``(N,) -> (n, L)``."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len).clone()  # (n, L)


def _window_start(rng: random.Random, length: int, seq_len: int) -> int:
    # GPTQ's draw, `randint(0, len - L - 1)`, so that the GPTQ C4 sample is reproduced exactly; GPTQ
    # raises for len == L, where the one window is taken without a draw.
    return rng.randint(0, length - seq_len - 1) if length > seq_len else 0


def c4_windows(
    docs_token_ids: Sequence[Sequence[int]], seq_len: int, n: int = C4_EVAL_WINDOWS, seed: int = C4_EVAL_SEED
) -> Tensor:
    """The C4 rule: ``n`` windows of ``L`` tokens, ``(n, L)``, drawn with ``random.Random(seed)``.

    Each time: pick ``docs[rng.randint(0, len(docs) - 1)]`` until one has at least ``L`` tokens, then
    the window starting at ``rng.randint(0, len(doc) - L - 1)`` (GPTQ's ``datautils.get_c4``; a
    document of exactly ``L`` tokens gives its one window without a draw). ``docs_token_ids`` may be a
    lazy sequence that tokenizes on access: only the drawn documents are read.
    """
    if len(docs_token_ids) == 0:
        raise ValueError("c4_windows: no documents")
    if isinstance(docs_token_ids, list | tuple) and not any(len(d) >= seq_len for d in docs_token_ids):
        raise ValueError(f"c4_windows: no document has {seq_len} tokens or more")
    max_draws = 100 * len(docs_token_ids) + 10_000  # bound the search when no document is long enough
    rng = random.Random(seed)
    out = torch.empty(n, seq_len, dtype=torch.long)
    for k in range(n):
        for _ in range(max_draws):
            doc = docs_token_ids[rng.randint(0, len(docs_token_ids) - 1)]
            if len(doc) >= seq_len:
                break
        else:
            raise ValueError(f"c4_windows: no document with {seq_len} tokens found in {max_draws} draws")
        start = _window_start(rng, len(doc), seq_len)
        out[k] = torch.as_tensor(list(doc[start : start + seq_len]), dtype=torch.long)
    return out  # (n, L)


def stream_windows(token_ids: Tensor | Sequence[int], seq_len: int, n: int, seed: int = 0) -> Tensor:
    """Calibration windows from one token stream: ``n`` windows at offsets drawn with
    ``random.Random(seed)`` (GPTQ's WikiText-2 calibration sampling), ``(N,) -> (n, L)``."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    rng = random.Random(seed)
    starts = [_window_start(rng, ids.numel(), seq_len) for _ in range(n)]
    return torch.stack([ids[s : s + seq_len] for s in starts])  # (n, L)


class _TokenizedDocs(Sequence):
    """Documents tokenized on first access (C4 shards: only the drawn documents are tokenized)."""

    def __init__(self, texts: Sequence[str], encode: Callable[[str], list[int]]) -> None:
        self.texts, self.encode, self._memo = texts, encode, {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):  # type: ignore[override]
        if i not in self._memo:
            self._memo[i] = self.encode(self.texts[i])
        return self._memo[i]


class _Windows(Dataset):
    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.windows[i]


def _with_rules(sources: list[TextSource], rule: str | Sequence[str], arg: str) -> list[TextSource]:
    """The sources with the rule each one is built with: ``rule`` is one rule for every source or a
    list of one per source; "auto" keeps the rule the source resolved to (c4 for C4, wikitext else)."""
    rules = [rule] * len(sources) if isinstance(rule, str) else list(rule)
    if len(rules) != len(sources):
        raise ValueError(f"{arg}: {len(rules)} rules for {len(sources)} sources; give one rule for all, or one "
                         f"rule per source")
    for r in rules:
        if r not in (*RULES, "auto"):
            raise ValueError(f"{arg} must be one of {(*RULES, 'auto')} (or a list of them), got {r!r}")
    return [src if r == "auto" else dataclasses.replace(src, rule=r) for src, r in zip(sources, rules)]


# --------------------------------------------------------------------------------------------------
# datamodule
# --------------------------------------------------------------------------------------------------
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
        self._option_prefix = "--data.init_args."  # how the user spells this module's options (for errors)
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
        self.eval_sources = _with_rules([resolve_source(p, "eval") for p in paths], eval_rule, "eval_rule")
        train_paths = [train_path] if isinstance(train_path, str) else list(train_path or [])
        c4_train_file(c4_train_shard)  # a bad shard number fails here, whatever the sources
        self.train_sources = _with_rules([resolve_source(p, "train", c4_train_shard) for p in train_paths],
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
        from reallm.errors import UserError

        opt = self._option_prefix
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

    # ---------------------------------------------------------------------------------------- rules
    def _rule(self, src: TextSource, role: str) -> str:
        return src.rule  # chosen per source at construction (see _with_rules)

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
        rule = self._rule(src, role)
        if role == "eval":
            count = C4_EVAL_WINDOWS if rule == "c4" else None
            seed = C4_EVAL_SEED if rule == "c4" else None
        else:
            seed = self.seed
        path = self._cache_file(src, role, rule, count, seed)
        if path.is_file():
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return obj["windows"].long(), obj["meta"]

        rank_zero_info(f"tokenizing {src.spec!r} ({role}, {rule} rule, L={self.seq_len}) -> {path}")
        texts = load_texts(src, role)
        meta: dict[str, Any] = {"rule": rule, "seq_len": self.seq_len, "seed": seed, "tokens": None}
        if rule == "wikitext":
            ids = tokenize(self.tokenizer, "\n\n".join(texts))  # one text, one BOS
            meta["tokens"] = len(ids)
            if role == "eval":
                windows = wikitext_windows(ids, self.seq_len)
            else:
                windows = stream_windows(ids, self.seq_len, count, seed)
        else:
            docs = _TokenizedDocs(texts, lambda t: tokenize(self.tokenizer, t))  # one BOS per document
            windows = c4_windows(docs, self.seq_len, n=count, seed=seed)

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
