"""Zero-shot accuracy with lm-eval-harness (protocol.md: arc_challenge, arc_easy, piqa, winogrande,
metric `acc`; the paper's Table 3), through lm-eval's own Hugging Face wrapper (`HFLM`) given our
model object: a ReALLM model from `load_compressed` is an ordinary `PreTrainedModel` whose linears
are `ReALLMLinear`, so HFLM scores it exactly as it scores any Hugging Face model.

    from reallm import load_compressed
    from reallm.eval.zeroshot import zero_shot
    model = load_compressed("runs/nf3/reallm")
    res = zero_shot(model, "runs/nf3/reallm")                     # the four tasks, from the hub
    res = zero_shot(model, tok, tasks=["my_task"], include_path="my_tasks/")   # local task YAMLs

Command line (`python -m reallm.eval.zeroshot` runs this module's `main`; writes `results.json` with `zero_shot` into
--out when given):

    python -m reallm.eval.zeroshot --checkpoint runs/nf3/reallm [--tasks arc_easy piqa] [--limit 100]
    python -m reallm.eval.zeroshot --model ../shared/models/stories260K --tasks my_task --include_path my_tasks/

The standard tasks download their datasets from the Hugging Face hub on first use and then run
offline from its cache (HF_DATASETS_OFFLINE=1). Fully offline, point `include_path` at a folder of
lm-eval task YAMLs whose `dataset_path: json` reads local files (tests/test_zeroshot.py builds one).
`python train.py validate --config configs/eval.yaml --model.init_args.zero_shot_tasks [...]` runs
the same evaluation after the perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reallm.checkpoint.compressed import load_compressed
from reallm.checkpoint.directory import read_meta
from reallm.core.errors import CheckpointError, UserError
from reallm.core.hf_models import has_tokenizer, load_hf_model, model_device
from reallm.core.io import atomic_write_json, git_sha

PAPER_TASKS = ("arc_challenge", "arc_easy", "piqa", "winogrande")
METRIC = "acc"


class ZeroShotError(UserError):
    """A problem with the zero-shot request (unknown task, missing lm-eval, ...): one line."""


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # pragma: no cover - lm_eval is a dependency of the `eval` extra
        raise ZeroShotError(f"lm-eval-harness is not installed ({e}): pip install 'reallm[eval]'") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], include_path: str | list[str] | None = None, include_defaults: bool | None = None):
    """An lm-eval TaskManager that knows `tasks`: the local YAMLs of `include_path` alone when they
    define every task (fast, offline), else lm-eval's own task index as well."""
    _, _, TaskManager = _import_lm_eval()
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    for p in paths:
        if not Path(p).exists():
            raise ZeroShotError(f"{p}: no such task directory or file")
    if include_defaults is None and paths:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
        include_defaults = True
    tm = TaskManager(include_path=[str(p) for p in paths] or None,
                     include_defaults=True if include_defaults is None else include_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ZeroShotError(f"unknown lm-eval task(s) {unknown}" + (f" (not in lm-eval nor in {paths})" if paths
                                                                     else ""))
    return tm


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str] | tuple[str, ...] = PAPER_TASKS,
    *,
    include_path: str | list[str] | None = None,
    include_defaults: bool | None = None,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    max_length: int | None = None,
    seed: int = 1234,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy of a causal LM object on lm-eval tasks.

    Args:
        model: a Hugging Face causal LM (e.g. from `reallm.load_compressed`), used as it is (on its
            device, in eval mode).
        tokenizer: its tokenizer, or a hub id / directory to load it from.
        tasks: lm-eval task names (default: the paper's four).
        include_path: folder(s) of local lm-eval task YAMLs (offline tasks).
        include_defaults: also index lm-eval's own tasks (None: only when include_path does not
            define every task).
        batch_size: lm-eval batch size (an int, or "auto").
        limit: at most this many documents per task (an int) or this fraction (a float < 1);
            None: all (the protocol).
        num_fewshot: 0 for zero-shot.
        max_length: the model's context for lm-eval (default: from its config).
        seed: lm-eval's random seeds.
        log_samples: keep lm-eval's per-sample records under "samples".
    Returns:
        {"metric": "acc", "tasks": {task: {"acc", "acc_stderr", "samples"}}, "mean_acc", "limit",
         "num_fewshot", "lm_eval_version", "raw": lm-eval's per-task results}
    """
    lm_eval, HFLM, _ = _import_lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise ZeroShotError("no zero-shot task given")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ZeroShotError(f"cannot load tokenizer {str(tokenizer)!r}: {first}") from None
    tm = task_manager(tasks, include_path, include_defaults)
    was_training = model.training
    model.eval()
    device = model_device(model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
              max_length=max_length)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=log_samples, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=1000)
    finally:
        model.train(was_training)
    if out is None:  # non-zero ranks of a distributed run
        return {}
    per_task: dict[str, Any] = {}
    for task in tasks:
        res = out["results"].get(task, {})
        acc = res.get(f"{METRIC},none")
        if acc is None:
            raise ZeroShotError(f"task {task!r} has no '{METRIC}' metric (it reports {sorted(res)})")
        stderr = res.get(f"{METRIC}_stderr,none")
        per_task[task] = {"acc": float(acc),
                          "acc_stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                          "samples": out.get("n-samples", {}).get(task, {}).get("effective")}
    accs = [v["acc"] for v in per_task.values()]
    result = {
        "metric": METRIC,
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else math.nan,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "raw": json.loads(json.dumps(out["results"], default=str)),
    }
    if log_samples:
        result["samples"] = json.loads(json.dumps(out.get("samples", {}), default=str))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = ["| task | acc | ± | documents |", "| --- | --- | --- | --- |"]
    for task, r in result.get("tasks", {}).items():
        se = "-" if r["acc_stderr"] is None else f"{r['acc_stderr']:.4f}"
        lines.append(f"| {task} | {r['acc']:.4f} | {se} | {r['samples'] if r['samples'] is not None else '-'} |")
    if result.get("tasks"):
        lines.append(f"| **mean** | **{result['mean_acc']:.4f}** | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a ReALLM checkpoint directory (run_dir/reallm)")
    src.add_argument("--model", help="a Hugging Face model (hub id or directory)")
    ap.add_argument("--tokenizer", help="tokenizer (default: the checkpoint's, or its base model's)")
    ap.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), help="lm-eval task names")
    ap.add_argument("--include_path", nargs="*", default=None, help="folders of local lm-eval task YAMLs")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (int) or fraction (< 1)")
    ap.add_argument("--batch_size", default="8")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--out", help="a run directory: writes <out>/results.json (phase zero_shot)")
    args = ap.parse_args(argv)

    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.checkpoint:
            model = load_compressed(args.checkpoint, device=device)
            tok = args.tokenizer or (args.checkpoint if has_tokenizer(args.checkpoint)
                                     else read_meta(args.checkpoint).get("base_model"))
        else:

            model = load_hf_model(args.model, "float32").to(device)
            tok = args.tokenizer or args.model
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        bs = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
        result = zero_shot(model, tok, args.tasks, include_path=args.include_path, batch_size=bs, limit=limit)
    except (UserError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.out:

        atomic_write_json(Path(args.out) / "results.json", {
            "phase": "zero_shot", "model": args.model, "checkpoint": args.checkpoint, "git_sha": git_sha(),
            "zero_shot": {k: v for k, v in result.items() if k != "raw"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
