"""Run tracking: the CLI's logger switch and what a run sends to Weights & Biases.

    python train.py fit ... --logger csv     # default: run_dir/logs/metrics.csv
    python train.py fit ... --logger wandb   # Weights & Biases as well (and the CSV file)
    python train.py fit ... --logger none    # no logger
    python train.py fit ... --logger wandb --wandb.project my-project --wandb.group exp1

W&B runs offline (files under run_dir/wandb/, upload later with `wandb sync run_dir/wandb/offline-run-*`)
unless an API key is available (WANDB_API_KEY, or `wandb login`'s ~/.netrc entry); WANDB_MODE or
`--wandb.mode` decide otherwise. An explicit `--trainer.logger` (any Lightning logger) overrides
the switch.

At the end of a run, `upload_run` (called by `reallm.run.callbacks.RunArtifacts`) sends: the summary
numbers of results.json (bits, errors, perplexities, zero-shot accuracies) as the run's summary, the
per-matrix table, every figure of run_dir/figures as an image, and results.json, config.yaml and
the figures as run files and as one `results` artifact. The full resolved config is the run's
config, flattened to the CLI's dotted keys (`model.init_args.compression.bits`), the same names a
sweep's parameters use.
"""

from __future__ import annotations

import math
import netrc
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from reallm.core.hf_models import decoder_block_index

LOGGERS = ("csv", "wandb", "none")
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"


@dataclass
class WandbSettings:
    """Weights & Biases settings, used with `--logger wandb`.

    Args:
        project: W&B project name (default of the WANDB_PROJECT variable, else "reallm").
        entity: W&B entity (user or team); None: the API key's default.
        name: run name; None: the name of the run directory.
        group: run group (e.g. one experiment's phases, or a sweep's runs).
        tags: run tags.
        mode: "auto" is online when an API key is available (WANDB_API_KEY or `wandb login`) and
            offline otherwise (a WANDB_MODE variable wins); or "online", "offline", "disabled".
    """

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


def has_wandb_key() -> bool:
    """Whether W&B can authenticate: WANDB_API_KEY, or a ~/.netrc entry written by `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        path = os.environ.get("NETRC") or None
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str = "auto") -> str:
    """"online", "offline" or "disabled" for a `WandbSettings.mode`."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_key() else "offline"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def logger_config(kind: str, wandb: Any, run_dir: str | os.PathLike, job_type: str | None = None) -> Any:
    """The `trainer.logger` value of the switch: a CSVLogger config, a list [CSVLogger, WandbLogger],
    or False.

    Args:
        kind: "csv", "wandb" or "none".
        wandb: a `WandbSettings` (or the parsed namespace of one).
        run_dir: the run directory (CSV file in run_dir/logs, W&B files in run_dir/wandb).
        job_type: the W&B job type (the subcommand: fit, validate).
    """
    if kind not in LOGGERS:
        raise ValueError(f"--logger must be one of {LOGGERS}, got {kind!r}")
    csv = {"class_path": CSV_LOGGER, "init_args": {"save_dir": str(run_dir), "name": "logs", "version": ""}}
    if kind == "none":
        return False
    mode = resolve_mode(_get(wandb, "mode", "auto") or "auto")
    if kind == "csv" or mode == "disabled":
        return csv
    init = {
        "project": _get(wandb, "project") or os.environ.get("WANDB_PROJECT") or "reallm",
        "name": _get(wandb, "name") or Path(run_dir).name,
        # absolute: W&B's service process may run in another working directory (it is shared with
        # the processes a run starts)
        "save_dir": str(Path(run_dir).absolute()),
        "mode": mode,
        "job_type": job_type,
    }
    for key in ("entity", "group"):
        if _get(wandb, key):
            init[key] = _get(wandb, key)
    # what `wandb agent` (or reallm.run.sweep) hands a run through the environment, passed explicitly:
    # W&B reads the environment once per process
    if os.environ.get("WANDB_RUN_ID"):
        init["id"] = os.environ["WANDB_RUN_ID"]
    if "group" not in init and os.environ.get("WANDB_RUN_GROUP"):
        init["group"] = os.environ["WANDB_RUN_GROUP"]
    if _get(wandb, "tags"):
        init["tags"] = list(_get(wandb, "tags"))
    # the CSV logger first: Lightning puts default checkpoint folders under the first logger
    return [csv, {"class_path": WANDB_LOGGER, "init_args": init}]


# ------------------------------------------------------------------------------------------------
# what a finished run sends
# ------------------------------------------------------------------------------------------------
def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts → one level with dotted keys (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers of a results.json worth comparing across runs, under flat names:
    `bits/<kind>`, `perplexity/<dataset>`, `zero_shot/<task>`, `mean_rel_frobenius_error`,
    `<list>/mean` and `<list>/last` of per-block losses, and the other top-level numbers."""
    out: dict[str, float] = {}
    for k, v in (results.get("bits") or {}).items():
        if (x := _number(v)) is not None:
            out[f"bits/{k}"] = x
    for name, rec in (results.get("perplexity") or {}).items():
        if (x := _number(_get(rec, "value"))) is not None:
            out[f"perplexity/{name}"] = x
    for task, rec in (results.get("zero_shot") or {}).get("tasks", {}).items():
        if (x := _number(_get(rec, "acc"))) is not None:
            out[f"zero_shot/{task}"] = x
    if (x := _number((results.get("zero_shot") or {}).get("mean_acc"))) is not None:
        out["zero_shot/mean_acc"] = x
    for k, v in results.items():
        if k in ("bits", "perplexity", "zero_shot", "config", "matrices", "seed"):
            continue
        if (x := _number(v)) is not None:
            out[k] = x
        elif isinstance(v, list) and v and all(_number(e) is not None for e in v):
            out[f"{k}/mean"] = sum(v) / len(v)
            out[f"{k}/last"] = float(v[-1])
    return out


def matrix_table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-matrix table (name, block, type, shape, bits, error)."""
    from reallm.run.plots import layer_type

    columns = ["name", "block", "type", "rows", "cols", "bits", "nominal", "rel_frobenius_error"]
    rows = []
    for m in results.get("matrices") or []:
        shape = m.get("shape") or [None, None]
        rows.append([m["name"], decoder_block_index(m["name"]), layer_type(m["name"]), shape[0], shape[1],
                     m.get("bits"), m.get("nominal"), m.get("rel_frobenius_error")])
    return columns, rows


def log_config(run: Any, config: dict[str, Any]) -> None:
    """The full resolved config as the run's config, flattened to the CLI's dotted keys."""
    flat = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in flatten(config).items()}
    run.config.update(flat, allow_val_change=True)


def upload_run(run: Any, run_dir: str | os.PathLike, results: dict[str, Any] | None,
               figures: list[Path] | None = None) -> None:
    """Send a finished run's results to its W&B run (see the module docstring)."""
    import wandb

    run_dir = Path(run_dir)
    figures = [Path(f) for f in figures or []]
    if results:
        run.summary.update(summary_metrics(results))
        columns, rows = matrix_table_rows(results)
        payload: dict[str, Any] = {}
        if rows:
            payload["tables/matrices"] = wandb.Table(columns=columns, data=rows)
        for task, rec in (results.get("zero_shot") or {}).get("tasks", {}).items():
            payload.setdefault("tables/zero_shot", []).append([task, _get(rec, "acc"), _get(rec, "acc_stderr")])
        if "tables/zero_shot" in payload:
            payload["tables/zero_shot"] = wandb.Table(columns=["task", "acc", "acc_stderr"],
                                                      data=payload["tables/zero_shot"])
        for f in figures:
            payload[f"figures/{f.stem}"] = wandb.Image(str(f))
        if payload:
            run.log(payload)
    files = [p for p in (run_dir / "results.json", run_dir / "config.yaml") if p.is_file()] + figures
    names = [str(f.relative_to(run_dir)) if f.is_relative_to(run_dir) else f.name for f in files]
    # files in the W&B run's folder are uploaded with the run (at its end, or by `wandb sync`);
    # under reallm/ so that config.yaml does not clash with W&B's own config.yaml
    for f, name in zip(files, names):
        dest = Path(run.dir) / "reallm" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    if files:
        art = wandb.Artifact(f"results-{run.id}", type="results",
                             description=f"results.json, config.yaml and figures of {run_dir.name}")
        for f, name in zip(files, names):
            art.add_file(str(f), name=name)
        run.log_artifact(art)


def wandb_runs(trainer: Any) -> list[Any]:
    """The W&B runs of a trainer's WandbLoggers (started if not yet)."""
    from lightning.pytorch.loggers import WandbLogger

    return [lg.experiment for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)]
