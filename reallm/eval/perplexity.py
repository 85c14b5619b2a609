"""Perplexity on protocol windows (``docs/protocol.md``), with torchmetrics' ``Perplexity``.

Each window of ``L`` tokens predicts its tokens ``1..L-1`` from the preceding ones; perplexity is
``exp`` of the mean token cross-entropy over all predicted tokens of all windows.

:class:`WindowPerplexity` is the one accumulator of the project: :func:`perplexity` (a model on a tensor
of windows), the validation of the evaluation and fine-tuning phases (`reallm.phases.validation`) and the
`eval_after_fit` callback all feed it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from reallm.core.hf_models import model_device

__all__ = ["WindowPerplexity", "greedy_generate", "model_logits", "perplexity"]

_CHUNK_ELEMENTS = 1 << 25  # logits elements per metric update (float64: 256 MB), bounds the softmax copy


class WindowPerplexity(Perplexity):
    """torchmetrics' ``Perplexity`` fed whole windows: :meth:`add_windows` scores tokens ``1..L-1`` of each
    window from the logits of the positions before them, a few positions at a time (the softmax copy stays
    bounded at any vocabulary size). The sums are kept in float64 (exact over millions of tokens, no
    ``log(0)`` for very unlikely targets); MPS, which has no float64, asks for float32.
    States are summed across processes by ``compute()``, as for any torchmetrics metric."""

    def __init__(self, dtype: torch.dtype = torch.float64, chunk_elements: int = _CHUNK_ELEMENTS) -> None:
        """
        Args:
            dtype: accumulation dtype (float64; float32 on MPS).
            chunk_elements: logits elements per update (bounds the float64 copy and the softmax).
        """
        super().__init__()
        self.set_dtype(dtype)
        self.chunk_elements = int(chunk_elements)

    def add_windows(self, logits: Tensor, input_ids: Tensor) -> None:
        """Score a batch of windows: logits (B, L, V) of the model on input_ids (B, L)."""
        preds, target = logits[:, :-1], input_ids[:, 1:]  # (B, L-1, V), (B, L-1)
        step = max(1, self.chunk_elements // (preds.shape[-1] * preds.shape[0]))
        for t in range(0, preds.shape[1], step):
            self.update(preds[:, t : t + step].to(self.dtype), target[:, t : t + step])

    def result(self) -> dict[str, Any]:
        """{"value": perplexity, "nll": mean token negative log-likelihood (nats), "tokens": predicted tokens}."""
        value = float(self.compute())
        tokens = int(self.count.item())
        return {"value": value, "nll": float(self.total_log_probs.item()) / tokens, "tokens": tokens}


def model_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits (B, L, V) of a causal LM (or of a module returning logits) on input_ids (B, L), without a
    KV cache (at 7B / L = 2048 the cache of one full forward alone is about 1 GB)."""
    config = getattr(model, "config", None)
    kwargs = {"use_cache": False} if hasattr(config, "use_cache") else {}
    out = model(input_ids, **kwargs)
    if isinstance(out, Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Tensor,
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of a causal LM on token windows, ``exp(mean cross-entropy)`` over all windows.

    Args:
        model: Any Hugging Face causal LM (``model(input_ids).logits``), or a module returning logits.
        windows: ``LongTensor (n, L)`` of token ids, e.g. from :class:`reallm.data.TextDataModule`
            or :func:`reallm.data.windows.wikitext_windows`.
        batch_size: Windows per forward pass.
        device: Where to run; default: the device of the model's parameters.
        progress: Show a tqdm progress bar.

    Returns:
        ``{"value": perplexity, "nll": mean token negative log-likelihood (nats), "tokens": number of
        predicted tokens n*(L-1), "windows": n, "context": L}``.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, L) with L >= 2, got shape {tuple(windows.shape)}")
    n, seq_len = windows.shape
    if n == 0:
        raise ValueError("no windows to evaluate")
    device = torch.device(device) if device is not None else model_device(model)
    metric = WindowPerplexity(torch.float32 if device.type == "mps" else torch.float64).to(device)

    was_training = model.training
    model.eval()
    try:
        with tqdm(total=n, desc="perplexity", unit="win", disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)  # (B, L)
                metric.add_windows(model_logits(model, batch), batch)  # logits (B, L, V)
                bar.update(batch.shape[0])
        result = metric.result()
    finally:
        model.train(was_training)
    return {**result, "windows": int(n), "context": int(seq_len)}


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (``model.generate(do_sample=False)``): the decoded prompt and
    continuation, special tokens skipped."""
    device = model_device(model)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
