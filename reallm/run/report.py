"""Turn run directories (their results.json) into one markdown table, and optionally figures.

    python -m reallm.run.report runs/original runs/nf3 runs/nf3-eval [--baseline runs/original]
    python -m reallm.run.report runs/*/ --figures runs/report        # + report.md and PNG figures

Compression runs give the bits and what phase 1 was given (column "phase-1 data": data-free, or calibrated
on N windows of L tokens of a text), evaluation runs the perplexities (and zero-shot accuracies); a
compression run and the evaluation of its checkpoint are joined into one row. Runs that were not
evaluated separately (a phase-1 run with `--eval_after_fit`, a fine-tuning run with its own
validation, a sweep's runs) get their own row. Perplexity ratios are against the baseline run
(default: the first evaluation of a base model, i.e. without a checkpoint). Rows with the same
label (a sweep's runs share their preset) are told apart by the config values that differ.

Each row says what its bits pay for (accounted bits per weight of each item over the decoder linears:
codes, codebook, scales, permutation, rotation, low-rank, magnitude, ...) and, per evaluation text,
the fair comparison: the row with the lowest perplexity among the *other* rows at equal or fewer
accounted bits (decoder linears), or "-" when there is none (the row is then the cheapest).

With `--figures DIR`: `DIR/report.md` (the table and the figures), `error_by_block.png` (per-matrix
relative error against block index, one panel per layer type, one line per row: the paper's
Figure 3), `pareto_<dataset>.png` (accounted bits against perplexity with the Pareto front),
`pareto_error.png` (bits against mean relative error) and `heatmap_<row>.png` (a weight, its
residual, its reconstruction and the error: the paper's Figure 1) for the compressed runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from reallm.checkpoint.compressed import load_layer
from reallm.core.errors import CheckpointError
from reallm.core.hf_models import read_weight
from reallm.run.tracking import flatten

# config keys that differ between runs without making them different experiments
_HIDDEN_KEYS = ("run_dir", "checkpoint", "model_name_or_path", "method", "cache_dir", "logger", "wandb", "artifacts",
                "nan_guard", "eval_after_fit", "ckpt_path", "config", "trainer.logger", "trainer.default_root_dir")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (did the run finish?)")
    results = json.loads(path.read_text())
    results.setdefault("run_dir", str(run_dir))
    return results


def _key(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def rows_from_runs(runs: list[dict[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per model: compression results joined with the evaluation of their checkpoint;
    fit-phase runs that no evaluation refers to get their own row."""
    evals = ("eval", "zero_shot")
    compress = {_key(r["checkpoint_dir"]): r for r in runs if r.get("phase") not in evals and r.get("checkpoint_dir")}

    def source(r: dict[str, Any]) -> dict[str, Any] | None:
        return compress.get(_key(r["checkpoint"])) if r.get("checkpoint") else None

    joined = {id(src) for r in runs if r.get("phase") in evals and (src := source(r)) is not None}
    rows = []
    for r in runs:
        if r.get("phase") in evals:
            rows.append(_row(r, source(r), r.get("method") if r.get("checkpoint") else "original",
                             not r.get("checkpoint")))
        elif id(r) not in joined:
            label = r.get("method") or "custom"
            if r.get("phase") not in (None, "compress"):
                label = f"{label} ({r['phase']})"
            rows.append(_row(r, r, label, False))
    if baseline is not None:
        for row in rows:
            row["is_base"] = _key(row["run_dir"]) == _key(baseline)
    _distinguish(rows)
    return rows


def _row(r: dict[str, Any], src: dict[str, Any] | None, label: str, is_base: bool) -> dict[str, Any]:
    return {
        "label": label,
        "method": (src or r).get("method"),
        "phase": (src or r).get("phase"),
        "bits": (src or r).get("bits") or {},
        "rel_error": (src or {}).get("mean_rel_frobenius_error"),
        "budget": ((src or {}).get("adaptive") or {}).get("budget_bits_per_weight"),  # adaptive choice only
        "calibration": (src or {}).get("calibration"),
        "time_s": (src or {}).get("time_s"),
        "perplexity": r.get("perplexity") or {},
        "zero_shot": (r.get("zero_shot") or {}).get("tasks", {}),
        "matrices": (src or {}).get("matrices") or [],
        "checkpoint_dir": (src or {}).get("checkpoint_dir"),
        "model": (src or r).get("model"),
        "config": (src or r).get("config") or {},
        "run_dir": r.get("run_dir"),
        "is_base": is_base,
    }


def _distinguish(rows: list[dict[str, Any]]) -> None:
    """Rows sharing a label get the config values that differ among them (`bits=2, rank=4`), or
    their run directory's name when nothing differs."""

    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    for label, group in by_label.items():
        if len(group) < 2:
            continue
        flats = [{k: v for k, v in flatten(g["config"]).items()
                  if not any(k == h or k.endswith("." + h) or k.startswith(h + ".") for h in _HIDDEN_KEYS)}
                 for g in group]
        keys = sorted({k for f in flats for k in f}, key=lambda k: (k.count("."), k))
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
        for g, f in zip(group, flats):
            if differ:
                g["label"] = f"{label} " + ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(f.get(k))}" for k in differ[:4])
            else:
                g["label"] = f"{label} [{Path(g['run_dir'] or '?').name}]"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def bits_breakdown(matrices: list[dict[str, Any]]) -> dict[str, float]:
    """What the bits pay for: accounted bits per weight of each bit item (codes, codebook, scales, ...) over
    the given matrices (results.json's "matrices", each with its "items" in bits and its "shape"), largest
    first; items worth nothing are left out. Empty when a matrix has no itemised bits."""
    if not matrices or any(not m.get("items") or not m.get("shape") for m in matrices):
        return {}
    weights = sum(m["shape"][0] * m["shape"][1] for m in matrices)
    sums: dict[str, float] = {}
    for m in matrices:
        for item, nbits in m["items"].items():
            sums[item] = sums.get(item, 0.0) + nbits
    return {k: v / weights for k, v in sorted(sums.items(), key=lambda kv: -kv[1]) if v > 0}


def format_breakdown(items: dict[str, float]) -> str:
    """`codes 2.000 + codebook 0.289 + scales 0.135`, or "-"."""
    return " + ".join(f"{k} {v:.3f}" for k, v in items.items()) or "-"


def best_other_at_most_bits(rows: list[dict[str, Any]], dataset: str) -> list[dict[str, Any] | None]:
    """The fair comparison of each row: among the other rows with a perplexity on `dataset` and accounted bits
    (decoder linears) equal to or fewer than this row's, the one with the lowest perplexity (None: no such row,
    or this row has no bits). Rows without bits (an uncompressed model) are never chosen."""
    def bits(r: dict[str, Any]) -> float | None:
        b = r["bits"].get("decoder_linears")
        return float(b) if isinstance(b, (int, float)) and math.isfinite(b) else None

    def ppl(r: dict[str, Any]) -> float | None:
        v = r["perplexity"].get(dataset, {}).get("value")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    out: list[dict[str, Any] | None] = []
    for i, r in enumerate(rows):
        own = bits(r)
        rivals = [o for j, o in enumerate(rows) if j != i and own is not None and bits(o) is not None
                  and ppl(o) is not None and bits(o) <= own * (1 + 1e-9)]
        out.append(min(rivals, key=lambda o: (ppl(o), bits(o))) if rivals else None)
    return out


def calibration_label(calibration: Any) -> str:
    """What phase 1 was given: "data-free", "calibrated (N × L tokens of <file>[; GPTQ codes in M matrices])", or
    "-" (unknown: not a
    compression run, or one written before the option existed)."""
    if calibration == "data-free":
        return "data-free"
    if isinstance(calibration, dict):
        fed = calibration.get("error_feedback_matrices")
        return (f"calibrated ({calibration.get('windows_used')} × {calibration.get('seq_len')} tokens of "
                f"{Path(str(calibration.get('path'))).name}" + (f"; GPTQ codes in {fed} matrices" if fed else "") + ")")
    return "-"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["is_base"]), None)
    datasets = sorted({d for r in rows for d in r["perplexity"]})
    tasks = sorted({t for r in rows for t in r.get("zero_shot", {})})
    rivals = {d: best_other_at_most_bits(rows, d) for d in datasets}
    head = ["model", "nominal b", "bits (decoder linears)", "bits pay for", "bits (whole model)", "mean rel. error",
            "phase-1 data"]
    for d in datasets:
        head += [f"ppl {d}", f"× original ({d})", f"best other ≤ bits ({d})"]
    head += [f"acc {t}" for t in tasks]
    head.append("compress time (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, r in enumerate(rows):
        b = r["bits"]

        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)

        cells = [r["label"], f(b.get("nominal"), "{}"), f(b.get("decoder_linears")),
                 format_breakdown(bits_breakdown(r["matrices"])), f(b.get("whole_model")), f(r["rel_error"], "{:.4f}"),
                 calibration_label(r.get("calibration"))]
        for d in datasets:
            v = r["perplexity"].get(d, {}).get("value")
            ref = base["perplexity"].get(d, {}).get("value") if base else None
            rival = rivals[d][i]
            cells += [f(v, "{:.3f}"), f(v / ref if v and ref else None, "{:.3f}"),
                      "-" if rival is None else f"{rival['label']} {rival['perplexity'][d]['value']:.3f} "
                                                f"({rival['bits']['decoder_linears']:.3f} bits)"]
        cells += [f(r.get("zero_shot", {}).get(t, {}).get("acc"), "{:.4f}") for t in tasks]
        cells.append(f(r["time_s"], "{:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def _safe(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "run"


def write_figures(rows: list[dict[str, Any]], out: str | Path, heatmap_layer: str | None = None,
                  max_heatmaps: int = 8) -> list[Path]:
    """The report's figures (see the module docstring) into `out`; returns their paths."""
    from reallm.run import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    series = {r["label"]: r["matrices"] for r in rows if r["matrices"]}
    if series and (p := plots.plot_error_by_block(series, out / "error_by_block.png")):
        written.append(p)
    base = next((r for r in rows if r["is_base"]), None)
    for d in sorted({d for r in rows for d in r["perplexity"]}):
        pts = [{"label": r["label"], "bits": r["bits"].get("decoder_linears"), "nominal": r["bits"].get("nominal"),
                "ppl": r["perplexity"].get(d, {}).get("value")} for r in rows if not r["is_base"]]
        ref = base["perplexity"].get(d, {}).get("value") if base else None
        if p := plots.plot_pareto(pts, out / f"pareto_{_safe(d)}.png", dataset=d, reference=ref):
            written.append(p)
    pts = [{"label": r["label"], "bits": r["bits"].get("decoder_linears"), "nominal": r["bits"].get("nominal"),
            "ppl": r["rel_error"]} for r in rows if r["rel_error"] is not None]
    if p := plots.plot_pareto(pts, out / "pareto_error.png", ylabel="mean ‖W − Ŵ‖ / ‖W‖ over the matrices",
                              title="bits / reconstruction error"):
        written.append(p)
    written += _heatmaps(rows, out, heatmap_layer, max_heatmaps)
    return written


def _heatmaps(rows: list[dict[str, Any]], out: Path, layer: str | None, limit: int) -> list[Path]:
    from reallm.run import plots

    written = []
    for r in [r for r in rows if r["checkpoint_dir"] and r["matrices"]][:limit]:
        name = layer or r["matrices"][0]["name"]
        try:
            lay = load_layer(r["checkpoint_dir"], name)
        except CheckpointError as e:
            print(f"warning: no heat map for {r['label']}: {e}", file=sys.stderr)
            continue
        W = read_weight(r["model"], name, lay.layout) if r.get("model") else None
        if W is None:
            print(f"warning: no heat map for {r['label']}: the base model {r.get('model')!r} cannot be read",
                  file=sys.stderr)
            continue
        low = lay.lowrank_product()
        written.append(plots.plot_weight_heatmaps(W, lay.dequantize(), out / f"heatmap_{_safe(r['label'])}.png",
                                                  lowrank=None if low is None else low.detach(),
                                                  name=f"{r['label']}: {name}"))
    return written


def write_report_md(rows: list[dict[str, Any]], figures: list[Path], out: Path) -> Path:
    lines = ["# ReALLM report", "", markdown_table(rows), ""]
    for f in figures:
        lines += [f"![{f.stem}]({f.name})", ""]
    lines += ["Runs: " + ", ".join(f"`{r['run_dir']}`" for r in rows), ""]
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories holding results.json")
    ap.add_argument("--baseline", help="the run the perplexity ratios refer to (default: the first base-model "
                                       "evaluation)")
    ap.add_argument("--figures", metavar="DIR", help="also write report.md and the figures into DIR")
    ap.add_argument("--heatmap", metavar="LAYER", help="the matrix of the heat maps (default: each run's first)")
    ap.add_argument("--max-heatmaps", type=int, default=8, help="heat maps of at most this many runs")
    args = ap.parse_args(argv)
    # a glob such as runs/sweep-x/* also picks up files (sweep.json) and the report folder itself
    run_dirs = [r for r in args.runs if not (len(args.runs) > 1 and (Path(r).is_file() or _is_aux_dir(Path(r))))]
    try:
        runs = [load_results(r) for r in run_dirs]
        rows = rows_from_runs(runs, args.baseline)
        print(markdown_table(rows))
        if args.figures:
            figures = write_figures(rows, args.figures, args.heatmap, args.max_heatmaps)
            md = write_report_md(rows, figures, Path(args.figures))
            print(f"\nwrote {md} and {len(figures)} figures in {args.figures}", file=sys.stderr)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


def _is_aux_dir(path: Path) -> bool:
    """A folder without results.json that a glob picks up: a report folder."""
    return path.is_dir() and not (path / "results.json").exists() and (
        (path / "report.md").is_file() or path.name == "report")


if __name__ == "__main__":
    raise SystemExit(main())
