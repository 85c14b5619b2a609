"""Phases 2 and 3 through the CLI on a tiny model (their YAMLs run in tests/test_configs.py): the model's
context, the fine-tuning presets, one-line errors, and the pipeline script."""

from __future__ import annotations

import importlib.util
import json
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

from reallm.checkpoint import load_compressed
from reallm.cli import cli_main

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
              "--model.init_args.compression.kmeans_iters", "3",
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


def test_pipeline_script_tiny(phase1, tmp_path, capsys):
    """The pipeline chains phases 1 → 2 → 3 with evaluations and prints one row per stage."""
    spec = importlib.util.spec_from_file_location("pipeline", ROOT / "benchmarks" / "pipeline.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    cache = ["--data.init_args.cache_dir", str(phase1.token_cache)]
    argv = ["--preset", "vq-2bit-ft", "--model", str(phase1.base), "--train", str(TRAIN_TEXT),
            "--eval", str(VALID_TEXT), "--seq-len", str(SEQ_LEN), "--runs", str(tmp_path / "runs"),
            "--calibration-sequences", "16", "--train-sequences", "16", "--batch-size", "4",
            "--max-eval-windows", "4", "--accelerator", "cpu",
            "--compress-args", "--model.init_args.compression.kmeans_iters 3",
            "--blockwise-args", " ".join(cache + ["--model.init_args.lr", "1e-3"]),
            "--e2e-args", " ".join(cache + ["--trainer.val_check_interval", "1.0"]),
            "--eval-args", " ".join(cache)]
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("| stage"):].strip().splitlines()
    assert [r.split("|")[1].strip() for r in table[2:]] == [
        "original (uncompressed)", "no fine-tuning (phase 1)", "block-wise (phase 2)", "end-to-end (phase 3)"]
    rows = json.loads((tmp_path / "runs" / "pipeline.json").read_text())["rows"]
    assert all(r["perplexity"]["tinystories_valid"] > 0 for r in rows)
    assert rows[1]["bits"]["decoder_linears"] == pytest.approx(rows[3]["bits"]["decoder_linears"])
    # a second call finds every stage complete and only prints the table again
    assert pipeline.main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert TOKENIZER.is_dir()
