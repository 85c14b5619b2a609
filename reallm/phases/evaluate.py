"""Evaluation: perplexity (protocol.md) of a base model or a ReALLM checkpoint, as `validate`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from reallm.checkpoint.compressed import load_compressed
from reallm.checkpoint.directory import read_meta
from reallm.core.errors import UserError
from reallm.core.hf_models import load_hf_model
from reallm.eval.perplexity import greedy_generate, model_logits
from reallm.eval.zeroshot import zero_shot
from reallm.layer.auto_runtime import AUTO_MEMORY_FRACTION
from reallm.layer.bits import bits_report
from reallm.layer.linear import RuntimeMode
from reallm.phases.base import ReALLMModule
from reallm.phases.validation import PerplexityMixin


def load_model_for_eval(model_name_or_path: str | None, checkpoint: str | None, dtype: str | None,
                        runtime: RuntimeMode = "auto", memory_fraction: float = AUTO_MEMORY_FRACTION) -> nn.Module:
    """The model a phase works on: a ReALLM checkpoint when given (its compressed linears in `runtime` mode,
    "auto" with `memory_fraction`), else the base model."""
    if checkpoint:
        return load_compressed(checkpoint, mode=runtime, memory_fraction=memory_fraction)
    if not model_name_or_path:
        raise UserError("give --model.init_args.model_name_or_path or --model.init_args.checkpoint")
    return load_hf_model(model_name_or_path, dtype)


class EvaluatePhase(PerplexityMixin, ReALLMModule):
    """Perplexity on every validation dataset of the datamodule; optional greedy sample."""

    phase = "eval"
    starts_from = "checkpoint"  # when one is given; the base model otherwise

    def __init__(
        self,
        model_name_or_path: str | None = None,
        checkpoint: str | None = None,
        run_dir: str | None = None,
        method: str = "custom",
        dtype: str | None = "float32",
        prompt: str | None = None,
        max_new_tokens: int = 48,
        zero_shot_tasks: list[str] | None = None,
        zero_shot_include_path: str | None = None,
        zero_shot_limit: float | None = None,
        zero_shot_batch_size: int = 8,
        runtime: RuntimeMode = "auto",
        runtime_memory_fraction: float = AUTO_MEMORY_FRACTION,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model_name_or_path: a base model to evaluate (hub id or directory).
            checkpoint: a ReALLM checkpoint directory to evaluate instead.
            run_dir: the run directory (set by --run_dir).
            method: a label for results.json (e.g. the preset the checkpoint was made with).
            dtype: dtype of a base model ("float32", "bfloat16", "auto").
            prompt: if set, also write a greedy continuation of this prompt to results.json.
            max_new_tokens: length of that continuation.
            zero_shot_tasks: also measure zero-shot accuracy (metric acc) with lm-eval-harness on
                these tasks (protocol: [arc_challenge, arc_easy, piqa, winogrande]); None: no.
            zero_shot_include_path: a folder of local lm-eval task YAMLs (offline tasks).
            zero_shot_limit: at most this many documents per task (or a fraction < 1); None: all.
            zero_shot_batch_size: lm-eval batch size.
            runtime: how the compressed linears run: "auto" (the default: the decoded weights are cached when
                their dense copies fit `runtime_memory_fraction` of the free memory of the device the model
                runs on, decided at the first forward, resident otherwise; results.json `runtime.auto` records
                the decision), "resident" (the stored form only, decoded in row tiles at every forward; the
                least memory) or "cache" (decoded once into a dense copy in the compute dtype).
            runtime_memory_fraction: the share of the free device memory "auto" lets the dense copies take,
                in (0, 1].
            seed: recorded in results.json.
        """
        super().__init__(model_name_or_path, checkpoint, run_dir, method, seed)
        self.load_dtype = dtype
        self.set_runtime(runtime, runtime_memory_fraction)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.zero_shot_tasks = list(zero_shot_tasks) if zero_shot_tasks else None
        self.zero_shot_include_path = zero_shot_include_path
        self.zero_shot_limit = zero_shot_limit
        self.zero_shot_batch_size = zero_shot_batch_size
        self.model: nn.Module | None = None
        self.ppl_metrics = nn.ModuleList()

    @property
    def phase_model(self) -> nn.Module | None:
        return self.model

    def configure_model(self) -> None:
        if self.checkpoint and self.method == "custom":  # label the run with the checkpoint's preset
            self.method = read_meta(self.checkpoint).get("extra", {}).get("method", self.method)
        if self.model is None:
            self.model = load_model_for_eval(self.model_name_or_path, self.checkpoint, self.load_dtype, self.runtime,
                                             self.runtime_memory_fraction)
            self.model.eval()

    def setup(self, stage: str) -> None:
        self.setup_perplexity()

    def lm_logits(self, input_ids: Tensor) -> Tensor:
        return model_logits(self.model, input_ids)  # (B, L, V)

    def on_validation_end(self) -> None:
        if self.trainer.sanity_checking or self.global_rank != 0 or self.trainer.state.fn != "validate":
            return
        payload: dict[str, Any] = {"perplexity": self.perplexity}
        if self.checkpoint:
            layers = read_meta(self.checkpoint)["layers"]

            rep = bits_report(self.model)
            payload["bits"] = {"nominal": rep["nominal"], "decoder_linears": rep["decoder_linears"],
                               "whole_model": rep["whole_model"]}
            payload["compressed_matrices"] = len(layers)
            payload["runtime"] = self.runtime_info(self.model)
        if self.prompt:
            from transformers import AutoTokenizer


            tok = AutoTokenizer.from_pretrained(self.trainer.datamodule.model_name_or_path)
            payload["sample"] = {"prompt": self.prompt,
                                 "text": greedy_generate(self.model, tok, self.prompt, self.max_new_tokens)}
        if self.zero_shot_tasks:

            limit = self.zero_shot_limit
            limit = int(limit) if limit is not None and limit >= 1 else limit
            with torch.inference_mode(False), torch.no_grad():
                res = zero_shot(self.model, self.trainer.datamodule.model_name_or_path, self.zero_shot_tasks,
                                include_path=self.zero_shot_include_path, limit=limit,
                                batch_size=self.zero_shot_batch_size, seed=self.seed or 1234)
            payload["zero_shot"] = {k: v for k, v in res.items() if k != "raw"}
        self.write_results(payload)
