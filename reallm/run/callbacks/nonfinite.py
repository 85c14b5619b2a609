"""`NonFiniteGuard` (`--nan_guard.*`): stop a run at the first NaN or Inf in a loss, a logged metric, a
weight being compressed or a trained weight, with one line that names the layer and the step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reallm.core.errors import NonFiniteError
from reallm.core.hf_models import clean_name
from reallm.phases.base import ReALLMModule

__all__ = ["NonFiniteGuard"]


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
    def _where(trainer: L.Trainer, pl_module: ReALLMModule, batch_idx: int | None = None) -> str:
        if [o for o in trainer.optimizers if type(o).__name__ != "_MockOptimizer"]:
            where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}"
            where += f", batch {batch_idx})" if batch_idx is not None else ")"
        else:  # nothing is optimised (phase 1): a step is a batch
            where = f"step {batch_idx} (epoch {trainer.current_epoch})" if batch_idx is not None \
                else f"epoch {trainer.current_epoch}"
        block = trainer.callback_metrics.get("block")
        if block is not None and pl_module.phase == "blockwise":
            where += f", block {int(block)}"
        return where

    def _param_names(self, trainer: L.Trainer, pl_module: ReALLMModule) -> dict[int, str]:
        if not self._names:
            # the phase's model first, so that names read as in the model (`model.layers.0...`)
            for mod in [m for m in (pl_module.phase_model, pl_module) if m is not None]:
                for n, p in mod.named_parameters():
                    self._names.setdefault(id(p), clean_name(n))
        return self._names

    def _trained(self, trainer: L.Trainer, pl_module: ReALLMModule) -> list[tuple[str, Tensor]]:
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
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: ReALLMModule, batch: Any, batch_idx: int) -> None:
        self._batch_layer, self._batch_idx = None, batch_idx
        if not self.enabled or not isinstance(batch, dict) or "weight" not in batch:
            return
        self._batch_layer = str(batch.get("name"))
        bad = _first_nonfinite([(self._batch_layer, batch["weight"])])
        if bad:
            raise NonFiniteError(f"{bad[1]} in the weight of layer {bad[0]} (before compression), at "
                                 f"{self._where(trainer, pl_module, batch_idx)}")

    def _check_loss(self, trainer: L.Trainer, pl_module: ReALLMModule, loss: Any, batch_idx: int | None) -> None:
        if isinstance(loss, Tensor) and loss.numel() and not bool(torch.isfinite(loss.detach()).all()):
            detail = self._weights_detail(trainer, pl_module)
            raise NonFiniteError(f"training loss is {_kind(loss)} at {self._where(trainer, pl_module, batch_idx)}"
                                 f"{detail}")

    def on_before_backward(self, trainer: L.Trainer, pl_module: ReALLMModule, loss: Tensor) -> None:
        # before backward and before the optimiser step: the weights are still those that made the loss
        if self.enabled:
            self._check_loss(trainer, pl_module, loss, getattr(self, "_batch_idx", None))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ReALLMModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
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

    def _weights_detail(self, trainer: L.Trainer, pl_module: ReALLMModule) -> str:
        bad = _first_nonfinite(self._trained(trainer, pl_module))
        if bad:
            return f"; first non-finite weight: {bad[0]} (layer {_layer_of(bad[0])})"
        return "; all trained weights are finite (the forward pass overflowed: lower the learning rate " \
               "or compute in float32)"

    def on_validation_start(self, trainer: L.Trainer, pl_module: ReALLMModule) -> None:
        if not (self.enabled and self.check_eval_weights) or trainer.sanity_checking:
            return
        if trainer.state.fn != "validate":
            return  # during fit, the trained weights are checked after every step
        model = pl_module.phase_model
        if model is None:
            return
        named = [(n, t) for n, t in model.named_parameters()] + [(n, t) for n, t in model.named_buffers()]
        bad = _first_nonfinite(named)
        if bad:
            raise NonFiniteError(f"{bad[1]} in tensor {bad[0]} (layer {_layer_of(bad[0].replace('frozen__', ''))}) "
                                 f"of the evaluated model, before validation")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: ReALLMModule) -> None:
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
