"""Phase 1: compress every selected matrix with the configured method (data-free, or calibration-aware).

One training step = one matrix from the WeightDataModule (several devices share the matrices
through Lightning's distributed sampler). Each finished matrix is written at once to
`run_dir/partial/` (a `reallm.weight.store.WeightStore`), so an interrupted run restarted with the same
--run_dir skips the matrices already done. At the end, rank 0 puts every container into the model, saves the
ReALLM checkpoint in `run_dir/reallm/` and writes `run_dir/results.json`.

Calibration-aware (option `calibration: {path, windows, seq_len, ...}`; data-free is the default): before any
matrix is compressed, the base model runs over a few calibration windows (a `TextDataModule`'s training
windows, streamed in batches) and forward pre-hooks accumulate every selected linear's input second moments
(`reallm.phases.calibration`; kept in `run_dir/partial/calibration.safetensors`, keyed by the windows, so
that a resumed run reuses them). VQ then fits its codebooks and assigns its codes under the output-error
weights, every matrix's relative output error ‖(W − Ŵ)X‖/‖WX‖ is reported beside its Frobenius error, and
results.json says `calibration: {...}` (or `"data-free"`).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from reallm.checkpoint.compressed import save_compressed
from reallm.core.errors import UserError
from reallm.core.hf_models import maybe_tokenizer
from reallm.data.text import TextDataModule
from reallm.layer.bits import bits_report, format_bits_table
from reallm.model.surgery import fit_shared_tensors, resolve_config, swap_in
from reallm.ops.weighting import output_error_sq, relative_output_error
from reallm.phases import calibration as calib
from reallm.phases.base import ReALLMModule
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.pipeline import compress_weight, relative_error
from reallm.weight.store import WeightStore

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
        calibration: calib.CalibrationConfig | None = None,
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
            calibration: calibration-aware compression (None: data-free, the default): the calibration text
                and windows whose input statistics weight the quantizer's objective and the reported error.
        """
        super().__init__(model_name_or_path, checkpoint, run_dir, method, seed)
        self.compression = compression or CompressionConfig()
        if seed:
            self.compression = self.compression.replace(seed=seed)
        self.layer_configs = layer_configs or {}
        self.calibration = calibration
        feedback = [c for c in [self.compression, *self.layer_configs.values()]
                    if c is not None and c.error_feedback != "none"]
        if feedback and calibration is None:
            raise UserError(f"compression.error_feedback: {feedback[0].error_feedback} needs calibration-aware phase 1 "
                            "(--model.init_args.calibration.path): it corrects each layer's errors for its inputs")
        self.automatic_optimization = False
        self._shared: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
        self._moments: calib.InputMoments | None = None
        self._calibration_info: dict[str, Any] | None = None
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

    # -- calibration ------------------------------------------------------------------------------
    def input_moments(self) -> dict[str, torch.Tensor] | None:
        """Layer name → its inputs' second moments on the calibration windows (None: data-free).

        Computed once (identically on every rank: deterministic) before any matrix, on this phase's device,
        and kept in `run_dir/partial/calibration.safetensors` keyed by the model, the layers and the windows."""
        if self.calibration is None:
            return None
        if self._moments is None:
            self._moments = self._compute_moments()
        return self._moments.moments

    def _compute_moments(self) -> calib.InputMoments:

        cal = self.calibration
        dm = self.trainer.datamodule
        names = [n for n in dm.names if self.config_for(n) is not None]
        text = TextDataModule(path=cal.path, model_name_or_path=self.model_source(), seq_len=cal.seq_len,
                              train_path=cal.path, train_sequences=cal.windows, batch_size=cal.batch_size,
                              seed=cal.seed, cache_dir=cal.cache_dir)
        loader = text.train_dataloader()
        digest = calib.windows_digest(text.train_windows)
        key = {"model": str(self.model_source()), "layers": names, "windows": digest, "full_max": cal.full_max,
               "dtype": str(next(dm.model.parameters()).dtype)}
        path = self.partial_dir / "calibration.safetensors"
        found = calib.load_moments(path, key)
        if found is None:
            home = next(dm.model.parameters()).device
            # the base model on the run's device for the pass (the autoencoder phase calls this in `setup`, before
            # Lightning moves the module: the strategy's device, not the module's), moved back below
            model = dm.model.to(self.trainer.strategy.root_device)
            try:
                found = calib.input_second_moments(model, names, loader, full_max=cal.full_max)
            finally:
                dm.model.to(home)
            found.info = {"seq_len": text.seq_len}
            if self.global_rank == 0:
                calib.save_moments(path, found, key)
        self._calibration_info = {**calib.describe(cal, found, digest), "seq_len": found.info.get("seq_len")}
        return found

    def store_key(self, cfg: CompressionConfig) -> str:
        """The key a finished matrix (or candidate) is stored under: its config, and when calibration-aware the
        calibration windows and settings too (a resumed run with other ones recomputes it)."""
        if self.calibration is None:
            return cfg.key()
        info = self._calibration_info or {}
        return cfg.key() + f"|calibration:{info.get('windows_sha256')}:{info.get('full_max')}"

    def matrix_stats(self, name: str, W: torch.Tensor, weight: ReALLMWeight) -> dict[str, Any]:
        """A compressed matrix's errors against its original W: relative Frobenius error, and with calibration
        the relative output error ‖(W − Ŵ)X‖/‖WX‖ and ‖WX‖² (the absolute objective's scale)."""
        W_hat = weight.dequantize()
        stats: dict[str, Any] = {"rel_frobenius_error": relative_error(W, W_hat),
                                 "orig_dtype": str(W.dtype).replace("torch.", ""),
                                 "w_norm2": float(W.float().square().sum())}
        moments = self.input_moments()
        if moments is not None:
            h = moments[name].to(W.device)
            stats["rel_output_error"] = relative_output_error(W, W_hat, h)
            stats["out_norm2"] = output_error_sq(W.float(), h)
        return stats

    # -- per-matrix work ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        targets = [(n, dm.model.get_submodule(n), c) for n in dm.names if (c := self.config_for(n))]
        if not targets:
            raise UserError("no layer selected: every layer config resolved to None")
        moments = self.input_moments()  # calibration statistics first (None: data-free)
        # shared codebooks are fitted identically on every rank (deterministic), before any matrix
        self._shared = fit_shared_tensors(targets, device=self.device, progress=self.global_rank == 0,
                                          moments=moments)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        name, index, W = batch["name"], int(batch["index"]), batch["weight"]
        cfg = self.config_for(name)
        if cfg is None or self.finished.has(index, name, self.store_key(cfg)):
            return None
        tensors, numel = self._shared.get(cfg.key(), (None, None))
        moments = self.input_moments()
        W = W.to(self.device)
        weight = compress_weight(W, cfg, name=name, shared=tensors, shared_numel=numel,
                                 moments=None if moments is None else moments[name].to(self.device))
        stats = self.matrix_stats(name, W, weight)
        stats.pop("w_norm2")
        err = stats["rel_frobenius_error"]
        self.finished.save(index, name, weight, stats, self.store_key(cfg))
        self.log("rel_frobenius_error", err, on_step=True, prog_bar=True, batch_size=1)
        if "rel_output_error" in stats:
            self.log("rel_output_error", stats["rel_output_error"], on_step=True, prog_bar=True, batch_size=1)
        self.log("bits_per_weight", weight.bits()["per_weight"], on_step=True, prog_bar=True, batch_size=1)
        return None

    # -- assembly -----------------------------------------------------------------------------
    def on_train_end(self) -> None:
        self.trainer.strategy.barrier()
        if self.global_rank != 0:
            return
        dm = self.trainer.datamodule
        model = dm.model
        done = fed = 0
        for index, name in enumerate(dm.names):
            if self.config_for(name) is None:
                continue
            got = self.finished.load(index, name)  # stored under its own (possibly chosen) config's key
            if got is None:
                if self.trainer.fast_dev_run or self.trainer.limit_train_batches != 1.0:
                    continue  # a shortened run: assemble what was done
                raise RuntimeError(f"matrix {name} was not compressed (run interrupted?)")
            weight, stats = got
            swap_in(model, name, weight, stats=stats)
            done += 1
            fed += weight.meta.get("error_feedback") == "gptq"
        out = save_compressed(model, self.require_run_dir() / "reallm", base_model=self.model_source(),
                              tokenizer=maybe_tokenizer(self.model_source()),
                              extra={"method": self.method, "compression": self.compression.to_dict()})
        report = bits_report(model)
        print(format_bits_table(report), flush=True)  # the per-matrix accounting, on stdout
        keys = ("name", "shape", "bits", "nominal", "rel_frobenius_error", "rel_output_error", "items")
        self.write_results({
            "bits": {"nominal": report["nominal"], "decoder_linears": report["decoder_linears"],
                     "whole_model": report["whole_model"]},
            "calibration": ({**(self._calibration_info or {}), "error_feedback_matrices": fed}
                            if self.calibration is not None else "data-free"),
            "mean_rel_frobenius_error": report["mean_rel_frobenius_error"],
            **({"mean_rel_output_error": report["mean_rel_output_error"]} if self.calibration is not None else {}),
            "matrices": [{k: m[k] for k in keys if k in m} for m in report["matrices"]],
            "compressed_matrices": done,
            "checkpoint_dir": str(out),
            "complete": done == sum(1 for n in dm.names if self.config_for(n) is not None),
        })

