"""Phase 1 → 2 → 3 with an evaluation after each, for a list of method presets × seeds; one table row per method
and stage, mean and range over the seeds (paper Table 1; issue 15's pipeline table).

    python benchmarks/pipeline.py --presets vq-2bit-ft                              # one preset, seed 0, CPU
    python benchmarks/pipeline.py --presets reallm-3bit reallm-3bit:cal vq-3bit-ft --seeds 0 1 2 \\
        --jobs 2 --threads 1 --runs runs/table                                     # two pipelines at a time

A preset is a file of configs/methods/ (name or path); `<preset>:cal` runs its phase 1 calibration-aware
(`calibration:` on the training text, --calibration-windows windows of --seq-len tokens), labelled
"<preset> (calibrated)"; `<preset>:gptq` does too and also chooses the codes with GPTQ's error feedback
(`compression.error_feedback: gptq`), labelled "<preset> (calibrated, GPTQ)". Each (preset, seed) is one
pipeline, each stage one run of `train.py` in its own run directory:
    <runs>/original/                     evaluation of the uncompressed base model (once; the ratios' reference)
    <runs>/<preset>/seed<S>/compress/    phase 1 (configs/ae.yaml + the preset)                 → eval0/
    <runs>/<preset>/seed<S>/blockwise/   phase 2 (configs/blockwise.yaml) from compress/reallm  → eval2/
    <runs>/<preset>/seed<S>/e2e/         phase 3 (configs/e2e.yaml) from blockwise/reallm       → eval3/
A preset whose phase-1 model has no low-rank part (rank 0: nothing to fine-tune) stops after phase 1, and the
table says so. The seed S seeds phase 1 (k-means, rotations, the autoencoders), and phases 2 and 3
(`seed_everything`, the block order of phase 2); the data are the same for every seed (phase-2 calibration
windows: sampling seed 0, phase-3 training windows: seed 1), so that every row sees the same text.

A stage whose results.json is complete is not run again: a killed invocation restarted with the same
--runs continues (--force redoes everything). `--jobs N` runs N pipelines at a time, each in its own
process with --threads threads (default 1: tiny models run fastest single-threaded, and results move with the
thread count); the log of each is <runs>/<preset>/seed<S>/pipeline.log. Each pipeline writes its own table
(<...>/seed<S>/table.md); the invocation prints the summary table (mean [min, max] over the seeds) and writes it
to <runs>/table.md, the numbers to <runs>/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
sys.path.insert(0, str(ROOT))

STAGES = [  # (key, row label, phase run dir, evaluation run dir)
    ("compress", "phase 1", "compress", "eval0"),
    ("blockwise", "phase 2 (block-wise)", "blockwise", "eval2"),
    ("e2e", "phase 3 (end-to-end)", "e2e", "eval3"),
]
BUDGETS = (2.25, 2.75, 3.25)  # the budget classes of accounted bits (decoder linears)


class Preset(NamedTuple):
    """One method of the table: its preset file, how phase 1 uses calibration data ("", "cal" or "gptq"), its
    label and folder."""

    path: Path
    mode: str = ""

    @property
    def calibrated(self) -> bool:
        return self.mode in ("cal", "gptq")

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def label(self) -> str:
        return {"": self.name, "cal": f"{self.name} (calibrated)", "gptq": f"{self.name} (calibrated, GPTQ)"}[self.mode]

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.mode}" if self.mode else self.name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", "--preset", nargs="+", required=True,
                    help="files of configs/methods/ (name or path); '<preset>:cal' for a calibration-aware phase 1, "
                         "'<preset>:gptq' for one with GPTQ's error feedback")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="one pipeline per preset and seed")
    ap.add_argument("--jobs", type=int, default=1, help="pipelines run at a time, each in its own process")
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"), help="base model (hub id or dir)")
    ap.add_argument("--train", default=str(SHARED / "data" / "tinystories_train.txt"),
                    help="training text of phases 2 and 3 (and the calibration text of ':cal' presets)")
    ap.add_argument("--eval", nargs="+", default=[str(SHARED / "data" / "tinystories_valid.txt"),
                                                  str(SHARED / "data" / "wikitext2_raw_test.txt")],
                    help="evaluation texts (protocol.md rules)")
    ap.add_argument("--seq-len", type=int, default=512, help="context L of training and evaluation")
    ap.add_argument("--runs", default=None, help="root of the run directories (default runs/pipeline)")
    ap.add_argument("--calibration-sequences", type=int, default=256, help="phase-2 calibration windows")
    ap.add_argument("--calibration-windows", type=int, default=128,
                    help="phase-1 calibration windows of ':cal' presets")
    ap.add_argument("--train-sequences", type=int, default=2048, help="phase-3 training windows per epoch")
    ap.add_argument("--batch-size", type=int, default=8, help="micro-batch of phases 2 and 3 and of evaluation")
    ap.add_argument("--max-eval-windows", type=int, default=None, help="evaluate on the first windows only")
    ap.add_argument("--token-cache", default=None,
                    help="token-window cache of every text stage and calibration (default ~/.cache/reallm/tokens)")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each pipeline")
    ap.add_argument("--compress-args", default="", help="extra CLI arguments of phase 1 (one string)")
    ap.add_argument("--blockwise-args", default="", help="extra CLI arguments of phase 2")
    ap.add_argument("--e2e-args", default="", help="extra CLI arguments of phase 3")
    ap.add_argument("--eval-args", default="", help="extra CLI arguments of every evaluation")
    ap.add_argument("--skip", nargs="*", default=[], choices=["blockwise", "e2e"],
                    help="stages to leave out (without blockwise, phase 3 starts from phase 1)")
    ap.add_argument("--force", action="store_true", help="rerun stages that already finished")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a worker process: no summary
    return ap.parse_args(argv)


def resolve_preset(spec: str) -> Preset:
    name, _, flag = spec.partition(":")
    if flag not in ("", "cal", "gptq"):
        raise SystemExit(f"error: preset {spec!r}: the suffixes are ':cal' (calibration-aware phase 1) and ':gptq' "
                         "(calibration-aware with GPTQ's error feedback)")
    p = Path(name)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = ROOT / "configs" / "methods" / f"{name}.yaml"
    if not p.is_file():
        names = sorted(f.stem for f in (ROOT / "configs" / "methods").glob("*.yaml"))
        raise SystemExit(f"error: no preset {name!r} (configs/methods has {', '.join(names)})")
    return Preset(p, flag)


def load(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(run_dir: Path) -> bool:
    res = load(run_dir)
    return res is not None and res.get("complete", True) is not False


def run_cli(args: list[str], run_dir: Path, force: bool) -> float:
    """One train.py run (in this process); its wall time (0 when it had already finished)."""
    from reallm.run.cli import cli_main

    if finished(run_dir) and not force:
        print(f"[pipeline] {run_dir} already complete, skipped", flush=True)
        return 0.0
    print("[pipeline] python train.py " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.time()
    cli_main(args + ["--run_dir", str(run_dir)])
    return time.time() - t0


def machine(threads: int) -> str:
    import lightning
    import torch
    import transformers

    cpu = f"CPU {platform.processor() or platform.machine()}"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return (f"{dev}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} intra-op thread"
            f"{'s' if threads != 1 else ''} per pipeline), lightning {lightning.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def fine_tunable(compress_results: dict[str, Any]) -> bool:
    """Whether a phase-1 model has a low-rank part to train (some matrix stores low-rank bits)."""
    return any((m.get("items") or {}).get("lowrank", 0) > 0 for m in compress_results.get("matrices", []))


# ---------------------------------------------------------------------------------------------
# one pipeline
# ---------------------------------------------------------------------------------------------
class Runner:
    """The common CLI arguments of every stage, from the invocation's options."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = ROOT / "configs"
        self.common = ["--trainer.accelerator", args.accelerator]
        self.data = ["--data.init_args.path", "[" + ", ".join(args.eval) + "]", "--data.init_args.seq_len",
                     str(args.seq_len), "--data.init_args.batch_size", str(args.batch_size)]
        if args.max_eval_windows:
            self.data += ["--data.init_args.max_eval_windows", str(args.max_eval_windows)]
        if args.token_cache:
            self.data += ["--data.init_args.cache_dir", args.token_cache]
        self.train = self.data + ["--data.init_args.train_path", args.train]

    def evaluate(self, checkpoint: Path | None, out: Path, method: str | None = None) -> float:
        a = self.args
        source = (["--model.init_args.checkpoint", str(checkpoint), "--model.init_args.method", method or "custom"]
                  if checkpoint else ["--model.init_args.model_name_or_path", a.model])
        return run_cli(["validate", "--config", str(self.cfg / "eval.yaml"), *source, *self.common, *self.data,
                        *shlex.split(a.eval_args)], out, a.force)

    def pipeline(self, preset: Preset, seed: int, root: Path) -> dict[str, Any]:
        """Phases 1 → 2 → 3 of one preset and seed under `root`, with their evaluations."""
        a, split = self.args, shlex.split
        root.mkdir(parents=True, exist_ok=True)
        seeds = ["--seed_everything", str(seed), "--model.init_args.seed", str(seed)]
        cal = []
        if preset.calibrated:
            cal = ["--model.init_args.calibration.path", a.train, "--model.init_args.calibration.windows",
                   str(a.calibration_windows), "--model.init_args.calibration.seq_len", str(a.seq_len)]
            if a.token_cache:
                cal += ["--model.init_args.calibration.cache_dir", a.token_cache]
        if preset.mode == "gptq":
            cal += ["--model.init_args.compression.error_feedback", "gptq"]
        run_cli(["fit", "--config", str(self.cfg / "ae.yaml"), "--config", str(preset.path),
                 "--model.init_args.model_name_or_path", a.model, *seeds, *cal, *self.common,
                 *split(a.compress_args)], root / "compress", a.force)
        self.evaluate(root / "compress" / "reallm", root / "eval0", preset.name)
        note = None
        if not fine_tunable(load(root / "compress") or {}):
            note = "rank 0: no low-rank part to fine-tune, phase 1 only"
            print(f"[pipeline] {preset.label} seed {seed}: {note}", flush=True)
        else:
            start = root / "compress" / "reallm"
            if "blockwise" not in a.skip:
                run_cli(["fit", "--config", str(self.cfg / "blockwise.yaml"), "--model.init_args.checkpoint",
                         str(start), "--model.init_args.method", preset.name, *seeds, *self.common, *self.train,
                         "--data.init_args.train_sequences", str(a.calibration_sequences),
                         *split(a.blockwise_args)], root / "blockwise", a.force)
                start = root / "blockwise" / "reallm"
                self.evaluate(start, root / "eval2", preset.name)
            if "e2e" not in a.skip:
                run_cli(["fit", "--config", str(self.cfg / "e2e.yaml"), "--model.init_args.checkpoint", str(start),
                         "--model.init_args.method", preset.name, *seeds, *self.common, *self.train,
                         "--data.init_args.train_sequences", str(a.train_sequences), "--data.init_args.seed", "1",
                         *split(a.e2e_args)], root / "e2e", a.force)
                self.evaluate(root / "e2e" / "reallm", root / "eval3", preset.name)
        rows = stage_rows(root)
        (root / "table.md").write_text(stage_table(rows, load(Path(a.runs) / "original")) + "\n")
        return {"note": note, "rows": rows}


def stage_rows(root: Path) -> list[dict[str, Any]]:
    """One record per finished stage of a pipeline: accounted bits, perplexities, the phase's time."""
    rows = []
    for key, label, phase_dir, eval_dir in STAGES:
        ev, phase = load(root / eval_dir), load(root / phase_dir)
        if ev is None or phase is None:
            continue
        rows.append({"key": key, "label": label, "bits": phase.get("bits") or ev.get("bits"),
                     "perplexity": {d: v["value"] for d, v in ev.get("perplexity", {}).items()},
                     "time_s": phase.get("time_s"), "run_dir": str(root / phase_dir),
                     "calibration": phase.get("calibration") if key == "compress" else None})
    return rows


def fmt(v: Any, spec: str = "{:.3f}") -> str:
    return "-" if v is None else spec.format(v)


def stage_table(rows: list[dict[str, Any]], original: dict[str, Any] | None) -> str:
    """The table of one pipeline (one row per stage)."""
    ref = {d: v["value"] for d, v in (original or {}).get("perplexity", {}).items()}
    datasets = list(dict.fromkeys(d for r in rows for d in r["perplexity"]))
    head = ["stage", "nominal b", "bits (decoder linears)", "bits (whole model)"]
    for d in datasets:
        head += [f"ppl {d}", "× original"]
    head.append("stage time (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        b = r.get("bits") or {}
        cells = [r["label"], fmt(b.get("nominal"), "{}"), fmt(b.get("decoder_linears")), fmt(b.get("whole_model"))]
        for d in datasets:
            v = r["perplexity"].get(d)
            cells += [fmt(v, "{:.4f}"), fmt(v / ref[d] if v and ref.get(d) else None)]
        cells.append(fmt(r.get("time_s"), "{:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the summary over presets × seeds
# ---------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> tuple[float, float, float] | None:
    return (sum(values) / len(values), min(values), max(values)) if values else None


def _spread(s: tuple[float, float, float] | None, spec: str, n: int) -> str:
    if s is None:
        return "-"
    mean = spec.format(s[0])
    return mean if n < 2 else f"{mean} [{spec.format(s[1])}, {spec.format(s[2])}]"


def budget_class(bits: float | None) -> str:
    if bits is None:
        return "-"
    for b in BUDGETS:
        if bits <= b + 1e-9:
            return f"≤ {b}"
    return f"> {BUDGETS[-1]}"


def summarize(results: dict[tuple[Preset, int], dict[str, Any]], original: dict[str, Any] | None
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """One summary row per (preset, stage): mean and range over the seeds."""
    ref = {d: v["value"] for d, v in (original or {}).get("perplexity", {}).items()}
    datasets = list(ref) or list(dict.fromkeys(d for res in results.values() for r in res["rows"]
                                                for d in r["perplexity"]))
    presets = list(dict.fromkeys(p for p, _ in results))
    rows = []
    for preset in presets:
        seeds = sorted(s for p, s in results if p == preset)
        notes = {results[(preset, s)]["note"] for s in seeds} - {None}
        for key, label, _, _ in STAGES:
            per_seed = [r for s in seeds for r in results[(preset, s)]["rows"] if r["key"] == key]
            if not per_seed:
                continue
            bits = [r["bits"]["decoder_linears"] for r in per_seed if r.get("bits")]
            row = {"method": preset.label, "stage": label, "seeds": [s for s in seeds
                                                                    if any(r["key"] == key for r in
                                                                           results[(preset, s)]["rows"])],
                   "nominal": (per_seed[0].get("bits") or {}).get("nominal"),
                   "bits": _stats(bits), "whole_model": _stats([r["bits"]["whole_model"] for r in per_seed
                                                               if r.get("bits")]),
                   "time_s": _stats([r["time_s"] for r in per_seed if r.get("time_s") is not None]),
                   "perplexity": {}, "ratio": {}, "note": "; ".join(sorted(notes)) if key == "compress" else None}
            for d in datasets:
                vals = [r["perplexity"][d] for r in per_seed if d in r["perplexity"]]
                row["perplexity"][d] = _stats(vals)
                row["ratio"][d] = _stats([v / ref[d] for v in vals]) if ref.get(d) else None
            rows.append(row)
    return rows, datasets


def summary_table(rows: list[dict[str, Any]], datasets: list[str], original: dict[str, Any] | None) -> str:
    head = ["method", "stage", "budget class", "nominal b", "bits (decoder linears)", "bits (whole model)"]
    for d in datasets:
        head += [f"ppl {d}", f"× original ({d})"]
    head += ["stage time (s)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ref = {d: v["value"] for d, v in (original or {}).get("perplexity", {}).items()}
    if ref:
        lines.append("| original (uncompressed) | - | - | - | - | - | " +
                     " | ".join(f"{ref.get(d, float('nan')):.4f} | 1.000" for d in datasets) + " | - | - |")
    order = sorted(rows, key=lambda r: (budget_class(r["bits"][0] if r["bits"] else None), r["method"],
                                        [s[1] for s in STAGES].index(r["stage"])))
    for r in order:
        n = len(r["seeds"])
        cells = [r["method"] + (f" ({r['note']})" if r.get("note") else ""), r["stage"],
                 budget_class(r["bits"][0] if r["bits"] else None), fmt(r["nominal"], "{}"),
                 _spread(r["bits"], "{:.3f}", n), _spread(r["whole_model"], "{:.3f}", n)]
        for d in datasets:
            cells += [_spread(r["perplexity"].get(d), "{:.3f}", n), _spread(r["ratio"].get(d), "{:.3f}", n)]
        cells += [_spread(r["time_s"], "{:.0f}", n), ",".join(str(s) for s in r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _worker_command(args: argparse.Namespace, preset: Preset, seed: int, argv: list[str]) -> list[str]:
    """The command of one pipeline in its own process: the invocation's options for one preset and seed."""
    keep: list[str] = []
    skip_next = False
    for a in argv:
        if skip_next:
            if a.startswith("--"):
                skip_next = False
            else:
                continue
        if a in ("--presets", "--preset", "--seeds", "--jobs"):
            skip_next = True
            continue
        keep.append(a)
    spec = str(preset.path) + (f":{preset.mode}" if preset.mode else "")
    return [sys.executable, str(Path(__file__).resolve()), *keep, "--presets", spec, "--seeds", str(seed),
            "--jobs", "1", "--runs", str(args.runs), "--one"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.runs = str(Path(args.runs or ROOT / "runs" / "pipeline").resolve())
    import torch

    torch.set_num_threads(args.threads)
    presets = [resolve_preset(p) for p in args.presets]  # every name checked before anything runs
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)
    t_all = time.time()
    if not args.one:
        runner.evaluate(None, runs / "original")  # once, before any pipeline (no two processes write it)
    jobs = [(p, s) for p in presets for s in args.seeds]
    results: dict[tuple[Preset, int], dict[str, Any]] = {}
    failed: list[str] = []
    if args.jobs <= 1:
        for p, s in jobs:
            root = runs / p.folder / f"seed{s}"
            try:
                results[(p, s)] = runner.pipeline(p, s, root)
            except SystemExit as e:  # a stage's one-line error: the other pipelines still run
                if len(jobs) == 1 or args.one:
                    raise
                failed.append(f"{p.label} seed {s}")
                print(f"[pipeline] {p.label} seed {s}: FAILED (exit {e.code})", file=sys.stderr, flush=True)
                results[(p, s)] = {"note": "failed", "rows": stage_rows(root)}
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

        def work(job: tuple[Preset, int]) -> int:
            p, s = job
            log = runs / p.folder / f"seed{s}" / "pipeline.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[pipeline] {p.label} seed {s}: started (log {log})", flush=True)
            with open(log, "a") as f:
                rc = subprocess.run(_worker_command(args, p, s, argv), stdout=f, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(ROOT)).returncode
            print(f"[pipeline] {p.label} seed {s}: {'done' if rc == 0 else f'FAILED (exit {rc}), see {log}'}",
                  flush=True)
            return rc

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(work, jobs))
        failed = [f"{p.label} seed {s}" for (p, s), rc in zip(jobs, codes) if rc != 0]
        for p, s in jobs:
            root = runs / p.folder / f"seed{s}"
            res = load(root / "compress") or {}
            note = None if fine_tunable(res) or not res else "rank 0: no low-rank part to fine-tune, phase 1 only"
            results[(p, s)] = {"note": note, "rows": stage_rows(root)}
    if failed:
        print(f"[pipeline] failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    if args.one:
        return 0
    original = load(runs / "original")
    rows, datasets = summarize(results, original)
    text = summary_table(rows, datasets, original)
    command = " ".join(shlex.quote(a) for a in argv)
    header = (f"`{args.model}`, training text `{args.train}`, context {args.seq_len}; {machine(args.threads)}; "
              f"{args.jobs} pipeline(s) at a time\n\ncommand: `python benchmarks/pipeline.py {command}`\n\n"
              "Cells: mean [min, max] over the seeds; budget class: the accounted bits of the decoder linears; "
              "stage time: the phase's own wall seconds.\n\n")
    (runs / "table.md").write_text(header + text + "\n")
    payload = {"presets": [p.label for p in presets], "seeds": args.seeds, "machine": machine(args.threads),
               "jobs": args.jobs, "total_wall_s": time.time() - t_all, "summary": rows,
               "pipelines": {f"{p.folder}/seed{s}": res for (p, s), res in results.items()}}
    (runs / "pipeline.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print()
    print(header + text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
