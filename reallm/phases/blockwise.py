"""Phase 2: block-wise distillation of the DoRA parts (method.md §6, paper Algorithm 2).

For each decoder block j in order, the teacher is the original block j (its tensors read from the
base model's safetensors, one block at a time), the student the compressed block j; the loss is
the MSE (or relative MSE) between their outputs on the calibration sequences, and only block j's
DoRA parameters (m, A, B) train, with their own Adam optimiser.

How it maps onto Lightning (manual optimisation):
- the training dataloader is any text datamodule's (windows (B, L)); it is read once, at the
  start, to capture the inputs of block 0; after that it is the clock of the loop: one epoch =
  one real pass over the calibration set, a step = one micro-batch of B cached sequences, drawn
  through a permutation seeded by (seed, block, epoch), so that a restarted run repeats exactly
  the same steps;
- `max_epochs` is set to (blocks left) × `epochs_per_block`; `configure_optimizers` returns one
  Adam per block and each step uses the current block's; gradients are accumulated over
  ceil(batch_size / B) micro-batches (effective batch `batch_size`, 32 by default);
- block inputs X_j and teacher targets Y_j = teacher_j(X_j) live in an ActivationCache (CPU
  memory or a memory-mapped file, bf16 or fp32); the compressed model stays on the CPU and only
  the current student block and one teacher block are moved to the device. X_{j+1} is student_j(X_j)
  after tuning (default, AQLM-style) or Y_j (`student_inputs: original`, the original stream).
- after block j, its adapters are written atomically to `run_dir/blocks/<j>.safetensors` and
  `<j>.json` (loss before / after); a restarted run with the same --run_dir loads the finished
  blocks, rebuilds the cache through them and continues at the first unfinished block. The final
  adapters equal those of an uninterrupted run (same seed, same device).
At the end, `run_dir/reallm/` is a ReALLM checkpoint that references the input checkpoint's frozen
part (only the adapters are written) and `run_dir/results.json` has the per-block losses.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from reallm.checkpoint.compressed import adapters_fingerprint, save_compressed
from reallm.core.errors import UserError
from reallm.core.hf_models import find_decoder_blocks, maybe_tokenizer, resolve_safetensors
from reallm.core.io import atomic_save_safetensors, atomic_write_json
from reallm.layer.auto_runtime import AUTO_MEMORY_FRACTION
from reallm.layer.bits import bits_report
from reallm.layer.linear import RuntimeMode, iter_reallm_layers
from reallm.layer.stored import check_stored_items, make_stored_trainable, write_back_stored
from reallm.model.surgery import mark_only_adapters_trainable
from reallm.phases.base import ReALLMModule
from reallm.phases.block_io import (
    ActivationCache,
    BlockCall,
    call_block,
    capture_block_inputs,
    check_activation_cache_fits,
    iter_batches,
    load_teacher_block,
    torch_dtype,
)

LossKind = Literal["mse", "relative_mse"]


def block_loss(out: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean over the batch of the per-sequence loss; out, target (b, L, H)."""
    err = (out.float() - target.float()).pow(2).flatten(1)  # (b, L·H)
    if kind == "mse":
        return err.mean()
    if kind == "relative_mse":  # ‖out − y‖² / ‖y‖² per sequence
        return (err.sum(1) / target.float().pow(2).flatten(1).sum(1).clamp_min(1e-12)).mean()
    raise UserError(f"loss must be 'mse' or 'relative_mse', got {kind!r}")


class BlockwisePhase(ReALLMModule):
    """Phase 2: block-wise distillation of each compressed block against the original block."""

    phase = "blockwise"
    starts_from = "checkpoint"

    def __init__(
        self,
        checkpoint: str | None = None,
        model_name_or_path: str | None = None,
        run_dir: str | None = None,
        method: str = "custom",
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        effective_batch: int = 32,
        epochs_per_block: int = 1,
        loss: LossKind = "mse",
        student_inputs: Literal["student", "original"] = "student",
        cache: Literal["cpu", "disk"] = "cpu",
        cache_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        activation_dir: str | None = None,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        runtime: RuntimeMode = "resident",
        runtime_memory_fraction: float = AUTO_MEMORY_FRACTION,
        train_stored: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            checkpoint: the ReALLM checkpoint to tune (phase 1's `<run_dir>/reallm`).
            model_name_or_path: the original model the teachers come from (default: the
                checkpoint's `base_model`); its safetensors are read one block at a time.
            run_dir: the run directory (set by --run_dir); finished blocks are kept in `blocks/`.
            method: a label for results.json (the preset the checkpoint was made with).
            lr: Adam learning rate (paper: 1e-5).
            betas: Adam betas (paper: (0.9, 0.95)).
            weight_decay: Adam weight decay.
            effective_batch: sequences per optimiser step (paper: 32), reached by accumulating
                micro-batches of the datamodule's batch size.
            epochs_per_block: real passes over the calibration set per block.
            loss: "mse" between teacher and student block outputs, or "relative_mse"
                (‖student − teacher‖² / ‖teacher‖² per sequence).
            student_inputs: "student": block j's inputs are the outputs of the already tuned
                compressed blocks 0..j−1 (AQLM-style, the default); "original": the original
                model's stream (teacher outputs).
            cache: keep block inputs / targets in "cpu" memory or memory-mapped on "disk".
            cache_dtype: storage dtype of the cached activations (bfloat16: half of float32's
                N × L × H × 4 bytes × 2; the phase refuses, before it starts, a cache that does not fit
                in the host's available memory, or on the disk of `cache: disk`).
            activation_dir: folder of the disk cache (default `run_dir/cache`; its files are
                deleted at the end).
            teacher_dtype: dtype the original blocks are loaded in.
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
                Tensors shared with other blocks (a model-wide codebook) stay frozen here: tuning block j must
                not change the blocks before it.
            seed: seed of the step order (one permutation per block and epoch).
        """
        super().__init__(model_name_or_path, checkpoint, run_dir, method, seed)
        if not checkpoint:
            raise UserError("block-wise distillation needs --model.init_args.checkpoint <phase-1 run>/reallm")
        if effective_batch < 1 or epochs_per_block < 1:
            raise UserError("effective_batch and epochs_per_block must be ≥ 1")
        if loss not in ("mse", "relative_mse"):
            raise UserError(f"loss must be 'mse' or 'relative_mse', got {loss!r}")
        if student_inputs not in ("student", "original"):
            raise UserError(f"student_inputs must be 'student' or 'original', got {student_inputs!r}")
        if cache not in ("cpu", "disk"):
            raise UserError(f"cache must be 'cpu' or 'disk', got {cache!r}")
        self.set_runtime(runtime, runtime_memory_fraction)
        self.train_stored = check_stored_items(train_stored)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.effective_batch, self.epochs_per_block = int(effective_batch), int(epochs_per_block)
        self.loss_kind, self.student_inputs = loss, student_inputs
        self.cache_kind, self.activation_dir = cache, activation_dir
        self.cache_dtype, self.teacher_dtype = torch_dtype(cache_dtype), torch_dtype(teacher_dtype)
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["run_dir", "model_name_or_path", "seed"])  # no clash with the data's
        # the compressed model is deliberately *not* a registered submodule: Lightning would move
        # it to the device whole; only the block being tuned goes there
        self._model: nn.Module | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._inputs: ActivationCache | None = None
        self._targets: ActivationCache | None = None
        self._call: BlockCall | None = None
        self._current: int | None = None  # block being tuned
        self._epochs_done = 0
        self._pending = 0  # micro-batches accumulated since the last optimiser step
        self._perm: Tensor | None = None
        self._records: dict[int, dict[str, Any]] = {}
        self._fingerprint: dict[str, Any] = {}
        self._bar = None
        self._block_t0 = 0.0
        self._steps = 0
        self._start = self._next = 0
        self._shape: tuple[int, int] | None = None
        self._micro = 1

    # -- model ------------------------------------------------------------------------------
    @property
    def phase_model(self) -> nn.Module | None:
        return self._model

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("the model is loaded in configure_model()")
        return self._model

    def configure_model(self) -> None:
        if self._model is not None:
            return
        model = self.load_checkpoint_model()
        model.eval()  # no dropout: the blocks are trained in eval mode (deterministic)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        mark_only_adapters_trainable(model)
        if self.train_stored:
            make_stored_trainable(model, self.train_stored, shared=False)
        object.__setattr__(self, "_model", model)  # not registered (see __init__)
        self._prefix, blocks = find_decoder_blocks(model)
        object.__setattr__(self, "_blocks", blocks)  # not registered either
        self._layers = [[(n, l) for n, l in iter_reallm_layers(model) if n.startswith(f"{self._prefix}.{j}.")]
                        for j in range(len(self._blocks))]
        empty = [j for j, block in enumerate(self._blocks) if not self.block_parameters(j)]
        if empty:
            raise UserError(f"block {empty[0]} has no DoRA/LoRA parameter to train (the checkpoint was "
                            f"compressed with rank 0: use a preset with rank ≥ 1)")

    def block_parameters(self, j: int) -> list[nn.Parameter]:
        return [p for p in self._blocks[j].parameters() if p.requires_grad]

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    def configure_optimizers(self):
        # one Adam per block (its state starts fresh when the block starts)
        return [torch.optim.Adam(self.block_parameters(j), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay) for j in range(self.n_blocks)]

    def _optimizer(self, j: int):
        opts = self.optimizers()
        return opts[j] if isinstance(opts, list) else opts

    # -- block files ----------------------------------------------------------------------------
    @property
    def blocks_dir(self) -> Path:
        return self.require_run_dir() / "blocks"

    def _block_paths(self, j: int) -> tuple[Path, Path]:
        return self.blocks_dir / f"{j:04d}.safetensors", self.blocks_dir / f"{j:04d}.json"

    def _adapter_state(self, j: int) -> dict[str, Tensor]:
        """What block j trains: its adapters in stored form and its trained stored tensors (train_stored)."""
        out = {f"{n}.{k}": v for n, layer in self._layers[j] for k, v in layer.adapter_tensors().items()}
        out.update({f"{n}.stored_params.{k}": p.detach().clone() for n, layer in self._layers[j]
                    for k, p in layer.stored_params.items()})
        return out

    def _load_adapter_state(self, j: int, tensors: dict[str, Tensor]) -> None:
        for n, layer in self._layers[j]:
            mine = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
            layer.load_adapter_tensors({k: v for k, v in mine.items() if not k.startswith("stored_params.")})
            with torch.no_grad():
                for k, p in layer.stored_params.items():
                    p.copy_(mine[f"stored_params.{k}"])

    def _load_finished(self, j: int) -> dict[str, Any] | None:
        """The record of block j if an earlier run finished it with the same settings."""
        tpath, mpath = self._block_paths(j)
        if not (tpath.is_file() and mpath.is_file()):
            return None
        try:
            record = json.loads(mpath.read_text())
            tensors = load_file(tpath)
        except (json.JSONDecodeError, SafetensorError, OSError):
            return None  # leftovers of an interrupted write: the block is redone
        if record.get("fingerprint") != self._fingerprint:
            diff = sorted(k for k in set(record.get("fingerprint", {})) | set(self._fingerprint)
                          if record.get("fingerprint", {}).get(k) != self._fingerprint.get(k))
            raise UserError(f"{mpath} was written by a run with other settings ({', '.join(diff)}): "
                            f"use a new --run_dir, or delete {self.blocks_dir}")
        try:
            self._load_adapter_state(j, tensors)
        except KeyError as e:
            raise UserError(f"{tpath}: missing adapter tensor {e}") from None
        return record

    # -- passes over the cache ---------------------------------------------------------------------
    def _forward_context(self):
        return self.trainer.precision_plugin.forward_context()

    @torch.no_grad()
    def _pass(self, student: nn.Module | None, teacher: nn.Module | None, *, write_targets: bool = False,
              write_inputs: bool = False, score: bool = True) -> dict[str, float]:
        """One ordered pass over the cache, micro-batch by micro-batch.

        teacher: its outputs are the targets (written into the target cache with `write_targets`).
        student: its outputs are scored against the targets (`score`) and, with `write_inputs`,
        written over the inputs (the stream moves on to the next block). Returns the student's
        mean losses ("mse" and "relative_mse").
        """
        n, b = self._inputs.n, self._micro
        tot = {"mse": 0.0, "relative_mse": 0.0}
        with self._forward_context():
            for rows in iter_batches(n, b):
                x = self._inputs.read(rows, self.device)  # (b, L, H)
                y = None
                if teacher is not None:
                    y = call_block(teacher, x, self._call)
                    if write_targets:
                        self._targets.write_rows(rows, y)
                if student is None:
                    continue
                out = call_block(student, x, self._call)
                if score:
                    y = self._targets.read(rows, self.device)  # scored against the targets as stored
                    for kind in tot:
                        tot[kind] += float(block_loss(out, y, kind)) * (rows.stop - rows.start)
                if write_inputs:
                    self._inputs.write_rows(rows, out)
        return {k: v / n for k, v in tot.items()}

    # -- the loop --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:
            raise UserError("block-wise distillation runs on one device (use --trainer.devices 1)")
        self._reset_state()

    def _calibration_windows(self) -> Tensor:
        loader = self.trainer.train_dataloader
        windows = [(b if isinstance(b, Tensor) else b["input_ids"]).long().cpu() for b in loader]
        if not windows:
            raise UserError("no calibration sequence: the training dataloader is empty")
        self._micro = windows[0].shape[0]
        return torch.cat(windows)  # (N, L)

    def on_train_start(self) -> None:
        t0 = time.time()
        windows = self._calibration_windows()
        n, seq_len = windows.shape
        self._fingerprint = {
            "checkpoint_adapters": adapters_fingerprint(self.checkpoint),
            "calibration": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
            "lr": self.lr, "betas": list(self.betas), "weight_decay": self.weight_decay,
            "effective_batch": self.effective_batch, "micro_batch": self._micro,
            "epochs_per_block": self.epochs_per_block,
            "loss": self.loss_kind, "student_inputs": self.student_inputs, "seed": self.seed,
        }
        self._accum = max(1, -(-self.effective_batch // self._micro))
        self._teacher_files = resolve_safetensors(self.model_source())
        hidden = self.model.config.hidden_size
        cache_dir = Path(self.activation_dir) if self.activation_dir else self.require_run_dir() / "cache"
        where = (lambda name: cache_dir / f"{name}.bin") if self.cache_kind == "disk" else (lambda name: None)
        check_activation_cache_fits(n, seq_len, hidden, self.cache_dtype,
                                    cache_dir if self.cache_kind == "disk" else None)
        self._inputs = ActivationCache(n, seq_len, hidden, self.cache_dtype, where("inputs"))
        self._targets = ActivationCache(n, seq_len, hidden, self.cache_dtype, where("targets"))
        loader = (windows[s] for s in iter_batches(n, self._micro))
        _, call = capture_block_inputs(self.model, self._blocks[0], loader, self._inputs)
        self._call = call.to(self.device)

        # finished blocks of an earlier run: load their adapters and carry the stream through them
        start = 0
        while start < self.n_blocks and (record := self._load_finished(start)) is not None:
            self._records[start] = record
            self._propagate(start)
            start += 1
        self._start = self._next = start
        self._shape = (n, seq_len)
        if not self.trainer.fast_dev_run:
            self.trainer.fit_loop.max_epochs = (self.n_blocks - start) * self.epochs_per_block
        self._bar = tqdm(total=self.n_blocks, initial=start, desc="blocks", unit="block",
                         disable=self.global_rank != 0, leave=True)
        self._setup_time = time.time() - t0

    def _propagate(self, j: int) -> None:
        """Advance the cached stream past the finished block j (without training it)."""
        if self.student_inputs == "student":
            student = self._blocks[j].to(self.device)
            self._pass(student, None, write_inputs=True, score=False)
            self._blocks[j].to("cpu")
        else:
            teacher = self._teacher(j)
            self._pass(None, teacher, write_targets=True, score=False)
            del teacher
            self._inputs, self._targets = self._targets, self._inputs

    def _teacher(self, j: int) -> nn.Module:
        return load_teacher_block(self._teacher_files, j, self.model.config, self._prefix, like=self._blocks[j],
                                  device=self.device, dtype=self.teacher_dtype,
                                  base_model_prefix=getattr(self.model, "base_model_prefix", None))

    def _begin_block(self, j: int) -> None:
        self._current, self._epochs_done, self._pending, self._steps = j, 0, 0, 0
        self._block_t0 = time.time()
        student = self._blocks[j].to(self.device)
        teacher = self._teacher(j)
        before = self._pass(student, teacher, write_targets=True)  # Y_j = teacher_j(X_j), and the score
        del teacher
        self._records[j] = {"block": j, "name": f"{self._prefix}.{j}",
                            "loss_before": before[self.loss_kind], "mse_before": before["mse"],
                            "relative_mse_before": before["relative_mse"]}
        self._optimizer(j).zero_grad(set_to_none=True)

    def _finish_block(self, j: int) -> None:
        opt = self._optimizer(j)
        tpath, mpath = self._block_paths(j)
        tpath.parent.mkdir(parents=True, exist_ok=True)
        tensors = self._adapter_state(j)
        atomic_save_safetensors(tensors, tpath)
        # continue from exactly what was saved, so that a resumed run sees the same stream
        self._load_adapter_state(j, tensors)
        student = self._blocks[j]
        after = self._pass(student, None, write_inputs=self.student_inputs == "student")
        if self.student_inputs == "original":
            self._inputs, self._targets = self._targets, self._inputs  # X_{j+1} = Y_j
        record = {**self._records[j], "loss_after": after[self.loss_kind], "mse_after": after["mse"],
                  "relative_mse_after": after["relative_mse"], "epochs": self._epochs_done,
                  "steps": self._steps, "time_s": round(time.time() - self._block_t0, 3),
                  "fingerprint": self._fingerprint}
        atomic_write_json(mpath, record)  # the block counts as finished from here on
        self._records[j] = record
        opt.state.clear()
        self._blocks[j].to("cpu")
        for _, layer in self._layers[j]:
            layer.clear_cache()
        self._current, self._next = None, j + 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"block {j}: loss {record['loss_before']:.3g} → {record['loss_after']:.3g}")

    def on_train_epoch_start(self) -> None:
        if self._current is None:
            if self._next >= self.n_blocks:
                return
            self._begin_block(self._next)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._current * 1009 + self._epochs_done)
        self._perm = torch.randperm(self._inputs.n, generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        j = self._current
        if j is None:
            return None
        n, b = self._inputs.n, self._micro
        rows = self._perm[batch_idx * b:(batch_idx + 1) * b]
        if rows.numel() == 0:
            return None
        x, y = self._inputs.read(rows, self.device), self._targets.read(rows, self.device)
        out = call_block(self._blocks[j], x, self._call)
        loss = block_loss(out, y, self.loss_kind)
        # the accumulated gradient is the mean over the sequences of the group
        group = batch_idx // self._accum
        group_n = min(self._accum * b, n - group * self._accum * b)
        self.manual_backward(loss * (rows.numel() / group_n))
        self._pending += 1
        if self._pending == self._accum:
            opt = self._optimizer(j)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._pending = 0
            self._steps += 1
        self.log("block", float(j), prog_bar=True, on_step=True, batch_size=rows.numel())
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=rows.numel())
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        if self._current is None:
            return
        if self._pending:  # the epoch's last, partial group of micro-batches
            opt = self._optimizer(self._current)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._pending = 0
            self._steps += 1
        self._epochs_done += 1
        if self._epochs_done >= self.epochs_per_block or self.trainer.fast_dev_run:
            self._finish_block(self._current)

    # -- assembly ----------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for c in (self._inputs, self._targets):
            if c is not None:
                c.close()
        self._inputs = self._targets = None
        if self.global_rank != 0 or self._model is None:
            return

        finished = sorted(j for j, r in self._records.items() if "loss_after" in r)
        self.model.to("cpu")
        write_back_stored(self.model)  # trained codebooks / scales back at their stored precision
        out = save_compressed(self.model, self.require_run_dir() / "reallm", base_model=self.model_source(),
                              tokenizer=maybe_tokenizer(str(self.checkpoint), self.model_source()),
                              frozen_from=None if self.train_stored else self.checkpoint,
                              extra={"phase": self.phase, "from_checkpoint": str(Path(self.checkpoint).absolute()),
                                     "finished_blocks": finished})
        rep = bits_report(self.model)
        n_windows, seq_len = self._shape or (None, None)
        self.write_results({
            "bits": {"nominal": rep["nominal"], "decoder_linears": rep["decoder_linears"],
                     "whole_model": rep["whole_model"]},
            "runtime": self.runtime_info(self.model),
            "blocks": [{k: v for k, v in self._records[j].items() if k != "fingerprint"} for j in finished],
            "loss_before": [self._records[j]["loss_before"] for j in finished],
            "loss_after": [self._records[j]["loss_after"] for j in finished],
            "loss": self.loss_kind,
            "student_inputs": self.student_inputs,
            "epochs_per_block": self.epochs_per_block,
            "effective_batch": self.effective_batch,
            "calibration": {"sequences": n_windows, "seq_len": seq_len},
            "resumed_from_block": getattr(self, "_start", 0),
            "complete": len(finished) == self.n_blocks,
            "checkpoint_dir": str(out),
        })
