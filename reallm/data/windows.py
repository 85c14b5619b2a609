"""Token windows by the protocol's rules (``docs/protocol.md``, the GPTQ protocol), pure functions.

Evaluation:

- **WikiText rule** (WikiText-2 and any other text): the rows joined with ``"\\n\\n"`` (a plain ``.txt``
  file: its whole text as is), tokenized once as one text with the tokenizer's BOS added once at the
  start; ``floor(N / L)`` non-overlapping windows of ``L`` tokens.
- **C4 rule**: with ``random.Random(0)``, 256 times: draw a random document until one has at least ``L``
  tokens (each document tokenized with BOS at its start), then a random window of ``L`` tokens in it.

Training windows are GPTQ-style calibration samples, deterministic for a seed: random offsets into
the one token stream (WikiText rule) or random document / random offset (C4 rule).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from reallm.data.sources import TextSource, load_texts

__all__ = [
    "C4_EVAL_SEED",
    "C4_EVAL_WINDOWS",
    "TokenizedDocs",
    "c4_windows",
    "sampling",
    "source_windows",
    "stream_windows",
    "tokenize",
    "wikitext_windows",
]

C4_EVAL_WINDOWS = 256  # protocol: 256 windows of L tokens
C4_EVAL_SEED = 0  # protocol: Python's random seeded 0 (fixed, whatever the caller's seed)


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


class TokenizedDocs(Sequence):
    """Documents tokenized on first access (C4 shards: only the drawn documents are tokenized)."""

    def __init__(self, texts: Sequence[str], encode: Callable[[str], list[int]]) -> None:
        """
        Args:
            texts: the documents (a lazy column is fine).
            encode: text → token ids.
        """
        self.texts, self.encode, self._memo = texts, encode, {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):  # type: ignore[override]
        if i not in self._memo:
            self._memo[i] = self.encode(self.texts[i])
        return self._memo[i]


def sampling(rule: str, role: str, count: int | None, seed: int) -> tuple[int | None, int | None]:
    """(number of windows, seed) a source's windows are drawn with.

    Args:
        rule: "wikitext" or "c4".
        role: "eval": the protocol's (C4: 256 windows seeded 0; WikiText: every window, nothing drawn,
            (None, None)); "train": ``count`` windows seeded ``seed``.
        count: training windows wanted.
        seed: the caller's seed (training only).
    """
    if role == "eval":
        return (C4_EVAL_WINDOWS, C4_EVAL_SEED) if rule == "c4" else (None, None)
    return count, seed


def source_windows(src: TextSource, tokenizer, seq_len: int, role: str, count: int | None,
                   seed: int | None) -> tuple[Tensor, dict[str, Any]]:
    """The windows of one source by its rule, ``(n, L)``, and what describes them.

    Args:
        src: the source (its ``rule`` says how windows are built).
        tokenizer: a Hugging Face tokenizer.
        seq_len: L, tokens per window.
        role: "eval" (WikiText rule: every window; C4 rule: the protocol's sample) or "train"
            (calibration samples).
        count, seed: from :func:`sampling`.
    Returns:
        (windows (n, L) int64, {"rule", "seq_len", "seed", "tokens": N of the one token stream
        (WikiText rule) or None}).
    """
    texts = load_texts(src, role)
    meta: dict[str, Any] = {"rule": src.rule, "seq_len": seq_len, "seed": seed, "tokens": None}
    if src.rule == "wikitext":
        ids = tokenize(tokenizer, "\n\n".join(texts))  # one text, one BOS
        meta["tokens"] = len(ids)
        windows = wikitext_windows(ids, seq_len) if role == "eval" else stream_windows(ids, seq_len, count, seed)
    else:
        docs = TokenizedDocs(texts, lambda t: tokenize(tokenizer, t))  # one BOS per document
        windows = c4_windows(docs, seq_len, n=count, seed=seed)
    return windows, meta
