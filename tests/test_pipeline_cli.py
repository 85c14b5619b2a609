"""Phases 2 and 3 through the CLI on a tiny model (their YAMLs run in tests/test_configs.py): the model's
context, the fine-tuning presets, one-line errors, and the pipeline script."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from phase_helpers import (  # noqa: F401 (_one_thread is an autouse fixture)
    SEQ_LEN,
    TOKENIZER,
    TRAIN_TEXT,
    VALID_TEXT,
    _one_thread,
    data_args,
    make_phase1,
)

from reallm.checkpoint.compressed import load_compressed
from reallm.run.cli import cli_main

ROOT = Path(__file__).parents[1]
CPU = ["--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    return make_phase1(tmp_path_factory.mktemp("cli"))


def test_e2e_windows_default_to_the_model_context(phase1, tmp_path, capsys):
    """e2e.yaml trains and validates at the model's context (256 for this tiny model) by default, records
    it, and refuses a longer window with one line (defect 11.2)."""
    args = [a for a in data_args(phase1, sequences=4, eval_windows=2)]
    i = args.index("--data.init_args.seq_len")
    del args[i:i + 2]
    base = ["fit", "--config", str(ROOT / "configs" / "e2e.yaml"), "--model.init_args.checkpoint",
            str(phase1.checkpoint), *CPU, "--trainer.fast_dev_run", "true", *args]
    cli_main([*base, "--run_dir", str(tmp_path / "run")])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["perplexity"]["tinystories_valid"]["context"] == 256
    with pytest.raises(SystemExit):
        cli_main([*base, "--data.init_args.seq_len", "512", "--run_dir", str(tmp_path / "long")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "exceeds the context 256" in err[-1]


@pytest.mark.parametrize(("preset", "rank", "dora"), [("vq-2bit-ft", 2, False), ("vq-3bit-ft", 1, True)])
def test_fine_tuning_presets_compress(phase1, tmp_path, preset, rank, dora):
    """The presets made for phases 2-3 run phase 1 through the CLI and keep a trainable part."""
    cli_main(["fit", "--config", str(ROOT / "configs" / "ae.yaml"),
              "--config", str(ROOT / "configs" / "methods" / f"{preset}.yaml"),
              "--model.init_args.model_name_or_path", str(phase1.base),
              "--model.init_args.compression.options.kmeans_iters", "3",
              *CPU, "--run_dir", str(tmp_path / "run")])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["complete"] and res["method"] == preset
    model = load_compressed(tmp_path / "run" / "reallm")
    from reallm import iter_reallm_layers

    layers = list(iter_reallm_layers(model))
    assert layers and all(layer.rank == rank and (layer.magnitude is not None) == dora for _, layer in layers)
    assert all(layer.config.lowrank_dtype == "int8" for _, layer in layers)


def test_user_errors_are_one_line(phase1, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(ROOT / "configs" / "blockwise.yaml"), *CPU, "--run_dir", str(tmp_path / "x"),
                  *data_args(phase1)])
    assert e.value.code in (1, 2)  # 2 when jsonargparse reports the error raised at instantiation
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "checkpoint" in err[-1]


def _pipeline_module():
    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "benchmarks" / "pipeline.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    return pipeline


def _pipeline_argv(phase1, runs, *extra):
    return ["--model", str(phase1.base), "--train", str(TRAIN_TEXT), "--eval", str(VALID_TEXT),
            "--seq-len", str(SEQ_LEN), "--runs", str(runs), "--calibration-sequences", "16", "--train-sequences", "16",
            "--batch-size", "4", "--max-eval-windows", "4", "--accelerator", "cpu", "--token-cache",
            str(phase1.token_cache), "--compress-args", "--model.init_args.compression.options.kmeans_iters 3",
            "--blockwise-args", "--model.init_args.lr 1e-3", "--e2e-args", "--trainer.val_check_interval 1.0", *extra]


def _table(out: str, first: str) -> list[list[str]]:
    lines = out[out.index(first):].strip().splitlines()
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")][2:]


@pytest.fixture(scope="module")
def original_eval(phase1, tmp_path_factory):
    """The pipeline's evaluation of the uncompressed base model (`<runs>/original`), computed once for this module's
    pipeline runs (each copies it: a complete stage is not run again)."""
    runs = tmp_path_factory.mktemp("pipeline-original")
    args = _pipeline_module().parse_args(_pipeline_argv(phase1, runs, "--presets", "vq-3bit"))
    _pipeline_module().Runner(args).evaluate(None, runs / "original")
    return runs / "original"


def test_pipeline_script_tiny(phase1, original_eval, tmp_path, capsys):
    """The pipeline chains phases 1 → 2 → 3 with evaluations: one row per stage in its own table and in the summary,
    and a second call finds every stage complete."""
    pipeline = _pipeline_module()
    shutil.copytree(original_eval, tmp_path / "runs" / "original")
    argv = _pipeline_argv(phase1, tmp_path / "runs", "--presets", "vq-2bit-ft")
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    rows = _table(out, "| method")
    assert [r[:2] for r in rows] == [["original (uncompressed)", "-"], ["vq-2bit-ft", "phase 1"],
                                     ["vq-2bit-ft", "phase 2 (block-wise)"], ["vq-2bit-ft", "phase 3 (end-to-end)"]]
    assert rows[1][-1] == "0"  # the seeds of the row
    one = (tmp_path / "runs" / "vq-2bit-ft" / "seed0" / "table.md").read_text()
    assert [r[0] for r in _table(one, "| stage")] == ["phase 1", "phase 2 (block-wise)", "phase 3 (end-to-end)"]
    summary = json.loads((tmp_path / "runs" / "pipeline.json").read_text())["summary"]
    assert all(r["perplexity"]["tinystories_valid"][0] > 0 for r in summary)
    assert summary[0]["bits"][0] == pytest.approx(summary[2]["bits"][0])  # fine-tuning keeps the bits
    # a second call finds every stage complete and only prints the table again
    assert pipeline.main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert TOKENIZER.is_dir()


def test_pipeline_parallel_seeds_rank_zero_and_gptq(phase1, original_eval, tmp_path, capsys):
    """Two seeds of a rank-0 preset with `:gptq` (phase 1 calibration-aware with GPTQ's error feedback), in two
    processes: phase 1 only (said in the row), its own folder and row label, mean [min, max] over the seeds,
    results.json counting the matrices whose codes GPTQ chose; an unknown preset or suffix is refused before
    anything runs."""
    pipeline = _pipeline_module()
    runs = tmp_path / "runs"
    shutil.copytree(original_eval, runs / "original")  # the same base-model evaluation, computed once
    argv = _pipeline_argv(phase1, runs, "--presets", "vq-3bit:gptq", "--seeds", "0", "1", "--jobs", "2",
                          "--calibration-windows", "4")
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{runs / 'original'} already complete" in out
    rows = {(r[0], r[1]): r for r in _table(out, "| method")}
    note = "vq-3bit (calibrated, GPTQ) (rank 0: no low-rank part to fine-tune, phase 1 only)"
    assert set(rows) == {("original (uncompressed)", "-"), (note, "phase 1")}
    row = rows[(note, "phase 1")]
    assert row[-1] == "0,1" and "[" in row[6]  # the perplexity cell: mean [min, max]
    for seed in (0, 1):
        assert (runs / "vq-3bit-gptq" / f"seed{seed}" / "pipeline.log").is_file()
        res = json.loads((runs / "vq-3bit-gptq" / f"seed{seed}" / "compress" / "results.json").read_text())
        assert res["calibration"]["windows_used"] == 4 and res["seed"] == seed
        assert res["calibration"]["error_feedback_matrices"] == res["compressed_matrices"] > 0
        assert not (runs / "vq-3bit-gptq" / f"seed{seed}" / "blockwise").exists()
    with pytest.raises(SystemExit, match="no preset 'nope'"):
        pipeline.main(_pipeline_argv(phase1, runs, "--presets", "vq-3bit", "nope"))
    with pytest.raises(SystemExit, match="suffixes"):
        pipeline.main(_pipeline_argv(phase1, runs, "--presets", "vq-3bit:obq"))


def test_pipeline_calibration_suffixes_name_their_rows():
    """`:cal` (calibration-aware phase 1) and `:gptq` (with GPTQ's error feedback) label their rows and folders."""
    pipeline = _pipeline_module()
    plain, cal, gptq = (pipeline.resolve_preset(p) for p in ("vq-3bit", "vq-3bit:cal", "vq-3bit:gptq"))
    assert (plain.label, cal.label, gptq.label) == ("vq-3bit", "vq-3bit (calibrated)", "vq-3bit (calibrated, GPTQ)")
    assert not plain.calibrated and cal.calibrated and gptq.calibrated
    assert (plain.folder, cal.folder, gptq.folder) == ("vq-3bit", "vq-3bit-cal", "vq-3bit-gptq")
