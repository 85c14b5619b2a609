"""`RunArtifacts` (`--artifacts.*`): the run's figures into run_dir/figures/ and, when a W&B logger is
attached, everything the run made to W&B (`reallm.run.tracking`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reallm.core.hf_models import read_weight
from reallm.layer.linear import iter_reallm_layers
from reallm.phases.base import ReALLMModule
from reallm.run.tracking import log_config, upload_run, wandb_runs

__all__ = ["RunArtifacts"]


class RunArtifacts(L.Callback):
    """At the end of a run: figures into run_dir/figures/, and everything to W&B when a W&B logger
    is attached (results.json's numbers as the run summary, the per-matrix table, the figures,
    results.json and config.yaml as files and as a `results` artifact); the W&B run is finished.

    Figures (`reallm.run.plots`): `error_by_block.png` (per-matrix relative error against block index,
    one panel per layer type) and `heatmap_<layer>.png` (W, its residual, Ŵ and the error) of one
    compressed matrix, the first by default.
    """

    def __init__(self, figures: bool = True, heatmap_layer: str | None = None) -> None:
        """
        Args:
            figures: write the run's figures.
            heatmap_layer: the matrix shown in the heat maps (a layer name, e.g.
                `model.layers.0.self_attn.q_proj`); None: the first compressed matrix.
        """
        super().__init__()
        self.figures = figures
        self.heatmap_layer = heatmap_layer
        self._original: tuple[str, Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: ReALLMModule, stage: str) -> None:
        if trainer.global_rank == 0:
            for run in wandb_runs(trainer):
                log_config(run, pl_module.resolved_config or {})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: ReALLMModule, batch: Any, batch_idx: int) -> None:
        # phase 1 streams the original matrices: keep the one the heat maps will show
        if self._original is None and self.figures and isinstance(batch, dict) and "weight" in batch:
            name = str(batch["name"])
            if self.heatmap_layer in (None, name):
                self._original = (name, batch["weight"].detach().to("cpu", copy=True))

    def _heatmap_input(self, trainer: L.Trainer,
                       pl_module: ReALLMModule) -> tuple[str, Tensor, Tensor, Tensor | None] | None:
        model = pl_module.phase_model
        if model is None:
            return None
        layers = dict(iter_reallm_layers(model))
        name = self.heatmap_layer or (self._original[0] if self._original else next(iter(layers), None))
        if name is None or name not in layers:
            return None
        layer = layers[name]
        if self._original is not None and self._original[0] == name:
            W = self._original[1]
        else:
            W = read_weight(pl_module.model_source(), name, layer.layout)
            if W is None:
                return None
        with torch.no_grad():
            W_hat = layer.dequantize().cpu()
            low = layer.lowrank_product()
            low = None if low is None else low.detach().float().cpu()
        return name, W, W_hat, low

    def teardown(self, trainer: L.Trainer, pl_module: ReALLMModule, stage: str) -> None:
        if trainer.global_rank != 0:
            return
        run_dir = pl_module.run_dir
        if run_dir is None:
            return
        results_path = Path(run_dir) / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else None
        written: list[Path] = []
        if self.figures and results is not None:
            from reallm.run.plots import write_run_figures  # matplotlib is imported only when figures are drawn

            written = write_run_figures(run_dir, results, self._heatmap_input(trainer, pl_module))
        for run in wandb_runs(trainer):
            upload_run(run, run_dir, results, written)
            run.finish()

    def on_exception(self, trainer: L.Trainer, pl_module: ReALLMModule, exception: BaseException) -> None:
        if trainer.global_rank != 0:
            return
        for run in wandb_runs(trainer):
            run.finish(exit_code=1)
