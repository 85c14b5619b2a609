"""Lightning callbacks the CLI adds to every run (each has a key of the config):

- `NonFiniteGuard` (`nan_guard`): stops the run at the first NaN or Inf in a loss, a logged metric,
  a weight being compressed or a trained weight, with one line that names the layer and the step.
- `EvalAfterFit` (`eval_after_fit`): optionally measures the perplexity (protocol.md) of the model a
  `fit` phase produced and adds it to results.json, so that one run (e.g. of a sweep over bits and
  rank) gives both sides of the bits / perplexity trade-off.
- `RunArtifacts` (`artifacts`): writes the run's figures into run_dir/figures/ and, when a W&B
  logger is attached, uploads results, config, figures and the per-matrix table (`reallm.tracking`).

They find the phase's model where the phases keep it: `pl_module.model` (evaluation, end-to-end),
`pl_module._model` (block-wise, deliberately unregistered) or `trainer.datamodule.model` (phase 1,
which compresses the datamodule's model in place).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reallm.errors import UserError
from reallm.hf import clean_name

__all__ = ["EvalAfterFit", "NonFiniteError", "NonFiniteGuard", "RunArtifacts", "phase_model"]


class NonFiniteError(UserError):
    """A NaN or Inf in a loss, a metric or a weight (one line: what, where, at which step)."""


def phase_model(trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module | None:
    """The model a phase works on (see the module docstring), or None."""
    dm = getattr(trainer, "datamodule", None)
    try:
        own = getattr(pl_module, "model", None)
    except RuntimeError:  # a phase whose model property refuses before configure_model()
        own = None
    for cand in (own, pl_module.__dict__.get("_model"), getattr(dm, "model", None)):
        if isinstance(cand, nn.Module):
            return cand
    return None


def _first_nonfinite(named: list[tuple[str, Tensor]]) -> tuple[str, str] | None:
    """(name, "nan" | "inf") of the first tensor holding a non-finite value, or None.
    One device sync per device when everything is finite (the common case)."""
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append((i, torch.isfinite(t.detach()).all()))
    bad = []
    for flags in by_device.values():
        ok = torch.stack([f for _, f in flags]).cpu().tolist()
        bad += [i for (i, _), good in zip(flags, ok) if not good]
    if not bad:
        return None
    n, t = named[min(bad)]
    return n, "nan" if bool(torch.isnan(t).any()) else "inf"


def _layer_of(param_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A` → `model.layers.0.self_attn.q_proj` (the layer)."""
    head, _, last = param_name.rpartition(".")
    return head if head and last in ("lora_A", "lora_B", "magnitude", "weight", "bias") else param_name


class NonFiniteGuard(L.Callback):
    """Stop at the first NaN / Inf, with a message naming the layer and the global step.

    Checked: the weight matrix a phase-1 step compresses (before and, through its logged error,
    after), the training loss of every step, every logged training metric, the trainable weights
    after every optimiser step (`every_n_steps`), the weights and buffers of the evaluated model
    when validation starts, and the validation metrics (perplexity) at the end.
    """

    def __init__(self, enabled: bool = True, every_n_steps: int = 1, check_eval_weights: bool = True) -> None:
        """
        Args:
            enabled: switch the guard off (e.g. to look at a diverging run on purpose).
            every_n_steps: check the trainable weights every this many steps (the loss and logged
                metrics are checked at every step).
            check_eval_weights: check every floating weight and buffer of the model before
                validation (one pass over the model).
        """
        super().__init__()
        self.enabled = enabled
        self.every_n_steps = max(1, int(every_n_steps))
        self.check_eval_weights = check_eval_weights
        self._names: dict[int, str] = {}
        self._batch_layer: str | None = None

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _where(trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int | None = None) -> str:
        if [o for o in trainer.optimizers if type(o).__name__ != "_MockOptimizer"]:
            where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}"
            where += f", batch {batch_idx})" if batch_idx is not None else ")"
        else:  # nothing is optimised (phase 1): a step is a batch
            where = f"step {batch_idx} (epoch {trainer.current_epoch})" if batch_idx is not None \
                else f"epoch {trainer.current_epoch}"
        block = trainer.callback_metrics.get("block")
        if block is not None and getattr(pl_module, "phase", "") == "blockwise":
            where += f", block {int(block)}"
        return where

    def _param_names(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[int, str]:
        if not self._names:
            # the phase's model first, so that names read as in the model (`model.layers.0...`)
            modules = [phase_model(trainer, pl_module), pl_module]
            modules += [v for v in pl_module.__dict__.values() if isinstance(v, nn.Module)]
            for mod in [m for m in modules if m is not None]:
                for n, p in mod.named_parameters():
                    self._names.setdefault(id(p), clean_name(n))
        return self._names

    def _trained(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[str, Tensor]]:
        names = self._param_names(trainer, pl_module)
        seen, out = set(), []
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append((names.get(id(p), f"parameter {tuple(p.shape)}"), p.detach()))
        return out

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._batch_layer, self._batch_idx = None, batch_idx
        if not self.enabled or not isinstance(batch, dict) or "weight" not in batch:
            return
        self._batch_layer = str(batch.get("name"))
        bad = _first_nonfinite([(self._batch_layer, batch["weight"])])
        if bad:
            raise NonFiniteError(f"{bad[1]} in the weight of layer {bad[0]} (before compression), at "
                                 f"{self._where(trainer, pl_module, batch_idx)}")

    def _check_loss(self, trainer, pl_module, loss: Any, batch_idx: int | None) -> None:
        if isinstance(loss, Tensor) and loss.numel() and not bool(torch.isfinite(loss.detach()).all()):
            detail = self._weights_detail(trainer, pl_module)
            raise NonFiniteError(f"training loss is {_kind(loss)} at {self._where(trainer, pl_module, batch_idx)}"
                                 f"{detail}")

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        # before backward and before the optimiser step: the weights are still those that made the loss
        if self.enabled:
            self._check_loss(trainer, pl_module, loss, getattr(self, "_batch_idx", None))

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        where = self._where(trainer, pl_module, batch_idx)
        self._check_loss(trainer, pl_module, outputs.get("loss") if isinstance(outputs, dict) else outputs, batch_idx)
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, Tensor) and value.numel() == 1 and not math.isfinite(float(value)):
                layer = f" for layer {self._batch_layer}" if self._batch_layer else self._weights_detail(trainer,
                                                                                                        pl_module)
                raise NonFiniteError(f"logged metric {key!r} is {_kind(value)}{layer} at {where}")
        if (trainer.global_step % self.every_n_steps) == 0:
            bad = _first_nonfinite(self._trained(trainer, pl_module))
            if bad:
                raise NonFiniteError(f"{bad[1]} in weight {bad[0]} (layer {_layer_of(bad[0])}) after the "
                                     f"optimiser step, at {where}")

    def _weights_detail(self, trainer, pl_module) -> str:
        bad = _first_nonfinite(self._trained(trainer, pl_module))
        if bad:
            return f"; first non-finite weight: {bad[0]} (layer {_layer_of(bad[0])})"
        return "; all trained weights are finite (the forward pass overflowed: lower the learning rate " \
               "or compute in float32)"

    def on_validation_start(self, trainer, pl_module) -> None:
        if not (self.enabled and self.check_eval_weights) or trainer.sanity_checking:
            return
        if trainer.state.fn != "validate":
            return  # during fit, the trained weights are checked after every step
        model = phase_model(trainer, pl_module)
        if model is None:
            return
        named = [(n, t) for n, t in model.named_parameters()] + [(n, t) for n, t in model.named_buffers()]
        bad = _first_nonfinite(named)
        if bad:
            raise NonFiniteError(f"{bad[1]} in tensor {bad[0]} (layer {_layer_of(bad[0].replace('frozen__', ''))}) "
                                 f"of the evaluated model, before validation")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("ppl/", "val/")) and isinstance(value, Tensor) and value.numel() == 1 \
                    and not math.isfinite(float(value)):
                raise NonFiniteError(f"validation metric {key!r} is {_kind(value)} at "
                                     f"{self._where(trainer, pl_module)} (the weights are finite: the forward "
                                     f"pass overflowed; evaluate in float32)")


def _kind(t: Tensor) -> str:
    return "nan" if bool(torch.isnan(t.detach()).any()) else "inf"


# ------------------------------------------------------------------------------------------------
# perplexity of a fit phase's result
# ------------------------------------------------------------------------------------------------
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

    def _datamodule(self, source: str):
        from reallm.datamodules.text import TextDataModule

        dm = TextDataModule(path=self.path, model_name_or_path=source, seq_len=self.seq_len,
                            max_eval_windows=self.max_eval_windows, batch_size=self.batch_size,
                            cache_dir=self.cache_dir, allow_beyond_context=self.allow_beyond_context)
        dm.option_prefix = "--eval_after_fit."  # errors name this callback's options
        return dm

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.path and stage == "fit" and trainer.global_rank == 0:
            _ = self._datamodule(pl_module.model_source()).seq_len  # a window beyond the context fails now

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if not self.path or stage != "fit" or trainer.global_rank != 0 or trainer.interrupted:
            return
        run_dir = getattr(pl_module, "run_dir", None)
        results_path = Path(run_dir) / "results.json" if run_dir else None
        model = phase_model(trainer, pl_module)
        if model is None or results_path is None or not results_path.is_file():
            return
        from reallm.evaluation.perplexity import perplexity
        from reallm.files import atomic_write_json
        from reallm.hf import has_tokenizer

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


# ------------------------------------------------------------------------------------------------
# figures and W&B uploads
# ------------------------------------------------------------------------------------------------
class RunArtifacts(L.Callback):
    """At the end of a run: figures into run_dir/figures/, and everything to W&B when a W&B logger
    is attached (results.json's numbers as the run summary, the per-matrix table, the figures,
    results.json and config.yaml as files and as a `results` artifact); the W&B run is finished.

    Figures (`reallm.plots`): `error_by_block.png` (per-matrix relative error against block index,
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

    def setup(self, trainer, pl_module, stage: str) -> None:
        from reallm.tracking import log_config, wandb_runs

        if trainer.global_rank == 0:
            for run in wandb_runs(trainer):
                log_config(run, getattr(pl_module, "resolved_config", None) or {})

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        # phase 1 streams the original matrices: keep the one the heat maps will show
        if self._original is None and self.figures and isinstance(batch, dict) and "weight" in batch:
            name = str(batch["name"])
            if self.heatmap_layer in (None, name):
                self._original = (name, batch["weight"].detach().to("cpu", copy=True))

    def _heatmap_input(self, trainer, pl_module) -> tuple[str, Tensor, Tensor, Tensor | None] | None:
        from reallm.hf import read_weight
        from reallm.surgery import iter_reallm_layers

        model = phase_model(trainer, pl_module)
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
            low = layer._lowrank_product()
            low = None if low is None else low.detach().float().cpu()
        return name, W, W_hat, low

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank != 0:
            return
        from reallm.tracking import upload_run, wandb_runs

        run_dir = getattr(pl_module, "run_dir", None)
        if run_dir is None:
            return
        results_path = Path(run_dir) / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else None
        written: list[Path] = []
        if self.figures and results is not None:
            from reallm.plots import write_run_figures

            written = write_run_figures(run_dir, results, self._heatmap_input(trainer, pl_module))
        for run in wandb_runs(trainer):
            upload_run(run, run_dir, results, written)
            run.finish()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.global_rank != 0:
            return
        from reallm.tracking import wandb_runs

        for run in wandb_runs(trainer):
            run.finish(exit_code=1)

