"""Phase 3: end-to-end causal-LM fine-tuning of the DoRA parts (method.md §7).

Causal-LM loss (`model(input_ids, labels=input_ids).loss`) over any text datamodule's training
windows; only the DoRA parameters (m, A, B) train, with AdamW and a cosine schedule with linear
warm-up (3 % of the optimiser steps by default). Everything else is Lightning's: gradient clipping
(`trainer.gradient_clip_val`), accumulation, periodic validation (`trainer.val_check_interval`),
checkpoint / resume (`--ckpt_path`; the Lightning checkpoint keeps only the trainable tensors),
DDP and FSDP strategies. bf16 autocast is on by default on GPUs (`autocast: auto`), gradient
checkpointing optional. Validation perplexity follows protocol.md on every evaluation dataset of the
datamodule (torchmetrics `Perplexity`).

At the end, `run_dir/reallm/` is a ReALLM checkpoint with the tuned adapters that references the
input checkpoint's frozen part (not copied), and `run_dir/results.json` records bits, perplexities
and the validation history.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from reallm.errors import UserError
from reallm.hf import clean_name
from reallm.modules.base import ReALLMModule
from reallm.modules.perplexity import PerplexityMixin, input_ids_of
from reallm.nn.dora import RuntimeMode
from reallm.training.schedules import cosine_warmup


class EndToEndPhase(PerplexityMixin, ReALLMModule):
    """Phase 3: end-to-end causal-LM fine-tuning of the DoRA parameters of a ReALLM checkpoint."""

    phase = "e2e"
    starts_from = "checkpoint"

    def __init__(
        self,
        checkpoint: str | None = None,
        model_name_or_path: str | None = None,
        run_dir: str | None = None,
        method: str = "custom",
        adapters: str = "default",
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        autocast: Literal["auto", "bf16", "none"] = "auto",
        gradient_checkpointing: bool = False,
        runtime: RuntimeMode = "resident",
        seed: int = 0,
    ) -> None:
        """
        Args:
            checkpoint: the ReALLM checkpoint to fine-tune (phase 1's or phase 2's `<run_dir>/reallm`).
            model_name_or_path: recorded as the base model (default: the checkpoint's `base_model`).
            run_dir: the run directory (set by --run_dir).
            method: a label for results.json (the preset the checkpoint was made with).
            adapters: the checkpoint's adapter set to start from.
            lr: peak AdamW learning rate (paper: 2e-5).
            betas: AdamW betas.
            weight_decay: AdamW weight decay of the DoRA parameters.
            warmup_ratio: fraction of the optimiser steps of linear warm-up before the cosine decay.
            min_lr_ratio: the cosine decays to lr × min_lr_ratio.
            autocast: "auto" runs forward passes under bf16 autocast on CUDA and in fp32 elsewhere;
                "bf16" always (CPU too); "none" never (or use --trainer.precision).
            gradient_checkpointing: recompute the blocks' activations in the backward pass
                (Hugging Face gradient checkpointing, non-reentrant).
            runtime: how the compressed linears run: "resident" (the stored form only, decoded in row
                tiles at every forward; the memory-efficient default) or "cache" (decoded once into a dense
                copy in the compute dtype; faster when memory allows).
            seed: recorded in results.json (seed_everything seeds the run).
        """
        super().__init__(model_name_or_path, checkpoint, run_dir, method, seed)
        if not checkpoint:
            raise UserError("end-to-end fine-tuning needs --model.init_args.checkpoint <run_dir>/reallm")
        if not 0 <= warmup_ratio < 1:
            raise UserError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if autocast not in ("auto", "bf16", "none"):
            raise UserError(f"autocast must be 'auto', 'bf16' or 'none', got {autocast!r}")
        self.adapters = adapters
        self.runtime = runtime
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_ratio, self.min_lr_ratio = warmup_ratio, min_lr_ratio
        self.autocast_mode = autocast
        self.gradient_checkpointing = gradient_checkpointing
        self.model: nn.Module | None = None
        self.ppl_metrics = nn.ModuleList()
        self.strict_loading = False  # Lightning checkpoints keep only the trainable tensors
        self._train_losses: list[float] = []
        self.save_hyperparameters(ignore=["run_dir", "model_name_or_path", "seed"])  # no clash with the data's

    # -- model ------------------------------------------------------------------------------
    @property
    def phase_model(self) -> nn.Module | None:
        return self.model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from reallm.surgery import mark_only_adapters_trainable

        model = self.load_checkpoint_model(self.adapters)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        if mark_only_adapters_trainable(model) == 0:
            raise UserError("the checkpoint has no DoRA/LoRA parameter to train (rank 0): use a preset "
                            "with rank ≥ 1")
        if self.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # dropout as the model defines it (Lightning switches to eval for validation)
        self.model = model

    def setup(self, stage: str) -> None:
        self.setup_perplexity()

    def on_train_start(self) -> None:
        # decoded frozen weights cached by an earlier `validate` are inference tensors, which autograd
        # cannot save for backward: decode them again
        from reallm.surgery import iter_reallm_layers

        for _, layer in iter_reallm_layers(self.model):
            layer.clear_cache()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _autocast(self):
        on = self.autocast_mode == "bf16" or (self.autocast_mode == "auto" and self.device.type == "cuda")
        if not on:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def lm_logits(self, input_ids: Tensor) -> Tensor:
        with self._autocast():
            return self.model(input_ids=input_ids, use_cache=False).logits  # (B, L, V)

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, betas=self.betas,
                                weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(self.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_warmup(total, warmup, self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids = input_ids_of(batch)  # (B, L)
        with self._autocast():
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=ids.shape[0])
        self._train_losses.append(float(loss.detach()))
        return loss

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only what trains: the frozen part is in the ReALLM checkpoint this run started from
        trainable = {"model." + clean_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if clean_name(k) in trainable}
        checkpoint["reallm_checkpoint"] = str(Path(self.checkpoint).absolute())

    # -- assembly ----------------------------------------------------------------------------------
    def _export_model(self) -> nn.Module | None:
        """The model whose adapters are saved (rank 0; None elsewhere). Under FSDP the trainable
        parameters are gathered (every rank must call this) into a fresh CPU copy of the checkpoint."""
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(self.trainer.strategy, FSDPStrategy):
            return self.model if self.global_rank == 0 else None
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        fresh = self.load_checkpoint_model(self.adapters) if self.global_rank == 0 else None
        with FSDP.summon_full_params(self.trainer.strategy.model, writeback=False), torch.no_grad():
            if fresh is not None:
                for name, p in self.model.named_parameters():
                    if p.requires_grad:
                        fresh.get_parameter(clean_name(name)).copy_(p.detach().cpu())
        return fresh

    def on_train_end(self) -> None:
        model = self._export_model()
        if model is None:
            return
        from reallm.bits import bits_report
        from reallm.checkpoint import save_compressed
        from reallm.hf import maybe_tokenizer

        out = save_compressed(model, self.require_run_dir() / "reallm", base_model=self.model_source(),
                              tokenizer=maybe_tokenizer(str(self.checkpoint), self.model_source()),
                              frozen_from=self.checkpoint,
                              extra={"phase": self.phase, "from_checkpoint": str(Path(self.checkpoint).absolute())})
        rep = bits_report(model)
        losses = self._train_losses
        k = max(1, min(10, len(losses) // 5 or 1))
        self.write_results({
            "bits": {"nominal": rep["nominal"], "decoder_linears": rep["decoder_linears"],
                     "whole_model": rep["whole_model"]},
            "perplexity": self.perplexity,
            "runtime": self.runtime_info(self.model),
            "validation_history": self.validation_history,
            "train_loss": {"first": sum(losses[:k]) / k if losses else None,
                           "last": sum(losses[-k:]) / k if losses else None, "steps": len(losses)},
            "optimizer_steps": int(self.trainer.global_step),
            "trainable_parameters": sum(p.numel() for p in self.trainable_parameters()),
            "checkpoint_dir": str(out),
            "complete": not self.trainer.interrupted,
        })
