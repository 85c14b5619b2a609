"""`EvalAfterFit` (`--eval_after_fit.*`): the perplexity (protocol.md) of the model a `fit` phase produced,
added to its results.json, so that one run (e.g. of a sweep over bits and rank) gives both sides of the
bits / perplexity trade-off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L

from reallm.core.errors import NonFiniteError
from reallm.core.hf_models import has_tokenizer
from reallm.core.io import atomic_write_json
from reallm.data.text import TextDataModule
from reallm.eval.perplexity import perplexity
from reallm.phases.base import ReALLMModule

__all__ = ["EvalAfterFit"]


class EvalAfterFit(L.Callback):
    """After a `fit` phase, measure the perplexity of the model it produced (protocol.md windows)
    and merge it into results.json (`perplexity`, as the evaluation phase writes it)."""

    def __init__(self, path: str | list[str] | None = None, seq_len: int | None = None,
                 max_eval_windows: int | None = None, batch_size: int = 1, cache_dir: str | None = None,
                 allow_beyond_context: bool = False) -> None:
        """
        Args:
            path: evaluation text(s), as `TextDataModule.path` (a file, "wikitext2", "c4", a hub id);
                None (default): nothing is measured.
            seq_len: context L of the windows; None: the model's context (max_position_embeddings), at
                most 2048 (protocol.md). A longer one is refused (before the fit starts) unless
                allow_beyond_context.
            max_eval_windows: keep only the first this many windows (quick sweeps).
            batch_size: windows per forward pass.
            cache_dir: token-window cache directory (default ~/.cache/reallm/tokens).
            allow_beyond_context: accept a seq_len longer than the model's context.
        """
        super().__init__()
        self.path, self.seq_len, self.max_eval_windows = path, seq_len, max_eval_windows
        self.batch_size, self.cache_dir = batch_size, cache_dir
        self.allow_beyond_context = allow_beyond_context

    def _datamodule(self, source: str) -> TextDataModule:
        dm = TextDataModule(path=self.path, model_name_or_path=source, seq_len=self.seq_len,
                            max_eval_windows=self.max_eval_windows, batch_size=self.batch_size,
                            cache_dir=self.cache_dir, allow_beyond_context=self.allow_beyond_context)
        dm.option_prefix = "--eval_after_fit."  # errors name this callback's options
        return dm

    def setup(self, trainer: L.Trainer, pl_module: ReALLMModule, stage: str) -> None:
        if self.path and stage == "fit" and trainer.global_rank == 0:
            _ = self._datamodule(pl_module.model_source()).seq_len  # a window beyond the context fails now

    def teardown(self, trainer: L.Trainer, pl_module: ReALLMModule, stage: str) -> None:
        if not self.path or stage != "fit" or trainer.global_rank != 0 or trainer.interrupted:
            return
        run_dir = pl_module.run_dir
        results_path = Path(run_dir) / "results.json" if run_dir else None
        model = pl_module.phase_model
        if model is None or results_path is None or not results_path.is_file():
            return

        # the tokenizer of the base model (a stable path: its token windows are cached once for all
        # the runs of a sweep), else the one saved with the new checkpoint
        source = pl_module.model_source()
        ckpt, base = Path(run_dir) / "reallm", Path(source)
        if base.is_dir() and not has_tokenizer(base) and has_tokenizer(ckpt):
            source = str(ckpt)
        dm = self._datamodule(source)
        dm.prepare_data()
        dm.setup("validate")
        was_training = model.training
        model.eval()
        # phase 1 keeps the model on the CPU: evaluate it on the phase's device, then put it back
        home = next((p.device for p in model.parameters()), pl_module.device)
        model.to(pl_module.device)
        out = {}
        for name, windows in zip(dm.dataset_names, dm.val_windows):
            r = perplexity(model, windows, batch_size=self.batch_size)
            out[name] = {"context": dm.seq_len, "value": r["value"], "tokens": r["tokens"], "windows": r["windows"],
                         "measured": "after fit (eval_after_fit)"}
            if not math.isfinite(r["value"]):
                raise NonFiniteError(f"perplexity on {name} after fit is {r['value']} (the model's forward pass "
                                     f"overflows or a weight is not finite)")
        model.train(was_training)
        model.to(home)
        results = json.loads(results_path.read_text())
        results["perplexity"] = {**(results.get("perplexity") or {}), **out}
        results["eval_info"] = dm.eval_info
        atomic_write_json(results_path, results)
