"""Method comparison: every preset through phase 1 and evaluation, side by side, in one run.

    python benchmarks/compare_methods.py [--presets nf3 vq-3bit ...] [--out runs/compare]

For each preset in configs/methods/: `train.py fit --config configs/ae.yaml --config <preset>` on
../shared/models/stories260K, then `train.py validate --config configs/eval.yaml` of the checkpoint
on tinystories_valid.txt and wikitext2_raw_test.txt (context 512, protocol.md's WikiText rule);
the uncompressed model is evaluated the same way. Prints one markdown table: method, nominal b,
accounted bits (decoder linears and whole model), mean relative Frobenius error, perplexity on both
texts and its ratio to the uncompressed model, phase-1 time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"failed ({log}):\n" + "\n".join(tail))


def evaluate(out: Path, name: str, model_args: list[str], texts: list[str], windows: int | None) -> dict:
    run_dir = out / f"{name}-eval"
    extra = ["--data.init_args.max_eval_windows", str(windows)] if windows else []
    run(["validate", "--config", "configs/eval.yaml", *model_args, "--data.init_args.path", json.dumps(texts),
         "--data.init_args.seq_len", "512", "--data.init_args.batch_size", "8", "--trainer.accelerator", "cpu",
         *extra, "--run_dir", str(run_dir)], out / f"{name}-eval.log")
    return json.loads((run_dir / "results.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
    ap.add_argument("--presets", nargs="+", default=presets, help="presets to compare (default: all)")
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    ap.add_argument("--out", default="runs/compare", help="directory for the runs")
    ap.add_argument("--max-eval-windows", type=int, default=None,
                    help="cap the windows per text (quick runs; the README table uses all)")
    args = ap.parse_args()
    texts = [str(SHARED / "data" / "tinystories_valid.txt"), str(SHARED / "data" / "wikitext2_raw_test.txt")]
    if not Path(args.model).is_dir() or not all(Path(t).is_file() for t in texts):
        print(f"error: {args.model} or the shared texts are absent (this benchmark needs ../shared)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"command: python benchmarks/compare_methods.py {' '.join(sys.argv[1:])}".strip(), flush=True)
    base = evaluate(out, "original", ["--model.init_args.model_name_or_path", args.model], texts,
                    args.max_eval_windows)
    rows = []
    for preset in args.presets:
        t0 = time.time()
        run_dir = out / preset
        run(["fit", "--config", "configs/ae.yaml", "--config", f"configs/methods/{preset}.yaml",
             "--model.init_args.model_name_or_path", args.model, "--trainer.accelerator", "cpu",
             "--run_dir", str(run_dir)], out / f"{preset}.log")
        wall = time.time() - t0
        comp = json.loads((run_dir / "results.json").read_text())
        ev = evaluate(out, preset, ["--model.init_args.checkpoint", str(run_dir / "reallm")], texts,
                      args.max_eval_windows)
        rows.append((preset, comp, ev, wall))
        print(f"done {preset} ({wall:.0f} s)", file=sys.stderr, flush=True)

    names = list(base["perplexity"])
    head = ["method", "nominal b", "bits (decoder linears)", "bits (whole model)", "mean rel. error"]
    for n in names:
        head += [f"ppl {n}", "× orig."]
    head.append("phase-1 wall time (s)")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    cells = ["uncompressed (fp32)", "32", "-", "-", "-"]
    for n in names:
        cells += [f"{base['perplexity'][n]['value']:.3f}", "1.000"]
    print("| " + " | ".join(cells + ["-"]) + " |")
    for preset, comp, ev, wall in rows:
        b = comp["bits"]
        cells = [preset, str(b["nominal"]), f"{b['decoder_linears']:.3f}", f"{b['whole_model']:.3f}",
                 f"{comp['mean_rel_frobenius_error']:.4f}"]
        for n in names:
            v, ref = ev["perplexity"][n]["value"], base["perplexity"][n]["value"]
            cells += [f"{v:.3f}", f"{v / ref:.3f}"]
        cells.append(f"{wall:.1f}")
        print("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{n}: {base['perplexity'][n]['tokens']} predicted tokens" for n in names)
    print(f"\ncontext 512; {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
