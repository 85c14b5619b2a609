"""Turn run directories (their results.json) into one markdown table.

    python -m reallm.report runs/original runs/nf3 runs/nf3-eval [--baseline runs/original]

Compression runs give the bits, evaluation runs the perplexities; a compression run and the
evaluation of its checkpoint are joined into one row. Perplexity ratios are against the
baseline run (default: the first evaluation of a base model, i.e. without a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (did the run finish?)")
    return json.loads(path.read_text())


def _key(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def rows_from_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: compression results joined with the evaluation of their checkpoint."""
    compress = {_key(r.get("checkpoint_dir")): r for r in runs if r.get("phase") != "eval"}
    rows = []
    for r in runs:
        if r.get("phase") != "eval":
            continue
        src = compress.get(_key(r.get("checkpoint")))
        rows.append({
            "label": r.get("method") if r.get("checkpoint") else "original",
            "method": (src or r).get("method"),
            "bits": (src or r).get("bits") or {},
            "rel_error": (src or {}).get("mean_rel_frobenius_error"),
            "time_s": (src or {}).get("time_s"),
            "perplexity": r.get("perplexity", {}),
            "is_base": not r.get("checkpoint"),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["is_base"]), None)
    datasets = sorted({d for r in rows for d in r["perplexity"]})
    head = ["model", "nominal b", "bits (decoder linears)", "bits (whole model)", "mean rel. error"]
    for d in datasets:
        head += [f"ppl {d}", f"× original ({d})"]
    head.append("compress time (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        b = r["bits"]

        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)

        cells = [r["label"], f(b.get("nominal"), "{}"), f(b.get("decoder_linears")),
                 f(b.get("whole_model")), f(r["rel_error"], "{:.4f}")]
        for d in datasets:
            v = r["perplexity"].get(d, {}).get("value")
            ref = base["perplexity"].get(d, {}).get("value") if base else None
            cells += [f(v, "{:.3f}"), f(v / ref if v and ref else None, "{:.3f}")]
        cells.append(f(r["time_s"], "{:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories holding results.json")
    args = ap.parse_args(argv)
    try:
        runs = [load_results(r) for r in args.runs]
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown_table(rows_from_runs(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
