"""Method comparison: every preset through phase 1 and evaluation, side by side, in one run.

    python benchmarks/compare_methods.py [--presets nf3 vq-3bit ...] [--out runs/compare] [--reuse]

For each preset in configs/methods/: `train.py fit --config configs/ae.yaml --config <preset>` on
../shared/models/stories260K, then `train.py validate --config configs/eval.yaml` of the checkpoint
on tinystories_valid.txt and wikitext2_raw_test.txt (context 512, protocol.md's WikiText rule);
the uncompressed model is evaluated the same way. Prints one markdown table (`reallm.run.report`): method,
nominal b, accounted bits over the decoder linears and what they pay for (codes, codebook, scales,
permutation, rotation, low-rank, magnitude: bits per weight of each item), bits over the whole model,
mean relative Frobenius error, perplexity on both texts, its ratio to the uncompressed model, and the
fair comparison: the best *other* method at equal or fewer accounted bits with its perplexity. Then
the bit band of every 2- and 3-bit row (issue 14: accounted bits within 2.0–2.5 and 3.0–3.5) with the
item that puts a row outside it, and the phase-1 wall time of each preset (process start included).
Writes `<out>/report/report.md` with the table and the figures: bits/perplexity Pareto front per text
(every method), bits/error, error per block.

Errors, bits and perplexities do not depend on the machine's load; the times do (run the timed table
with nothing else running).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

#: nominal b → band of accounted bits per weight (decoder linears) that makes a row a b-bit model (issue 14)
BANDS = {2: (2.0, 2.5), 3: (3.0, 3.5)}
_CODE_ITEMS = ("codes", "latent", "dense")  # what the nominal b pays for; everything else is overhead


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"failed ({log}):\n" + "\n".join(tail))


def done(run_dir: Path, reuse: bool) -> bool:
    """With --reuse: the run finished before (its results.json is complete)."""
    path = run_dir / "results.json"
    return reuse and path.is_file() and json.loads(path.read_text()).get("complete", True)


def evaluate(out: Path, name: str, model_args: list[str], texts: list[str], windows: int | None,
             reuse: bool) -> Path:
    run_dir = out / f"{name}-eval"
    if done(run_dir, reuse):
        return run_dir
    extra = ["--data.init_args.max_eval_windows", str(windows)] if windows else []
    run(["validate", "--config", "configs/eval.yaml", *model_args, "--data.init_args.path", json.dumps(texts),
         "--data.init_args.seq_len", "512", "--data.init_args.batch_size", "8", "--trainer.accelerator", "cpu",
         *extra, "--run_dir", str(run_dir)], out / f"{name}-eval.log")
    return run_dir


def band_notes(rows: list[dict]) -> list[str]:
    """One line per 2- or 3-bit row: inside its band, or outside it and the two largest items beside the codes."""
    from reallm.run.report import bits_breakdown

    lines = []
    for r in rows:
        nominal, bits = r["bits"].get("nominal"), r["bits"].get("decoder_linears")
        budget = r.get("budget")
        if isinstance(nominal, list) and budget is not None:  # matrices chose formats under a budget (reallm-*):
            nominal = math.floor(budget)  # its class is the budget's (3.25 → 3-bit, 2.75 → 2-bit)
        elif isinstance(nominal, list) and nominal:
            nominal = min(nominal)
        if not isinstance(nominal, (int, float)) or int(nominal) not in BANDS or bits is None:
            continue
        lo, hi = BANDS[int(nominal)]
        if lo <= bits <= hi:
            lines.append(f"- {r['label']}: {bits:.3f} bits, within {lo}–{hi}")
            continue
        overhead = [(k, v) for k, v in bits_breakdown(r["matrices"]).items() if k not in _CODE_ITEMS]  # largest first
        largest = ", ".join(f"{k} {v:.3f}" for k, v in overhead[:2])
        why = f"; largest items beside the codes: {largest}" if overhead else ""
        lines.append(f"- {r['label']}: {bits:.3f} bits, OUTSIDE {lo}–{hi}{why}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
    ap.add_argument("--presets", nargs="+", default=presets, help="presets to compare (default: all)")
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    ap.add_argument("--out", default="runs/compare", help="directory for the runs")
    ap.add_argument("--max-eval-windows", type=int, default=None,
                    help="cap the windows per text (quick runs; the README table uses all)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs of a previous call that finished (their times are then the old ones)")
    args = ap.parse_args()
    unknown = sorted(set(args.presets) - set(presets))
    if unknown:
        print(f"error: unknown presets {unknown}; configs/methods/ has {presets}", file=sys.stderr)
        return 1
    texts = [str(SHARED / "data" / "tinystories_valid.txt"), str(SHARED / "data" / "wikitext2_raw_test.txt")]
    if not Path(args.model).is_dir() or not all(Path(t).is_file() for t in texts):
        print(f"error: {args.model} or the shared texts are absent (this benchmark needs ../shared)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from reallm.run import report

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"load average at start {tuple(round(v, 2) for v in os.getloadavg())}; "
          f"command: python benchmarks/compare_methods.py {' '.join(sys.argv[1:])}".strip(), flush=True)
    run_dirs = [evaluate(out, "original", ["--model.init_args.model_name_or_path", args.model], texts,
                         args.max_eval_windows, args.reuse)]
    walls = {}
    for preset in args.presets:
        run_dir = out / preset
        if not done(run_dir, args.reuse):
            t0 = time.time()
            run(["fit", "--config", "configs/ae.yaml", "--config", f"configs/methods/{preset}.yaml",
                 "--model.init_args.model_name_or_path", args.model, "--trainer.accelerator", "cpu",
                 "--run_dir", str(run_dir)], out / f"{preset}.log")
            walls[preset] = time.time() - t0
        ev = evaluate(out, preset, ["--model.init_args.checkpoint", str(run_dir / "reallm")], texts,
                      args.max_eval_windows, args.reuse)
        run_dirs += [run_dir, ev]
        print(f"done {preset}" + (f" ({walls[preset]:.0f} s)" if preset in walls else " (reused)"), file=sys.stderr,
              flush=True)

    rows = report.rows_from_runs([report.load_results(d) for d in run_dirs])
    print(report.markdown_table(rows))
    base = rows[0]["perplexity"]
    counts = ", ".join(f"{n}: {base[n]['tokens']} predicted tokens" for n in base)
    print(f"\ncontext 512; {counts}; bits over the decoder linears; \"best other ≤ bits\": the lowest perplexity "
          f"among the other rows with equal or fewer accounted bits")
    print("\nbit bands (issue 14):")
    print("\n".join(band_notes(rows)))
    print("\nphase-1 wall time (s, process start included): "
          + ", ".join(f"{p} {w:.1f}" for p, w in walls.items()) if walls else "\nphase-1 wall times: all runs reused")
    figures = report.write_figures(rows, out / "report", max_heatmaps=0)
    md = report.write_report_md(rows, figures, out / "report")
    print(f"\nwrote {md} and {len(figures)} figures", file=sys.stderr)
    print(f"load average at end {tuple(round(v, 2) for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
