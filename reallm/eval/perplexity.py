"""Perplexity on protocol windows (``../shared/docs/protocol.md``), with torchmetrics' ``Perplexity``.

Each window of ``L`` tokens predicts its tokens ``1..L-1`` from the preceding ones; perplexity is
``exp`` of the mean token cross-entropy over all predicted tokens of all windows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

__all__ = ["greedy_generate", "perplexity"]

_CHUNK_ELEMENTS = 1 << 25  # logits elements per metric update (float64: 256 MB), bounds the softmax copy


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    # No KV cache for a single full forward (at 7B / L=2048 the cache alone is about 1 GB).
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
        windows: ``LongTensor (n, L)`` of token ids, e.g. from :class:`reallm.datamodules.TextDataModule`
            or :func:`reallm.datamodules.text.wikitext_windows`.
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
    device = torch.device(device) if device is not None else _model_device(model)
    # The metric sums log-probabilities; float64 keeps the sum exact over millions of tokens and
    # avoids log(0) for very unlikely targets (MPS has no float64).
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    metric = Perplexity().to(device).set_dtype(acc_dtype)

    was_training = model.training
    model.eval()
    try:
        with tqdm(total=n, desc="perplexity", unit="win", disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)  # (B, L)
                logits = _logits(model, batch)  # (B, L, V)
                preds, target = logits[:, :-1], batch[:, 1:]  # (B, L-1, V), (B, L-1)
                step = max(1, _CHUNK_ELEMENTS // (preds.shape[-1] * preds.shape[0]))
                for t in range(0, seq_len - 1, step):
                    metric.update(preds[:, t : t + step].to(acc_dtype), target[:, t : t + step])
                bar.update(batch.shape[0])
        value = float(metric.compute())
        tokens = int(metric.count.item())
        nll = float(metric.total_log_probs.item()) / tokens
    finally:
        model.train(was_training)
    return {"value": value, "nll": nll, "tokens": tokens, "windows": int(n), "context": int(seq_len)}


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (``model.generate(do_sample=False)``): the decoded prompt and
    continuation, special tokens skipped."""
    device = _model_device(model)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
