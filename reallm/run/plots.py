"""Figures of a run or of several runs (matplotlib, Agg backend: no display needed).

- `plot_error_by_block`: relative Frobenius error ‖W − Ŵ‖_F / ‖W‖_F of every matrix against its
  block index, one panel per layer type (q_proj, k_proj, ...), one line per method (paper Figure 3).
- `plot_weight_heatmaps`: a weight W, its residual R = W − L1 L2ᵀ (what the quantizer sees), its
  reconstruction Ŵ and the error W − Ŵ as heat maps (paper Figure 1).
- `plot_pareto`: accounted bits per weight against perplexity, one point per method, with the
  Pareto front (no other point has both fewer bits and a lower perplexity).

Each function writes one PNG and returns its path. `write_run_figures` writes the figures a single
run can make into `run_dir/figures/` (used by the CLI's `RunArtifacts` callback); the
`python -m reallm.run.report ... --figures DIR` command makes the cross-run ones.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402

from reallm.core.hf_models import decoder_block_index  # noqa: E402

FIGURE_DIR = "figures"
DPI = 120


def layer_type(name: str) -> str:
    """The layer's role inside its block: the last component of its name (`q_proj`, `down_proj`)."""
    return name.rsplit(".", 1)[-1]


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)  # a reader never sees a half-written figure
    return path


# ------------------------------------------------------------------------------------------------
# Figure 3: relative error against block index
# ------------------------------------------------------------------------------------------------
def plot_error_by_block(series: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike,
                        title: str | None = None) -> Path | None:
    """Per-matrix relative error against block index, one panel per layer type.

    Args:
        series: method label → its matrices (results.json's `matrices`: dicts with `name` and
            `rel_frobenius_error`).
        path: the PNG to write.
        title: figure title.
    Returns:
        the path, or None when no matrix has an error to plot.
    """
    points: dict[str, dict[str, list[tuple[int, float]]]] = {}  # type → method → [(block, err)]
    for method, matrices in series.items():
        for m in matrices:
            err, blk = m.get("rel_frobenius_error"), decoder_block_index(m["name"])
            if err is None or blk is None or not math.isfinite(err):
                continue
            points.setdefault(layer_type(m["name"]), {}).setdefault(method, []).append((blk, err))
    if not points:
        return None
    types = list(points)  # in model order (first appearance)
    ncols = min(4, len(types))
    nrows = math.ceil(len(types) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False, sharex=True)
    methods = list(series)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    markers = "osD^v<>ph*"
    for ax, t in zip(axes.flat, types):
        for i, method in enumerate(methods):
            pts = sorted(points[t].get(method, []))
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=markers[i % len(markers)], ms=4, lw=1.3, color=colors[method], label=method)
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[-1]:
        ax.set_xlabel("block index", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("‖W − Ŵ‖ / ‖W‖", fontsize=9)
    for ax in list(axes.flat)[len(types):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(labels) - 1) // 6)))
    fig.suptitle(title or "relative Frobenius error per matrix", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# Figure 1: heat maps of a weight, its residual and its reconstruction
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def plot_weight_heatmaps(W: torch.Tensor, W_hat: torch.Tensor, path: str | os.PathLike, *,
                         lowrank: torch.Tensor | None = None, name: str = "", crop: int | None = 512) -> Path:
    """Heat maps of W, of its residual W − L1 L2ᵀ (when a low-rank part is given), of the
    reconstruction Ŵ and of the error W − Ŵ.

    Args:
        W: the original weight (p, q).
        W_hat: its full reconstruction as the model uses it (p, q).
        lowrank: the low-rank part L1 L2ᵀ (p, q), if any.
        name: the matrix's name, for the title.
        crop: show only the top-left crop × crop corner (the paper's 512² patch) of large matrices.
    """
    W, W_hat = W.detach().float().cpu(), W_hat.detach().float().cpu()
    if W.shape != W_hat.shape:
        raise ValueError(f"W {tuple(W.shape)} and Ŵ {tuple(W_hat.shape)} differ in shape")
    rel = float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W).clamp_min(1e-30))
    panels = [("W", W)]
    if lowrank is not None:
        panels.append(("residual W − L₁L₂ᵀ", W - lowrank.detach().float().cpu()))
    panels += [("reconstruction Ŵ", W_hat), ("error W − Ŵ", W - W_hat)]
    p, q = W.shape
    rows, cols = (min(p, crop), min(q, crop)) if crop else (p, q)
    # one colour scale for W, R and Ŵ (robust: the 99.5th percentile of |W|), its own for the error
    sample = W.flatten()[:: max(1, W.numel() // 1_000_000)].abs()
    vmax = float(torch.quantile(sample, 0.995)) or 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels) + 0.6, 3.6), squeeze=False)
    for ax, (label, M) in zip(axes[0], panels):
        M = M[:rows, :cols]
        v = vmax if not label.startswith("error") else (float(torch.quantile(
            (W - W_hat).flatten()[:: max(1, W.numel() // 1_000_000)].abs(), 0.995)) or 1.0)
        im = ax.imshow(M.numpy(), cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest", aspect="auto")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("input (column)", fontsize=8)
        ax.set_ylabel("output (row)", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    shown = f" (top-left {rows}×{cols})" if (rows, cols) != (p, q) else ""
    fig.suptitle(f"{name} {p}×{q}{shown}: ‖W − Ŵ‖/‖W‖ = {rel:.4f}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# bits / perplexity Pareto front
# ------------------------------------------------------------------------------------------------
def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (bits, ppl) that no other point beats on both (fewer bits *and* lower ppl),
    sorted by bits."""
    front: list[tuple[float, float]] = []
    for b, v in sorted(points, key=lambda t: (t[0], t[1])):
        if not front or v < front[-1][1]:
            front.append((b, v))
    return front


def plot_pareto(points: Sequence[dict[str, Any]], path: str | os.PathLike, *, dataset: str = "",
                reference: float | None = None, xlabel: str = "accounted bits per weight (decoder linears)",
                ylabel: str | None = None, title: str = "bits / perplexity") -> Path | None:
    """Bits against perplexity, one point per run, the Pareto front drawn as a step line.

    Args:
        points: dicts with `label`, `bits` and `ppl` (and optionally `nominal`).
        path: the PNG to write.
        dataset: the evaluation text, for the axis label.
        reference: the uncompressed model's perplexity (dashed line).
        xlabel, ylabel, title: axis labels and title (ylabel default: "perplexity (<dataset>)").
    Returns:
        the path, or None when no point has both values.
    """
    pts = [p for p in points if p.get("bits") is not None and p.get("ppl") is not None
           and math.isfinite(p["bits"]) and math.isfinite(p["ppl"])]
    pts.sort(key=lambda p: (p["bits"], p["ppl"]))  # colours and legend in the order of the x axis
    if not pts:
        return None
    labels = [str(p["label"]) for p in pts]
    common = os.path.commonprefix(labels) if len(labels) > 1 else ""
    common = common[:common.rfind(" ") + 1] if " " in common else ""  # whole words only
    short = [lab[len(common):] or lab for lab in labels]
    many = len(pts) > 6  # a legend instead of labels next to the points
    fig, ax = plt.subplots(figsize=(8.6 if many else 6.4, 4.6))
    front = pareto_front((p["bits"], p["ppl"]) for p in pts)
    on_front = set(front)
    markers = "osD^v<>ph*"
    for i, (p, lab) in enumerate(zip(pts, short)):
        best = (p["bits"], p["ppl"]) in on_front
        if isinstance(p.get("nominal"), (int, float)) and "bits=" not in lab:
            lab = f"{lab} (b={p['nominal']:g})"
        ax.scatter(p["bits"], p["ppl"], s=52 if best else 34, color=plt.cm.tab10(i % 10), zorder=3,
                   marker=markers[(i // 10) % len(markers)], edgecolors="black" if best else "none",
                   linewidths=0.8, label=lab if many else None)
        if not many:
            ax.annotate(lab, (p["bits"], p["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(front) > 1:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="gray", lw=1.0, ls="-", zorder=2, label="Pareto front")
    if reference is not None:
        ax.axhline(reference, color="black", lw=0.9, ls="--", label=f"original ({reference:.3g})")
    values = [p["ppl"] for p in pts] + ([reference] if reference else [])
    if max(values) / max(min(values), 1e-12) > 8:
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    bits = [p["bits"] for p in pts]
    if min(bits) > 0 and max(bits) / min(bits) > 6:  # e.g. 2-bit rows beside fp16 or a 39-bit row: log2 axis
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel or f"perplexity{f' ({dataset})' if dataset else ''}", fontsize=9)
    ax.tick_params(labelsize=8, which="both")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        if many:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"{title}: {common.strip()}" if common else title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# figures of one run
# ------------------------------------------------------------------------------------------------
def heatmap_filename(name: str) -> str:
    return f"heatmap_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"


def write_run_figures(run_dir: str | os.PathLike, results: dict[str, Any],
                      weight: tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                      ) -> list[Path]:
    """The figures one run can make, into `run_dir/figures/`.

    Args:
        run_dir: the run directory.
        results: its results.json content.
        weight: optionally (name, W, Ŵ, L1 L2ᵀ or None) of one matrix for the heat maps.
    Returns:
        the written PNG paths.
    """
    out = Path(run_dir) / FIGURE_DIR
    written = []
    matrices = results.get("matrices") or []
    if matrices:
        label = results.get("method") or "run"
        path = plot_error_by_block({label: matrices}, out / "error_by_block.png",
                                   title=f"{label}: relative Frobenius error per matrix")
        if path:
            written.append(path)
    if weight is not None:
        name, W, W_hat, low = weight
        written.append(plot_weight_heatmaps(W, W_hat, out / heatmap_filename(name), lowrank=low, name=name))
    return written
