"""Validation perplexity of a phase (protocol.md) on every evaluation dataset of its datamodule."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from reallm.eval.perplexity import WindowPerplexity

__all__ = ["PerplexityMixin", "input_ids_of"]


def input_ids_of(batch: Any) -> Tensor:
    """The windows (B, L) of a text batch (a tensor, or a dict with "input_ids"), as int64."""
    return (batch if isinstance(batch, Tensor) else batch["input_ids"]).long()


class PerplexityMixin:
    """Validation perplexity (protocol.md) on every evaluation dataset of the datamodule.

    One `WindowPerplexity` per dataset (torchmetrics `Perplexity`, float64 sums, synced across processes
    by `compute()`); logs `ppl/<dataset>` and `val/loss` (mean token NLL of the first dataset), keeps
    `self.perplexity` ({dataset: {context, value, tokens}}) and `self.validation_history`.
    A LightningModule using it calls `setup_perplexity()` in `setup()` and implements `lm_logits`.
    """

    def setup_perplexity(self) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        names = list(getattr(dm, "dataset_names", []) or [])
        # fresh states: those of an earlier `validate` are inference tensors
        self.ppl_metrics = nn.ModuleList(WindowPerplexity() for _ in names)
        self.ppl_names = names
        self.perplexity: dict[str, Any] = {}
        self.validation_history: list[dict[str, Any]] = []

    def lm_logits(self, input_ids: Tensor) -> Tensor:  # pragma: no cover - implemented by the module
        """Logits (B, L, V) of the phase's model on input_ids (B, L)."""
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        ids = input_ids_of(batch)  # (B, L)
        self.ppl_metrics[dataloader_idx].add_windows(self.lm_logits(ids), ids)  # logits (B, L, V)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # partial sanity batches are not a perplexity
            for m in self.ppl_metrics:
                m.reset()
            return
        seq_len = getattr(self.trainer.datamodule, "seq_len", None)
        results: dict[str, Any] = {}
        for name, metric in zip(self.ppl_names, self.ppl_metrics):
            if not metric.update_called:
                continue
            r = metric.result()
            results[name] = {"context": seq_len, "value": r["value"], "tokens": r["tokens"]}
            self.log(f"ppl/{name}", r["value"], sync_dist=False, prog_bar=True)
            metric.reset()
        if results:
            first = next(iter(results.values()))
            self.log("val/loss", math.log(first["value"]), sync_dist=False)
            self.perplexity = results
            self.validation_history.append({"step": int(self.trainer.global_step),
                                            "epoch": int(self.trainer.current_epoch),
                                            **{k: v["value"] for k, v in results.items()}})
