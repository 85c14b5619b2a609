"""Phase 1, data-free: compress every selected matrix with the configured method.

One training step = one matrix from the WeightDataModule (several devices share the matrices
through Lightning's distributed sampler). Each finished matrix is written at once to
`run_dir/partial/` (atomically), so an interrupted run restarted with the same --run_dir skips
the matrices already done. At the end, rank 0 puts every container into the model, saves the
ReALLM checkpoint in `run_dir/reallm/` and writes `run_dir/results.json`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from reallm.bits import bits_report, format_bits_table
from reallm.checkpoint import save_compressed
from reallm.config import CompressionConfig
from reallm.container import ReALLMWeight, compress_weight, relative_error
from reallm.errors import UserError
from reallm.files import atomic_save_safetensors, atomic_write_text
from reallm.hf import maybe_tokenizer
from reallm.modules.base import ReALLMModule
from reallm.surgery import fit_shared_tensors, resolve_config, swap_in

# Phase 1 is data-free: it has nothing to optimise on purpose, and Lightning says so with a warning a user
# reads as an error. Only that exact message, raised from Lightning's optimizer module, is silenced.
warnings.filterwarnings("ignore", message=re.escape("`LightningModule.configure_optimizers` returned `None`"),
                        module=r"lightning\.pytorch\.core\.optimizer")


class CompressPhase(ReALLMModule):
    """Phase 1: data-free compression of every selected matrix (method presets of Table 6)."""

    phase = "compress"

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

    # -- configuration ----------------------------------------------------------------------
    def config_for(self, name: str) -> CompressionConfig | None:
        spec = {**self.layer_configs, "*": self.compression}
        return resolve_config(spec, name)

    def configure_optimizers(self):
        return None  # data-free: no parameter is trained

    @property
    def partial_dir(self) -> Path:
        return self.require_run_dir() / "partial"

    # -- per-matrix work ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        targets = [(n, dm.model.get_submodule(n), c) for n in dm.names if (c := self.config_for(n))]
        if not targets:
            raise UserError("no layer selected: every layer config resolved to None")
        # shared codebooks are fitted identically on every rank (deterministic), before any matrix
        self._shared = fit_shared_tensors(targets, device=self.device, progress=self.global_rank == 0)

    def _partial_paths(self, index: int) -> tuple[Path, Path]:
        return self.partial_dir / f"{index:05d}.safetensors", self.partial_dir / f"{index:05d}.json"

    def _is_done(self, index: int, name: str) -> bool:
        tpath, mpath = self._partial_paths(index)
        try:
            return tpath.is_file() and json.loads(mpath.read_text()).get("name") == name
        except (OSError, json.JSONDecodeError):
            return False

    def load_partial(self, index: int, name: str) -> ReALLMWeight | None:
        """A matrix finished by an earlier (interrupted) run, or None."""
        tpath, mpath = self._partial_paths(index)
        if not (tpath.is_file() and mpath.is_file()):
            return None
        try:
            meta = json.loads(mpath.read_text())
            if meta.get("name") != name:
                return None
            tensors = load_file(tpath)
        except (json.JSONDecodeError, SafetensorError, OSError):
            return None  # incomplete leftovers are recomputed
        shared = {k[len("shared."):]: v for k, v in tensors.items() if k.startswith("shared.")}
        weight = ReALLMWeight.from_dict(tensors, meta["container"], shared)
        weight.meta.setdefault("stats", meta.get("stats", {}))
        return weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        name, index, W = batch["name"], int(batch["index"]), batch["weight"]
        cfg = self.config_for(name)
        if cfg is None or self._is_done(index, name):
            return None
        tensors, numel = self._shared.get(cfg.key(), (None, None))
        weight = compress_weight(W.to(self.device), cfg, name=name, shared=tensors, shared_numel=numel)
        err = relative_error(W.to(self.device), weight.dequantize())
        tensors, meta = weight.to_dict()
        tensors.update({f"shared.{k}": v for k, v in weight.shared.items()})
        tpath, mpath = self._partial_paths(index)
        tpath.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, tpath)
        stats = {"rel_frobenius_error": err, "orig_dtype": str(W.dtype).replace("torch.", "")}
        atomic_write_text(mpath, json.dumps({"name": name, "container": meta, "stats": stats}))
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
            weight = self.load_partial(index, name)
            if weight is None:
                if self.trainer.fast_dev_run or self.trainer.limit_train_batches != 1.0:
                    continue  # a shortened run: assemble what was done
                raise RuntimeError(f"matrix {name} was not compressed (run interrupted?)")
            swap_in(model, name, weight, stats=weight.meta.pop("stats", {}))
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

