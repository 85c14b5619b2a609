"""Phase 1, data-free: compress every selected matrix with the configured method.

One training step = one matrix from the WeightDataModule (several devices share the matrices
through Lightning's distributed sampler). Each finished matrix is written at once to
`run_dir/partial/` (a `reallm.store.WeightStore`), so an interrupted run restarted with the same
--run_dir skips the matrices already done. At the end, rank 0 puts every container into the model, saves the
ReALLM checkpoint in `run_dir/reallm/` and writes `run_dir/results.json`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from reallm.bits import bits_report, format_bits_table
from reallm.checkpoint import save_compressed
from reallm.config import CompressionConfig
from reallm.container import compress_weight, relative_error
from reallm.errors import UserError
from reallm.hf import maybe_tokenizer
from reallm.modules.base import ReALLMModule
from reallm.store import WeightStore
from reallm.surgery import fit_shared_tensors, resolve_config, swap_in

# Phase 1 is data-free: it has nothing to optimise on purpose, and Lightning says so with a warning a user
# reads as an error. Only that exact message, raised from Lightning's optimizer module, is silenced.
warnings.filterwarnings("ignore", message=re.escape("`LightningModule.configure_optimizers` returned `None`"),
                        module=r"lightning\.pytorch\.core\.optimizer")


class CompressPhase(ReALLMModule):
    """Phase 1: data-free compression of every selected matrix (method presets of Table 6)."""

    phase = "compress"
    starts_from = "base_model"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        compression: CompressionConfig | None = None,
        layer_configs: dict[str, CompressionConfig | None] | None = None,
        method: str = "custom",
        run_dir: str | None = None,
        checkpoint: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model_name_or_path: the base model (hub id or local directory).
            compression: the compression config of every matrix (a method preset sets it).
            layer_configs: optional per-layer overrides: fnmatch pattern on the layer name →
                config (None leaves matching layers uncompressed); the first match wins, then
                `compression` applies.
            method: name of the method preset, for results.json.
            run_dir: the run directory (set by --run_dir).
            checkpoint: unused by this phase (a fresh compression starts from the base model).
            seed: seed of the random choices (overrides compression.seed when non-zero).
        """
        super().__init__(model_name_or_path, checkpoint, run_dir, method, seed)
        self.compression = compression or CompressionConfig()
        if seed:
            self.compression = self.compression.replace(seed=seed)
        self.layer_configs = layer_configs or {}
        self.automatic_optimization = False
        self._shared: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
        self.save_hyperparameters(ignore=["run_dir"])

    @property
    def phase_model(self) -> torch.nn.Module | None:
        """The base model the datamodule loaded, compressed in place."""
        trainer = self._trainer  # None before the trainer attaches (Lightning's `trainer` property raises)
        return getattr(trainer.datamodule, "model", None) if trainer is not None else None

    # -- configuration ----------------------------------------------------------------------
    def config_for(self, name: str) -> CompressionConfig | None:
        spec = {**self.layer_configs, "*": self.compression}
        return resolve_config(spec, name)

    def configure_optimizers(self):
        return None  # data-free: no parameter is trained

    @property
    def partial_dir(self) -> Path:
        return self.require_run_dir() / "partial"

    @property
    def finished(self) -> WeightStore:
        """The matrices finished so far (`run_dir/partial/`, by index)."""
        return WeightStore(self.partial_dir)

    # -- per-matrix work ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        targets = [(n, dm.model.get_submodule(n), c) for n in dm.names if (c := self.config_for(n))]
        if not targets:
            raise UserError("no layer selected: every layer config resolved to None")
        # shared codebooks are fitted identically on every rank (deterministic), before any matrix
        self._shared = fit_shared_tensors(targets, device=self.device, progress=self.global_rank == 0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        name, index, W = batch["name"], int(batch["index"]), batch["weight"]
        cfg = self.config_for(name)
        if cfg is None or self.finished.has(index, name):
            return None
        tensors, numel = self._shared.get(cfg.key(), (None, None))
        weight = compress_weight(W.to(self.device), cfg, name=name, shared=tensors, shared_numel=numel)
        err = relative_error(W.to(self.device), weight.dequantize())
        stats = {"rel_frobenius_error": err, "orig_dtype": str(W.dtype).replace("torch.", "")}
        self.finished.save(index, name, weight, stats)
        self.log("rel_frobenius_error", err, on_step=True, prog_bar=True, batch_size=1)
        self.log("bits_per_weight", weight.bits()["per_weight"], on_step=True, prog_bar=True, batch_size=1)
        return None

    # -- assembly -----------------------------------------------------------------------------
    def on_train_end(self) -> None:
        self.trainer.strategy.barrier()
        if self.global_rank != 0:
            return
        dm = self.trainer.datamodule
        model = dm.model
        done = 0
        for index, name in enumerate(dm.names):
            if self.config_for(name) is None:
                continue
            got = self.finished.load(index, name)
            if got is None:
                if self.trainer.fast_dev_run or self.trainer.limit_train_batches != 1.0:
                    continue  # a shortened run: assemble what was done
                raise RuntimeError(f"matrix {name} was not compressed (run interrupted?)")
            weight, stats = got
            swap_in(model, name, weight, stats=stats)
            done += 1
        out = save_compressed(model, self.require_run_dir() / "reallm", base_model=self.model_source(),
                              tokenizer=maybe_tokenizer(self.model_source()),
                              extra={"method": self.method, "compression": self.compression.to_dict()})
        report = bits_report(model)
        print(format_bits_table(report), flush=True)  # the per-matrix accounting, on stdout
        self.write_results({
            "bits": {"nominal": report["nominal"], "decoder_linears": report["decoder_linears"],
                     "whole_model": report["whole_model"]},
            "mean_rel_frobenius_error": report["mean_rel_frobenius_error"],
            "matrices": [{k: m[k] for k in ("name", "shape", "bits", "nominal", "rel_frobenius_error", "items")}
                         for m in report["matrices"]],
            "compressed_matrices": done,
            "checkpoint_dir": str(out),
            "complete": done == sum(1 for n in dm.names if self.config_for(n) is not None),
        })

