"""Where text comes from: a user's data spec (a local file, a preset, a hub dataset) resolved into a
:class:`TextSource`, with the protocol rule its windows are built with, and the rows it holds.

Presets (``docs/protocol.md``): ``"wikitext2"`` (hub ``Salesforce/wikitext``,
``wikitext-2-raw-v1``; test split for evaluation, train split for training) and ``"c4"`` (hub
``allenai/c4``; the validation shard ``en/c4-validation.00000-of-00008.json.gz`` for evaluation, a train shard
for training). C4's own shard files given as local files get the C4 rule, every other source the WikiText
rule.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "C4_TRAIN_SHARDS",
    "PRESETS",
    "RULES",
    "TextSource",
    "c4_train_file",
    "load_texts",
    "resolve_source",
    "with_rules",
]

RULES = ("wikitext", "c4")  # how windows are built (reallm.data.windows)
C4_TRAIN_SHARDS = 1024  # allenai/c4 "en": en/c4-train.00000-of-01024.json.gz ... 01023

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
        # shard 00000 by default; resolve_source(..., c4_train_shard=k) reads shard k (phase 3 reads 00001 so
        # that it does not train on phase 2's calibration shard, method.md §7)
        "train": {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
        "rule": "c4",
    },
}

# C4's own shard files ("c4-validation.00000-of-00008.json.gz", "c4-train.00001-of-01024.json.gz"): evaluated
# and sampled with the C4 rule when given as local files, like the "c4" preset.
_C4_FILE = re.compile(r"^c4-.+\.jsonl?(\.gz)?$", re.IGNORECASE)

_FILE_FORMATS = {".txt": "txt", ".text": "txt", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
    rule: str = "wikitext"  # the rule its windows are built with

    def identity(self) -> dict[str, Any]:
        """What identifies the data content, for a cache key (local files: path, size, mtime)."""
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

    Args:
        spec: the data spec, as above.
        role: ``"eval"`` or ``"train"`` (it picks the preset's split / shard).
        c4_train_shard: the training shard of the ``"c4"`` preset (0..1023; evaluation always uses the
            protocol's validation shard).

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


def with_rules(sources: list[TextSource], rule: str | Sequence[str], arg: str) -> list[TextSource]:
    """The sources with the rule each one is built with.

    Args:
        sources: resolved sources.
        rule: one rule for every source or a list of one per source; "auto" keeps the rule the source
            resolved to (c4 for C4, wikitext otherwise).
        arg: the option's name, for the error message.
    """
    rules = [rule] * len(sources) if isinstance(rule, str) else list(rule)
    if len(rules) != len(sources):
        raise ValueError(f"{arg}: {len(rules)} rules for {len(sources)} sources; give one rule for all, or one "
                         f"rule per source")
    for r in rules:
        if r not in (*RULES, "auto"):
            raise ValueError(f"{arg} must be one of {(*RULES, 'auto')} (or a list of them), got {r!r}")
    return [src if r == "auto" else dataclasses.replace(src, rule=r) for src, r in zip(sources, rules)]


def load_texts(source: str | TextSource, role: str = "eval") -> Sequence[str]:
    """The rows (documents) of a text source, in their stored order.

    A ``.txt`` file gives one row: its whole text exactly as stored (no newline translation). Local
    json / jsonl / parquet files and hub datasets are read with :func:`datasets.load_dataset` and give
    their ``"text"`` column (a lazy column: rows are read on access).

    Args:
        source: a resolved source, or a spec for :func:`resolve_source`.
        role: ``"eval"`` or ``"train"`` (used when ``source`` is a spec).
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
