"""W&B sweep files (configs/sweeps/*.yaml): checks, the command W&B runs, and an offline runner.

With a W&B account (online):
    wandb sweep configs/sweeps/bits-rank.yaml          # prints the sweep id
    wandb agent <entity>/<project>/<sweep id>          # runs train.py once per parameter set

Offline, without a W&B server (the same file, the same commands):
    python -m reallm.run.sweep configs/sweeps/bits-rank.yaml [--count N] [--dry-run]

The offline runner launches every run exactly as `wandb agent` would: the sweep's `command`, its
macros (`${env} ${interpreter} ${program} ${args}`) filled in by W&B's own
`create_sweep_command_args` (so `${args}` is `--key=value` per parameter), one run after another,
with WANDB_MODE=offline (unless set), WANDB_RUN_GROUP=<sweep name> and a new WANDB_RUN_ID per run,
so that each run writes `runs/sweep-<sweep name>/<run id>/` (see `reallm.run.cli.default_run_dir`).
`grid` runs every combination; `random` and `bayes` draw `--count` parameter sets at random
(Bayesian search needs the W&B server). At the end it prints every run's parameters and the
sweep's metric, read from its results.json; `python -m reallm.run.report runs/sweep-<name>/*
--figures <dir>` makes the table and the figures. Offline W&B runs can be uploaded later with
`wandb sync runs/sweep-<name>/*/wandb/offline-run-*`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import shlex
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from reallm.run.tracking import summary_metrics

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
ARG_MACROS = ("${args}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}", "${args_json_file}",
              "${args_no_equals}")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                 "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta")


class SweepError(ValueError):
    """A sweep file that W&B or this runner would refuse (one line: the file and the problem)."""


# ------------------------------------------------------------------------------------------------
# reading and checking
# ------------------------------------------------------------------------------------------------
def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep file, checked (`check_sweep`); raises SweepError."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not YAML ({' '.join(str(e).split())})") from None
    problems = check_sweep(cfg)
    if problems:
        raise SweepError(f"{path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return cfg


def check_sweep(cfg: Any) -> list[str]:
    """The problems of a sweep config (W&B's schema, as far as a file can be checked locally)."""
    if not isinstance(cfg, dict):
        return ["a sweep file is a mapping (program, method, metric, parameters, command)"]
    out = []
    if cfg.get("method") not in METHODS:
        out.append(f"method must be one of {METHODS}, got {cfg.get('method')!r}")
    if not cfg.get("program"):
        out.append("no program (train.py)")
    metric = cfg.get("metric")
    if metric is not None and (not isinstance(metric, dict) or not metric.get("name")
                               or metric.get("goal", "minimize") not in GOALS):
        out.append("metric needs a name and a goal (minimize or maximize)")
    if cfg.get("method") == "bayes" and not metric:
        out.append("bayes search needs a metric")
    params = cfg.get("parameters")
    if not isinstance(params, dict) or not params:
        out.append("no parameters")
        params = {}
    for name, spec in params.items():
        out += [f"parameter {name}: {p}" for p in _check_param(spec, cfg.get("method"))]
    command = cfg.get("command")
    if command is not None:
        if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
            out.append("command must be a list of strings")
        elif not any(str(c) in ARG_MACROS for c in command):
            out.append("command has no ${args} macro: the parameters would not reach the program")
    return out


def _check_param(spec: Any, method: str | None) -> list[str]:
    if not isinstance(spec, dict):
        return ["a parameter is a mapping (values, value, or distribution with min/max)"]
    dist = spec.get("distribution")
    if dist is not None and dist not in DISTRIBUTIONS:
        return [f"unknown distribution {dist!r}"]
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            return ["values must be a non-empty list"]
        return []
    if "value" in spec:
        return []
    if method == "grid":
        return ["grid search needs values (or value) for every parameter"]
    if dist in ("normal", "q_normal", "log_normal", "q_log_normal"):
        return []
    if "min" not in spec or "max" not in spec:
        return ["give values, value, or min and max"]
    if not spec["min"] < spec["max"]:
        return [f"min ({spec['min']}) must be below max ({spec['max']})"]
    if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") and spec["min"] <= 0:
        return [f"{dist} needs min > 0"]
    return []


# ------------------------------------------------------------------------------------------------
# parameter sets
# ------------------------------------------------------------------------------------------------
def grid(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a grid sweep's values (in file order)."""
    names = list(cfg["parameters"])
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in cfg["parameters"].values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def draw(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a parameter, as W&B's random search draws it."""
    if "values" in spec:
        return rng.choice(spec["values"])
    if "value" in spec:
        return spec["value"]
    lo, hi = spec.get("min"), spec.get("max")
    dist = spec.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
    q = spec.get("q", 1)
    mu, sigma = spec.get("mu", 0.0), spec.get("sigma", 1.0)
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "q_uniform":
        return round(rng.uniform(lo, hi) / q) * q
    if dist == "log_uniform":  # min / max are natural-log exponents
        return math.exp(rng.uniform(lo, hi))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "q_log_uniform":
        return round(math.exp(rng.uniform(lo, hi)) / q) * q
    if dist == "q_log_uniform_values":
        return round(math.exp(rng.uniform(math.log(lo), math.log(hi))) / q) * q
    if dist == "inv_log_uniform":
        return 1.0 / math.exp(rng.uniform(lo, hi))
    if dist == "inv_log_uniform_values":
        return 1.0 / math.exp(rng.uniform(math.log(1 / hi), math.log(1 / lo)))
    if dist in ("normal", "q_normal"):
        v = rng.gauss(mu, sigma)
        return round(v / q) * q if dist == "q_normal" else v
    if dist in ("log_normal", "q_log_normal"):
        v = math.exp(rng.gauss(mu, sigma))
        return round(v / q) * q if dist == "q_log_normal" else v
    if dist in ("beta", "q_beta"):
        v = rng.betavariate(spec.get("a", 1.0), spec.get("b", 1.0))
        return round(v / q) * q if dist == "q_beta" else v
    raise SweepError(f"unsupported distribution {dist!r}")


def parameter_sets(cfg: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The runs of a sweep: every grid combination (at most `count`), or `count` random draws."""
    if cfg["method"] == "grid":
        sets = grid(cfg)
        return sets[:count] if count else sets
    if not count:
        raise SweepError(f"a {cfg['method']} sweep needs --count (how many runs)")
    rng = random.Random(seed)
    return [{name: draw(spec, rng) for name, spec in cfg["parameters"].items()} for _ in range(count)]


def example_parameter_sets(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Few parameter sets that together use every listed value and both ends of every range
    (for tests: what W&B could send, without running the whole grid)."""
    choices = {}
    for name, spec in cfg["parameters"].items():
        if "values" in spec:
            choices[name] = list(spec["values"])
        elif "value" in spec:
            choices[name] = [spec["value"]]
        elif "min" in spec:
            lo, hi = spec["min"], spec["max"]
            if spec.get("distribution") == "log_uniform":
                lo, hi = math.exp(lo), math.exp(hi)
            choices[name] = [lo, hi]
        else:
            choices[name] = [draw(spec, random.Random(0))]
    n = max(len(v) for v in choices.values())
    return [{name: vals[i % len(vals)] for name, vals in choices.items()} for i in range(n)]


# ------------------------------------------------------------------------------------------------
# the command line W&B builds
# ------------------------------------------------------------------------------------------------
def command_line(cfg: dict[str, Any], params: dict[str, Any], *, interpreter: str = "python",
                 args_json_file: str | None = None) -> list[str]:
    """The command `wandb agent` runs for one parameter set (wandb_agent.Agent._command_run):
    the sweep's `command` (default `${env} ${interpreter} ${program} ${args}`) with `${envvar:X}`
    and the argument macros filled in by W&B's own functions."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = [str(c) for c in (cfg.get("command") or sweep_utils.DEFAULT_SWEEP_COMMAND)]
    command = sweep_utils.create_sweep_command(list(command))
    macros: dict[str, Any] = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in
                                                                              params.items()}})
    macros["interpreter"] = [interpreter]
    macros["program"] = [cfg["program"]]
    macros["args_json_file"] = [args_json_file or "args.json"]
    if platform.system() != "Windows":
        macros["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for c in command:
        if c.startswith("${") and c.endswith("}"):
            out += [str(x) for x in macros.get(c[2:-1]) or []]
        else:
            out.append(c)
    return out


def program_args(cfg: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The arguments the program receives (everything after `${program}`)."""
    cmd = command_line(cfg, params)
    return cmd[cmd.index(cfg["program"]) + 1:]


# ------------------------------------------------------------------------------------------------
# offline runner
# ------------------------------------------------------------------------------------------------
def _run_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _launch(cmd: list[str], env: dict[str, str]) -> int:
    """Run one sweep run in a new process (as `wandb agent` does); its exit code."""
    return subprocess.run(cmd, env=env).returncode


def _metric(run_dir: Path, name: str | None) -> float | None:

    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary_metrics(results).get(name) if name else None


def run_sweep(path: str | os.PathLike, count: int | None = None, seed: int = 0, dry_run: bool = False,
              name: str | None = None) -> list[dict[str, Any]]:
    """Run a sweep file offline, one run after another (see the module docstring)."""
    cfg = load_sweep(path)
    sweep = name or cfg.get("name") or Path(path).stem
    sets = parameter_sets(cfg, count, seed)
    metric = (cfg.get("metric") or {}).get("name")
    rng = random.Random(f"{sweep}-{seed}-{time.time_ns()}")
    records = []
    for i, params in enumerate(sets):
        run_id = _run_id(rng)
        run_dir = Path("runs") / f"sweep-{sweep}" / run_id
        json_file = run_dir.parent / f"args-{run_id}.json"
        cmd = command_line(cfg, params, interpreter=sys.executable, args_json_file=str(json_file))
        print(f"[{i + 1}/{len(sets)}] {run_id}: {shlex.join(cmd)}", flush=True)
        rec = {"run_id": run_id, "run_dir": str(run_dir), "params": params}
        if dry_run:
            records.append(rec)
            continue
        env = dict(os.environ, WANDB_RUN_ID=run_id, WANDB_RUN_GROUP=sweep)
        env.setdefault("WANDB_MODE", "offline")
        if "${args_json_file}" in [str(c) for c in cfg.get("command") or []]:
            json_file.parent.mkdir(parents=True, exist_ok=True)
            json_file.write_text(json.dumps(params))
        t0 = time.time()
        rc = _launch(cmd, env)
        rec.update(returncode=rc, time_s=round(time.time() - t0, 1), metric=_metric(run_dir, metric))
        records.append(rec)
    if not dry_run:
        print(summary_table(records, metric, (cfg.get("metric") or {}).get("goal", "minimize")))
        out = Path("runs") / f"sweep-{sweep}" / "sweep.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"sweep": str(path), "metric": metric, "runs": records}, indent=1, default=str))
    return records


def summary_table(records: list[dict[str, Any]], metric: str | None, goal: str = "minimize") -> str:
    """A markdown table of the runs, best first."""
    names = list(dict.fromkeys(k for r in records for k in r["params"]))
    bad = math.inf if goal == "minimize" else -math.inf
    ranked = sorted(records, key=lambda r: r.get("metric") if r.get("metric") is not None else bad,
                    reverse=goal == "maximize")
    head = ["run", *[n.rsplit(".", 1)[-1] for n in names], metric or "metric", "exit", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in ranked:
        m = r.get("metric")
        cells = [r["run_dir"], *[str(r["params"].get(n, "")) for n in names],
                 "-" if m is None else f"{m:.4g}", str(r.get("returncode", "-")), str(r.get("time_s", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a sweep file (configs/sweeps/*.yaml)")
    ap.add_argument("--count", type=int, default=None, help="runs (random/bayes: required; grid: at most)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    ap.add_argument("--name", default=None, help="sweep name (folder runs/sweep-<name>); default: the file's name")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    try:
        records = run_sweep(args.sweep, args.count, args.seed, args.dry_run, args.name)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    failed = [r for r in records if r.get("returncode")]
    return 1 if failed and len(failed) == len(records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
