"""Figures and reports: the plot functions, the figures a run writes into its directory, and
`python -m reallm.run.report ... --figures` over several runs (a compression run measured by
--eval_after_fit, a compression run evaluated separately, the base model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model_dir, write_text

from reallm.core.hf_models import decoder_block_index
from reallm.run import plots
from reallm.run.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.accelerator", "cpu"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _image(path: Path):
    """The PNG as an array, checked to be a real, non-blank figure."""
    import matplotlib.image as mpimg

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    assert float(img[..., :3].std()) > 0.05, "blank figure"
    return img


def test_names_and_front():
    assert decoder_block_index("model.layers.12.mlp.down_proj") == 12
    assert decoder_block_index("transformer.h.3.attn.c_attn") == 3
    assert decoder_block_index("lm_head") is None
    # with the blocks' prefix, the component after it (an integer earlier in the name does not count)
    assert decoder_block_index("model.7.layers.2.mlp.up_proj", "model.7.layers") == 2
    assert decoder_block_index("model.7.layers.2.mlp.up_proj") == 7
    assert plots.layer_type("model.layers.0.self_attn.q_proj") == "q_proj"
    pts = [(3.0, 10.0), (2.0, 40.0), (3.5, 11.0), (3.2, 9.0), (2.0, 50.0)]
    assert plots.pareto_front(pts) == [(2.0, 40.0), (3.0, 10.0), (3.2, 9.0)]


def test_plot_functions(tmp_path):
    torch.manual_seed(0)
    mats = [{"name": f"model.layers.{b}.{t}", "rel_frobenius_error": 0.1 * (1 + b) + 0.01 * i}
            for b in range(4) for i, t in enumerate(("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"))]
    p = plots.plot_error_by_block({"nf3": mats, "vq": [{**m, "rel_frobenius_error": m["rel_frobenius_error"] / 2}
                                                      for m in mats]}, tmp_path / "err.png")
    _image(p)
    assert plots.plot_error_by_block({"x": [{"name": "lm_head", "rel_frobenius_error": 0.1}]}, tmp_path / "n.png") \
        is None
    W = torch.randn(96, 640)
    L = torch.randn(96, 2) @ torch.randn(2, 640) * 0.1
    W_hat = W + 0.05 * torch.randn_like(W)
    img = _image(plots.plot_weight_heatmaps(W, W_hat, tmp_path / "heat.png", lowrank=L, name="m", crop=512))
    assert img.shape[1] > 3 * img.shape[0]  # four panels side by side
    pts = [{"label": "a", "bits": 2.1, "ppl": 40.0, "nominal": 2}, {"label": "b", "bits": 3.1, "ppl": 9.0},
           {"label": "c", "bits": 3.5, "ppl": 11.0}, {"label": "nan", "bits": float("nan"), "ppl": 1.0}]
    _image(plots.plot_pareto(pts, tmp_path / "pareto.png", dataset="wiki", reference=5.3))
    assert plots.plot_pareto([{"label": "x", "bits": None, "ppl": 3.0}], tmp_path / "none.png") is None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs through the CLI: nf3 with --eval_after_fit, nf3 at 4 bits + its evaluation, the base."""
    root = tmp_path_factory.mktemp("runs")
    tiny = save_tiny_model_dir(root / "tiny")
    text = write_text(root / "words.txt")
    cache = ["--data.init_args.cache_dir", str(root / "cache")]
    argv, sys.argv = sys.argv, ["train.py"]
    try:
        def compress(run, *extra):
            cli_main(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config",
                      str(ROOT / "configs/methods/nf3.yaml"), "--model.init_args.model_name_or_path", str(tiny), *CPU,
                      "--run_dir", str(root / run), *extra])

        def evaluate(run, *source):
            cli_main(["validate", "--config", str(ROOT / "configs/eval.yaml"), *source, "--data.init_args.path",
                      str(text), "--data.init_args.seq_len", "64", *cache, *CPU, "--run_dir", str(root / run)])

        compress("nf3", "--eval_after_fit.path", str(text), "--eval_after_fit.seq_len", "64",
                 "--eval_after_fit.cache_dir", str(root / "cache"))
        compress("nf4", "--model.init_args.compression.bits", "4",
                 "--artifacts.heatmap_layer", "model.layers.1.mlp.down_proj")
        evaluate("nf4-eval", "--model.init_args.checkpoint", str(root / "nf4" / "reallm"))
        evaluate("original", "--model.init_args.model_name_or_path", str(tiny))
    finally:
        sys.argv = argv
    return root


def test_runs_write_their_figures(runs):
    figs = sorted(p.name for p in (runs / "nf3" / "figures").glob("*.png"))
    assert figs == ["error_by_block.png", "heatmap_model.layers.0.self_attn.q_proj.png"]
    assert (runs / "nf4" / "figures" / "heatmap_model.layers.1.mlp.down_proj.png").is_file()
    for p in (runs / "nf3" / "figures").glob("*.png"):
        _image(p)
    assert not (runs / "original" / "figures").exists()  # nothing to draw for a base-model evaluation


def test_eval_after_fit_matches_the_evaluation_phase(runs):
    """--eval_after_fit measures what `validate` on the checkpoint measures."""
    after = json.loads((runs / "nf3" / "results.json").read_text())["perplexity"]["words"]
    assert after["context"] == 64 and after["tokens"] > 0
    evaluated = json.loads((runs / "nf4-eval" / "results.json").read_text())["perplexity"]["words"]
    assert after["tokens"] == evaluated["tokens"]  # same windows
    assert 1.0 < after["value"] < 1e4


def test_report_command_table_and_figures(runs, capsys):
    from reallm.run.report import main

    out = runs / "report"
    rc = main([str(runs / d) for d in ("original", "nf3", "nf4", "nf4-eval")] + ["--figures", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| model | nominal b |")
    rows = lines[2:]  # after the header and the separator
    labels = [line.split("|")[1].strip() for line in rows]
    # the two nf3 runs differ by their bits: that is what tells them apart
    assert labels == ["original", "nf3 bits=3", "nf3 bits=4"], labels
    by_label = dict(zip(labels, rows))
    assert "1.000" in by_label["original"] and by_label["nf3 bits=4"].count(" - ") == 0
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    cells = {lab: dict(zip(head, (c.strip() for c in row.split("|")[1:-1]))) for lab, row in by_label.items()}
    # what the bits pay for, and the fair comparison: the best other row at equal or fewer bits
    assert cells["nf3 bits=4"]["bits pay for"].startswith("codes 4.000 + scales 0.1")
    assert cells["nf3 bits=4"]["best other ≤ bits (words)"].startswith("nf3 bits=3 ")
    assert cells["nf3 bits=3"]["best other ≤ bits (words)"] == "-"  # nothing is cheaper
    assert cells["original"]["bits pay for"] == "-" and cells["original"]["best other ≤ bits (words)"] == "-"
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["error_by_block.png", "heatmap_nf3_bits=3.png", "heatmap_nf3_bits=4.png",
                     "pareto_error.png", "pareto_words.png"], names
    for p in out.glob("*.png"):
        _image(p)
    md = (out / "report.md").read_text()
    assert "| nf3 bits=4 |" in md and "![pareto_words](pareto_words.png)" in md


def _row(label, bits, ppl, matrices=()):
    return {"label": label, "bits": {"decoder_linears": bits} if bits is not None else {},
            "perplexity": {"t": {"value": ppl}}, "matrices": list(matrices)}


def test_best_other_at_most_bits():
    from reallm.run.report import best_other_at_most_bits

    rows = [_row("a", 2.1, 40.0), _row("b", 3.1, 9.0), _row("c", 3.5, 11.0), _row("d", 3.1, 8.5),
            _row("original", None, 5.0), _row("e", 2.0, float("nan"))]
    got = [None if r is None else r["label"] for r in best_other_at_most_bits(rows, "t")]
    # a: only e is cheaper, without a finite perplexity; b and d tie on bits (equal counts); c: d is best ≤ 3.5
    assert got == [None, "d", "d", "b", None, None]  # e: nothing at ≤ 2.0 bits
    assert best_other_at_most_bits(rows, "other text") == [None] * len(rows)


def test_bits_breakdown_per_weight_over_the_matrices():
    from reallm.run.report import bits_breakdown, format_breakdown

    mats = [{"shape": [2, 4], "items": {"codes": 16.0, "codebook": 8.0, "lowrank": 0.0}},
            {"shape": [4, 4], "items": {"codes": 32.0, "codebook": 8.0}}]
    items = bits_breakdown(mats)  # 24 weights: codes 48 bits, codebook 16 bits
    assert list(items) == ["codes", "codebook"] and items["codes"] == 2.0 and items["codebook"] == pytest.approx(2 / 3)
    assert format_breakdown(items) == "codes 2.000 + codebook 0.667"
    assert bits_breakdown(mats + [{"shape": [1, 1]}]) == {} and format_breakdown({}) == "-"


def test_report_errors_are_one_line(tmp_path, capsys):
    from reallm.run.report import main

    assert main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no results.json" in err[0]


def test_readme_shows_a_produced_figure():
    readme = (ROOT / "README.md").read_text()
    images = [line for line in readme.splitlines() if line.startswith("![")]
    assert images, "the README shows no figure"
    for line in images:
        rel = line[line.index("(") + 1:line.index(")")]
        _image(ROOT / rel)
