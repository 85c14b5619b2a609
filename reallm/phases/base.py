"""The one base of every phase's LightningModule: the phase contract, model source, run directory,
results.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch

from reallm.checkpoint.compressed import load_compressed
from reallm.checkpoint.directory import read_meta
from reallm.core.errors import UserError
from reallm.core.io import atomic_write_json, git_sha
from reallm.layer.auto_runtime import AUTO_MEMORY_FRACTION, check_memory_fraction
from reallm.layer.linear import RuntimeMode, check_runtime_mode, runtime_report

__all__ = ["ReALLMModule"]


StartsFrom = Literal["base_model", "checkpoint"]


class ReALLMModule(L.LightningModule):
    """Base of all phases (compression, block-wise, end-to-end, evaluation).

    The phase contract, which the CLI and the callbacks rely on instead of probing attributes:

    - `phase`: its name in results.json ("compress", "blockwise", "e2e", "eval");
    - `starts_from`: "base_model" (the phase reads the base model, `checkpoint` is unused) or
      "checkpoint" (it reads the ReALLM checkpoint given as `checkpoint`; the evaluation phase reads the
      base model when none is given), so that the CLI checks that checkpoint before anything loads;
    - `phase_model`: the model the phase compresses, trains or evaluates (None before it is loaded).

    It also holds what every phase shares: where the model comes from, the run directory, and the
    results.json writer (protocol.md schema: phase, model, method, git_sha, seed, time_s, config).
    """

    phase: ClassVar[str] = "base"
    starts_from: ClassVar[StartsFrom] = "base_model"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        checkpoint: str | None = None,
        run_dir: str | None = None,
        method: str = "custom",
        seed: int = 0,
    ) -> None:
        """
        Args:
            model_name_or_path: base model: a Hugging Face hub id or a local directory.
            checkpoint: a ReALLM checkpoint directory (`<run_dir>/reallm`) to start from.
            run_dir: the run directory (set by the CLI's --run_dir).
            method: name of the method preset (written to results.json).
            seed: seed of the phase's random choices.
        """
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.checkpoint = checkpoint
        self.run_dir = Path(run_dir) if run_dir else None
        self.method = method
        self.seed = seed
        self.runtime: RuntimeMode = "resident"  # how compressed linears run (phases that load one set it)
        self.runtime_memory_fraction = AUTO_MEMORY_FRACTION  # the share of free memory "auto" may fill
        self.resolved_config: dict[str, Any] = {}  # set by the CLI before the run
        self._t0 = time.time()

    @property
    def phase_model(self) -> torch.nn.Module | None:
        """The model this phase compresses, trains or evaluates; None until it is loaded. Every phase
        implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its phase_model")

    # -- helpers for subclasses -----------------------------------------------------------
    def model_source(self) -> str:
        """The base model named by the arguments or by the checkpoint's reallm.json."""
        if self.model_name_or_path:
            return self.model_name_or_path
        if self.checkpoint:
            return read_meta(self.checkpoint).get("base_model") or str(self.checkpoint)
        raise UserError("give --model.init_args.model_name_or_path or --model.init_args.checkpoint")

    def load_checkpoint_model(self, adapters: str = "default") -> torch.nn.Module:
        """The compressed model of `self.checkpoint`, its linears in the phase's runtime mode."""
        return load_compressed(self.checkpoint, adapters=adapters, mode=self.runtime,
                               memory_fraction=self.runtime_memory_fraction)

    def set_runtime(self, runtime: RuntimeMode, memory_fraction: float) -> None:
        """Check and keep the phase's runtime options (one line for a bad value, before anything loads)."""
        check_runtime_mode(runtime)
        self.runtime, self.runtime_memory_fraction = runtime, check_memory_fraction(memory_fraction)

    def runtime_info(self, model: torch.nn.Module) -> dict[str, Any]:
        """How the compressed linears of `model` ran (results.json `runtime`; with "auto", `runtime.auto` holds
        the decision: chosen mode, share, free and dense bytes, cached layers)."""
        return runtime_report(model)

    def require_run_dir(self) -> Path:
        if self.run_dir is None:
            raise UserError("no run directory: pass --run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

    def results_header(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "model": self.model_name_or_path or (self.model_source() if self.checkpoint else None),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "method": self.method,
            "git_sha": git_sha(),
            "seed": self.seed,
            "time_s": round(time.time() - self._t0, 3),
            "config": self.resolved_config,
        }

    def write_results(self, payload: dict[str, Any]) -> Path:
        """Write run_dir/results.json atomically (merged with the common header)."""
        path = self.require_run_dir() / "results.json"
        atomic_write_json(path, {**self.results_header(), **payload})
        return path

    def on_fit_start(self) -> None:
        self._t0 = time.time()

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == "validate":
            self._t0 = time.time()
