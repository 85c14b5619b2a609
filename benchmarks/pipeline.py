"""Phase 1 → 2 → 3 → evaluation for one method preset; one table row per stage (paper Table 1).

    python benchmarks/pipeline.py --preset vq-2bit-ft                    # stories260K, TinyStories, CPU
    python benchmarks/pipeline.py --preset vq-3bit-ft --runs runs/pipe3 \\
        --blockwise-args "--model.init_args.epochs_per_block 4" --e2e-args "--trainer.max_epochs 2"

Stages, each one run of `train.py` (in this process, through `reallm.cli.cli_main`) in its own
run directory under --runs:
    original/     evaluation of the uncompressed base model (the reference of the ratios)
    compress/     phase 1 with configs/ae.yaml + configs/methods/<preset>.yaml  → eval0/
    blockwise/    phase 2 with configs/blockwise.yaml from compress/reallm       → eval2/
    e2e/          phase 3 with configs/e2e.yaml from blockwise/reallm            → eval3/
A stage whose results.json is already complete is not run again (a killed pipeline restarted with
the same --runs continues; --force redoes everything). The table is printed and written to
<runs>/table.md, the numbers to <runs>/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
sys.path.insert(0, str(ROOT))

STAGES = [  # (key, row label, phase run dir, evaluation run dir)
    ("original", "original (uncompressed)", None, "original"),
    ("compress", "no fine-tuning (phase 1)", "compress", "eval0"),
    ("blockwise", "block-wise (phase 2)", "blockwise", "eval2"),
    ("e2e", "end-to-end (phase 3)", "e2e", "eval3"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, help="a file of configs/methods/ (name or path)")
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"), help="base model (hub id or dir)")
    ap.add_argument("--train", default=str(SHARED / "data" / "tinystories_train.txt"),
                    help="training text of phases 2 and 3")
    ap.add_argument("--eval", nargs="+", default=[str(SHARED / "data" / "tinystories_valid.txt"),
                                                  str(SHARED / "data" / "wikitext2_raw_test.txt")],
                    help="evaluation texts (protocol.md rules)")
    ap.add_argument("--seq-len", type=int, default=512, help="context L of training and evaluation")
    ap.add_argument("--runs", default=None, help="root of the run directories (default runs/pipeline-<preset>)")
    ap.add_argument("--calibration-sequences", type=int, default=256, help="phase-2 calibration windows")
    ap.add_argument("--train-sequences", type=int, default=2048, help="phase-3 training windows per epoch")
    ap.add_argument("--batch-size", type=int, default=8, help="micro-batch of phases 2 and 3 and of evaluation")
    ap.add_argument("--max-eval-windows", type=int, default=None, help="evaluate on the first windows only")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest for tiny models)")
    ap.add_argument("--compress-args", default="", help="extra CLI arguments of phase 1 (one string)")
    ap.add_argument("--blockwise-args", default="", help="extra CLI arguments of phase 2")
    ap.add_argument("--e2e-args", default="", help="extra CLI arguments of phase 3")
    ap.add_argument("--eval-args", default="", help="extra CLI arguments of every evaluation")
    ap.add_argument("--skip", nargs="*", default=[], choices=["original", "blockwise", "e2e"],
                    help="stages to leave out (without blockwise, phase 3 starts from phase 1)")
    ap.add_argument("--force", action="store_true", help="rerun stages that already finished")
    return ap.parse_args(argv)


def preset_path(preset: str) -> Path:
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    p = ROOT / "configs" / "methods" / f"{preset}.yaml"
    if not p.is_file():
        names = sorted(f.stem for f in (ROOT / "configs" / "methods").glob("*.yaml"))
        raise SystemExit(f"error: no preset {preset!r} (configs/methods has {', '.join(names)})")
    return p


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
    from reallm.cli import cli_main

    if finished(run_dir) and not force:
        print(f"[pipeline] {run_dir} already complete, skipped", flush=True)
        return 0.0
    print("[pipeline] python train.py " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.time()
    cli_main(args + ["--run_dir", str(run_dir)])
    return time.time() - t0


def machine() -> str:
    import lightning
    import torch
    import transformers

    cpu = f"CPU {platform.processor() or platform.machine()}"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return (f"{dev}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"lightning {lightning.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}")


def fmt(v: Any, spec: str = "{:.3f}") -> str:
    return "-" if v is None else spec.format(v)


def table(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    base = next((r for r in rows if r["key"] == "original"), None)
    head = ["stage", "nominal b", "bits (decoder linears)", "bits (whole model)"]
    for d in datasets:
        head += [f"ppl {d}", "× original"]
    head += ["stage time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        b = r.get("bits") or {}
        cells = [r["label"], fmt(b.get("nominal"), "{}"), fmt(b.get("decoder_linears")), fmt(b.get("whole_model"))]
        for d in datasets:
            v = r["perplexity"].get(d)
            ref = base["perplexity"].get(d) if base else None
            cells += [fmt(v, "{:.4f}"), fmt(v / ref if v and ref else None, "{:.3f}")]
        cells.append(fmt(r.get("time_s"), "{:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = preset_path(args.preset)
    runs = Path(args.runs or ROOT / "runs" / f"pipeline-{preset.stem}")
    runs.mkdir(parents=True, exist_ok=True)
    cfg = ROOT / "configs"
    common = ["--trainer.accelerator", args.accelerator]
    eval_paths = "[" + ", ".join(args.eval) + "]"
    data = ["--data.init_args.path", eval_paths, "--data.init_args.seq_len", str(args.seq_len),
            "--data.init_args.batch_size", str(args.batch_size)]
    if args.max_eval_windows:
        data += ["--data.init_args.max_eval_windows", str(args.max_eval_windows)]
    train = data + ["--data.init_args.train_path", args.train]
    split = shlex.split

    def evaluate(checkpoint: Path | None, out: Path) -> float:
        source = (["--model.init_args.checkpoint", str(checkpoint), "--model.init_args.method", preset.stem]
                  if checkpoint else ["--model.init_args.model_name_or_path", args.model])
        return run_cli(["validate", "--config", str(cfg / "eval.yaml"), *source, *common, *data,
                        *split(args.eval_args)], out, args.force)

    times: dict[str, float] = {}
    t_all = time.time()
    if "original" not in args.skip:
        times["original"] = evaluate(None, runs / "original")
    times["compress"] = run_cli(["fit", "--config", str(cfg / "ae.yaml"), "--config", str(preset),
                                 "--model.init_args.model_name_or_path", args.model, *common,
                                 *split(args.compress_args)], runs / "compress", args.force)
    evaluate(runs / "compress" / "reallm", runs / "eval0")
    start = runs / "compress" / "reallm"
    if "blockwise" not in args.skip:
        times["blockwise"] = run_cli(["fit", "--config", str(cfg / "blockwise.yaml"), "--model.init_args.checkpoint",
                                      str(start), "--model.init_args.method", preset.stem, *common, *train,
                                      "--data.init_args.train_sequences", str(args.calibration_sequences),
                                      *split(args.blockwise_args)], runs / "blockwise", args.force)
        start = runs / "blockwise" / "reallm"
        evaluate(start, runs / "eval2")
    if "e2e" not in args.skip:
        times["e2e"] = run_cli(["fit", "--config", str(cfg / "e2e.yaml"), "--model.init_args.checkpoint", str(start),
                                "--model.init_args.method", preset.stem, *common, *train,
                                "--data.init_args.train_sequences", str(args.train_sequences),
                                "--data.init_args.seed", "1", *split(args.e2e_args)], runs / "e2e", args.force)
        evaluate(runs / "e2e" / "reallm", runs / "eval3")

    rows = []
    datasets: list[str] = []
    for key, label, phase_dir, eval_dir in STAGES:
        if key in args.skip or not (runs / eval_dir).is_dir():
            continue
        ev = load(runs / eval_dir) or {}
        phase = load(runs / phase_dir) if phase_dir else None
        ppl = {d: v["value"] for d, v in ev.get("perplexity", {}).items()}
        datasets += [d for d in ppl if d not in datasets]
        rows.append({"key": key, "label": label, "bits": (phase or {}).get("bits") or ev.get("bits"),
                     "perplexity": ppl, "time_s": (phase or {}).get("time_s"),
                     "pipeline_wall_s": times.get(key), "run_dir": str(runs / (phase_dir or eval_dir))})
    text = table(rows, datasets)
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = (f"preset `{preset.stem}` on `{args.model}`, training text `{args.train}`, context {args.seq_len}; "
              f"{machine()}\n\ncommand: `python benchmarks/pipeline.py {command}`\n\n")
    (runs / "table.md").write_text(header + text + "\n")
    (runs / "pipeline.json").write_text(json.dumps({"preset": preset.stem, "rows": rows, "machine": machine(),
                                                    "total_wall_s": time.time() - t_all}, indent=1) + "\n")
    print()
    print(header + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
