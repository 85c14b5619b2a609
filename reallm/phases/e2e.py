"""Phase 3: end-to-end fine-tuning of the DoRA parts (method.md §7), on the causal-LM loss or distilled from the
original model.

Loss (`loss`): "ce", the causal-LM loss (`model(input_ids, labels=input_ids).loss`, the paper's); "kl", the
KL divergence from the teacher's next-token distribution to the student's at temperature T
(`reallm.phases.distillation`: KL(teacher ‖ student) × T²; the teacher is the original model,
`model_source()`); "mix", kl_weight · KL + (1 − kl_weight) · CE. The teacher's targets come
(`teacher`) from a cache on disk computed once per training window set (`cache`: top-k or all
log-probabilities, size stated in results.json and refused above `teacher_cache_max_gb`), or are computed
at every step (`stream`). Either way the teacher runs where `teacher_device` says: "cpu" (default: it never
sits beside the student on an accelerator) or "device" (the training device: for the cache, only while the
cache is built, before the student is loaded there; for streaming, the whole teacher resides beside the
student, which suits small models only).

Training windows come from any text datamodule; only the DoRA parameters (m, A, B) train, with AdamW and a
cosine schedule with linear
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

from reallm.checkpoint.compressed import save_compressed
from reallm.core.errors import UserError
from reallm.core.hf_models import clean_name, load_hf_model, maybe_tokenizer
from reallm.core.schedules import cosine_warmup
from reallm.layer.auto_runtime import AUTO_MEMORY_FRACTION
from reallm.layer.bits import bits_report
from reallm.layer.linear import RuntimeMode, iter_reallm_layers
from reallm.layer.stored import check_stored_items, make_stored_trainable, write_back_stored
from reallm.model.surgery import mark_only_adapters_trainable
from reallm.phases import distillation as distill
from reallm.phases.base import ReALLMModule
from reallm.phases.validation import PerplexityMixin, input_ids_of

LossKind = Literal["ce", "kl", "mix"]


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
        runtime_memory_fraction: float = AUTO_MEMORY_FRACTION,
        train_stored: list[str] | None = None,
        seed: int = 0,
        loss: LossKind = "ce",
        kl_weight: float = 0.5,
        temperature: float = 1.0,
        teacher: Literal["cache", "stream"] = "cache",
        teacher_device: Literal["cpu", "device"] = "cpu",
        teacher_topk: int | None = 64,
        teacher_cache_dir: str | None = None,
        teacher_cache_max_gb: float = 8.0,
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
                tiles at every forward; the memory-efficient default, since the memory a training step takes
                later is not known when "auto" decides), "cache" (decoded once into a dense copy in the compute
                dtype; faster when memory allows) or "auto" (cached where the dense copies fit
                `runtime_memory_fraction` of the free memory of the device, decided at the first forward;
                docs/runtime.md).
            runtime_memory_fraction: the share of the free device memory "auto" lets the dense copies take,
                in (0, 1].
            train_stored: also fine-tune these stored tensors of the compressed linears while the codes stay
                frozen: "codebook" (VQ / additive codebooks, autoencoder latent codebooks) and / or "scales"
                (block-scale maxima and offset, RTN min / step, E8P lattice scales); written back at their stored
                precision, so the accounted bits do not change (`reallm.layer.stored.make_stored_trainable`).
            seed: recorded in results.json (seed_everything seeds the run).
            loss: "ce" (causal-LM cross-entropy), "kl" (distillation from the original model) or "mix"
                (kl_weight · KL + (1 − kl_weight) · CE).
            kl_weight: the KL share of "mix", in [0, 1].
            temperature: T of the teacher's and the student's softmax in the KL (the KL is multiplied by T²).
            teacher: "cache" (the teacher's targets computed once per training window set and kept on disk) or
                "stream" (the teacher runs at every step).
            teacher_device: where the teacher runs: "cpu" or "device" (the training device; see the module
                docstring for the memory).
            teacher_topk: keep the teacher's k most probable tokens per position (the KL compares them plus one
                bucket for the rest); None: the full vocabulary.
            teacher_cache_dir: directory of the teacher caches (default ~/.cache/reallm/teacher); a cache is
                named by a hash of the teacher, the windows, T and k, so runs with the same windows share it.
            teacher_cache_max_gb: refuse (one line) a cache larger than this.
        """
        super().__init__(model_name_or_path, checkpoint, run_dir, method, seed)
        if not checkpoint:
            raise UserError("end-to-end fine-tuning needs --model.init_args.checkpoint <run_dir>/reallm")
        if not 0 <= warmup_ratio < 1:
            raise UserError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if autocast not in ("auto", "bf16", "none"):
            raise UserError(f"autocast must be 'auto', 'bf16' or 'none', got {autocast!r}")
        if loss not in ("ce", "kl", "mix"):
            raise UserError(f"loss must be 'ce', 'kl' or 'mix', got {loss!r}")
        if not 0 <= kl_weight <= 1:
            raise UserError(f"kl_weight must be in [0, 1], got {kl_weight}")
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if teacher not in ("cache", "stream") or teacher_device not in ("cpu", "device"):
            raise UserError(f"teacher must be 'cache' or 'stream' and teacher_device 'cpu' or 'device', got "
                            f"{teacher!r} and {teacher_device!r}")
        if teacher_topk is not None and teacher_topk < 1:
            raise UserError(f"teacher_topk must be ≥ 1 (or null for the full vocabulary), got {teacher_topk}")
        self.loss_kind, self.kl_weight, self.temperature = loss, float(kl_weight), float(temperature)
        self.teacher_mode, self.teacher_device, self.teacher_topk = teacher, teacher_device, teacher_topk
        self.teacher_cache_dir = Path(teacher_cache_dir or Path.home() / ".cache" / "reallm" / "teacher").expanduser()
        self.teacher_cache_max_gb = float(teacher_cache_max_gb)
        # the streaming teacher, in a list: an nn.Module attribute would become a submodule of the student
        # (moved to its device, saved in its checkpoints)
        self._teacher_model: list[nn.Module] = []
        self._teacher_cache: distill.TeacherLogitCache | None = None
        self._distill_info: dict[str, Any] = {}
        self._train_kl: list[float] = []
        self.adapters = adapters
        self.set_runtime(runtime, runtime_memory_fraction)
        self.train_stored = check_stored_items(train_stored)
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

        model = self.load_checkpoint_model(self.adapters)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        n_adapters = mark_only_adapters_trainable(model)
        n_stored = make_stored_trainable(model, self.train_stored) if self.train_stored else 0
        if n_adapters + n_stored == 0:
            raise UserError("the checkpoint has no DoRA/LoRA parameter to train (rank 0): use a preset "
                            "with rank ≥ 1, or train its codebooks / scales (train_stored)")
        self.trained_stored_values = n_stored
        if self.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # dropout as the model defines it (Lightning switches to eval for validation)
        self.model = model

    def setup(self, stage: str) -> None:
        self.setup_perplexity()
        if stage == "fit" and self.loss_kind != "ce":
            self._setup_teacher()

    # -- the teacher -------------------------------------------------------------------------------
    def _teacher_run_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.teacher_device == "device" else torch.device("cpu")

    def _load_teacher(self, device: torch.device) -> nn.Module:

        teacher = load_hf_model(self.model_source(), "float32").to(device).eval().requires_grad_(False)
        if hasattr(teacher.config, "use_cache"):
            teacher.config.use_cache = False
        return teacher

    def _setup_teacher(self) -> None:
        """Before the student is loaded onto the device: the teacher cache is found or built (rank 0 builds, the
        others wait), or the streaming teacher is loaded."""
        info = {"loss": self.loss_kind, "kl_weight": self.kl_weight if self.loss_kind == "mix" else None,
                "temperature": self.temperature, "teacher": self.teacher_mode, "teacher_device": self.teacher_device,
                "teacher_topk": self.teacher_topk, "teacher_model": self.model_source()}
        if self.teacher_mode == "stream":
            self._teacher_model = [self._load_teacher(self._teacher_run_device())]
            self._distill_info = info
            return
        dm = self.trainer.datamodule
        windows = getattr(dm, "train_windows", None)
        if windows is None:
            raise UserError("teacher: cache needs a text datamodule with training windows (train_path)")
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(self.model_source()).vocab_size
        cache = distill.TeacherLogitCache(self.teacher_cache_dir, windows, self.model_source(), vocab,
                                          self.temperature, self.teacher_topk)
        reused = cache.exists()
        if not reused:
            cache.check_size(self.teacher_cache_max_gb * 1e9)
            if self.global_rank == 0:
                device = self._teacher_run_device()
                teacher = self._load_teacher(device)
                batch = max(1, int(getattr(dm, "batch_size", 8)))
                cache.build(lambda ids: teacher(input_ids=ids.to(device), use_cache=False).logits, batch)
                del teacher
            self.trainer.strategy.barrier()
        cache.open()
        self._teacher_cache = cache
        self._distill_info = {**info, "cache": {**cache.describe(), "reused": reused}}

    def teacher_targets(self, ids: Tensor) -> distill.TeacherTargets:
        """The teacher's targets for the windows `ids` (B, L), on the student's device."""
        if self._teacher_cache is not None:
            return self._teacher_cache.lookup(ids).to(self.device)
        device = self._teacher_run_device()
        with torch.no_grad():
            logits = self._teacher_model[0](input_ids=ids.to(device), use_cache=False).logits  # (B, L, V)
        return distill.teacher_targets(logits, self.temperature, self.teacher_topk).to(self.device)

    def on_train_start(self) -> None:
        # decoded frozen weights cached by an earlier `validate` are inference tensors, which autograd
        # cannot save for backward: decode them again

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
        if self.loss_kind == "ce":
            with self._autocast():
                loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            targets = self.teacher_targets(ids)
            with self._autocast():
                out = self.model(input_ids=ids, labels=ids if self.loss_kind == "mix" else None, use_cache=False)
            kl = distill.kl_to_teacher(out.logits, targets, self.temperature)
            loss = kl if self.loss_kind == "kl" else self.kl_weight * kl + (1 - self.kl_weight) * out.loss
            self.log("train/kl", kl.detach(), prog_bar=True, on_step=True, batch_size=ids.shape[0])
            self._train_kl.append(float(kl.detach()))
            if self.loss_kind == "mix":
                self.log("train/ce", out.loss.detach(), on_step=True, batch_size=ids.shape[0])
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
        if fresh is not None and self.train_stored:
            make_stored_trainable(fresh, self.train_stored)  # the same parameter names as the trained model
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

        write_back_stored(model)  # trained codebooks / scales back at their stored precision
        out = save_compressed(model, self.require_run_dir() / "reallm", base_model=self.model_source(),
                              tokenizer=maybe_tokenizer(str(self.checkpoint), self.model_source()),
                              frozen_from=None if self.train_stored else self.checkpoint,
                              extra={"phase": self.phase, "from_checkpoint": str(Path(self.checkpoint).absolute())})
        rep = bits_report(model)
        losses = self._train_losses
        k = max(1, min(10, len(losses) // 5 or 1))

        def first_last(values: list[float]) -> dict[str, Any]:
            return {"first": sum(values[:k]) / k if values else None,
                    "last": sum(values[-k:]) / k if values else None, "steps": len(values)}

        self.write_results({
            "bits": {"nominal": rep["nominal"], "decoder_linears": rep["decoder_linears"],
                     "whole_model": rep["whole_model"]},
            "perplexity": self.perplexity,
            "runtime": self.runtime_info(self.model),
            "validation_history": self.validation_history,
            "loss": self.loss_kind,
            "distillation": ({**self._distill_info, "train_kl": first_last(self._train_kl)}
                             if self.loss_kind != "ce" else None),
            "train_loss": first_last(losses),
            "optimizer_steps": int(self.trainer.global_step),
            "trainable_parameters": sum(p.numel() for p in self.trainable_parameters()),
            "checkpoint_dir": str(out),
            "complete": not self.trainer.interrupted,
        })
