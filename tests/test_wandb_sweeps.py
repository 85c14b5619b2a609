"""Weights & Biases wiring (offline) and the sweep files: the logger switch, what a run uploads,
every sweep's parameters accepted by the CLI exactly as `wandb agent` passes them, the offline
sweep runner."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_models import save_tiny_model_dir

from reallm.run.cli import cli_main
from reallm.run.sweep import SweepError, check_sweep, command_line, example_parameter_sets, load_sweep, program_args
from reallm.run.tracking import (
    WANDB_LOGGER,
    WandbSettings,
    flatten,
    logger_config,
    resolve_mode,
    summary_metrics,
    upload_run,
)

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
CPU = ["--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when pytest's argv is there too


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """No API key anywhere: W&B must go offline by itself."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for key in ("WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_SWEEP_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


# ------------------------------------------------------------------------------------------------
# the logger switch
# ------------------------------------------------------------------------------------------------
def test_logger_switch(no_wandb_key, monkeypatch, tmp_path):
    csv = logger_config("csv", WandbSettings(), tmp_path)
    assert csv["class_path"].endswith("CSVLogger") and csv["init_args"]["save_dir"] == str(tmp_path)
    assert logger_config("none", WandbSettings(), tmp_path) is False
    csv_first, wb = logger_config("wandb", WandbSettings(project="p", group="g", tags=["a"]), tmp_path / "r1", "fit")
    assert csv_first["class_path"].endswith("CSVLogger")  # Lightning's default folders stay where they were
    assert wb["class_path"] == WANDB_LOGGER
    assert wb["init_args"] == {"project": "p", "name": "r1", "save_dir": str(tmp_path / "r1"), "mode": "offline",
                               "job_type": "fit", "group": "g", "tags": ["a"]}
    assert resolve_mode("auto") == "offline"  # no key: offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert logger_config("wandb", WandbSettings(), tmp_path)["class_path"].endswith("CSVLogger")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "online"  # `wandb login` wrote ~/.netrc
    assert resolve_mode("offline") == "offline"


def test_summary_metrics_flattens_results():
    res = {"phase": "eval", "seed": 0, "time_s": 2.0, "bits": {"nominal": 3, "decoder_linears": 3.1},
           "perplexity": {"wiki": {"value": 6.5, "context": 2048}}, "mean_rel_frobenius_error": 0.2,
           "zero_shot": {"tasks": {"piqa": {"acc": 0.7}}, "mean_acc": 0.7}, "loss_after": [1.0, 3.0],
           "config": {"model": {"init_args": {"lr": 1.0}}}, "complete": True}
    assert summary_metrics(res) == {"bits/nominal": 3.0, "bits/decoder_linears": 3.1, "perplexity/wiki": 6.5,
                                    "zero_shot/piqa": 0.7, "zero_shot/mean_acc": 0.7, "time_s": 2.0,
                                    "mean_rel_frobenius_error": 0.2, "loss_after/mean": 2.0, "loss_after/last": 3.0}


class _FakeRun:
    """Records what upload_run sends (the real W&B objects are built)."""

    def __init__(self, root: Path) -> None:
        self.dir, self.id = str(root / "files"), "abc123"
        self.summary, self.logged, self.artifacts = {}, [], []

    def log(self, payload):
        self.logged.append(payload)

    def log_artifact(self, art):
        self.artifacts.append(art)


def test_upload_run_sends_summary_table_figures_files(tmp_path):
    import wandb

    from reallm.run.plots import plot_error_by_block

    run_dir = tmp_path / "run"
    matrices = [{"name": f"model.layers.{b}.self_attn.{t}", "shape": [64, 64], "bits": 3.1, "nominal": 3,
                 "rel_frobenius_error": 0.1 + 0.01 * b} for b in range(2) for t in ("q_proj", "k_proj")]
    results = {"phase": "compress", "method": "nf3", "bits": {"decoder_linears": 3.1}, "matrices": matrices,
               "mean_rel_frobenius_error": 0.105}
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "config.yaml").write_text("model: {}\n")
    fig = plot_error_by_block({"nf3": matrices}, run_dir / "figures" / "error_by_block.png")
    run = _FakeRun(tmp_path)
    upload_run(run, run_dir, results, [fig])
    assert run.summary["bits/decoder_linears"] == 3.1 and run.summary["mean_rel_frobenius_error"] == 0.105
    (payload,) = run.logged
    table = payload["tables/matrices"]
    assert isinstance(table, wandb.Table) and len(table.data) == 4
    assert table.columns[:3] == ["name", "block", "type"] and table.data[2][1:3] == [1, "q_proj"]
    assert isinstance(payload["figures/error_by_block"], wandb.Image)
    for name in ("results.json", "config.yaml", "figures/error_by_block.png"):
        assert (Path(run.dir) / "reallm" / name).is_file()  # uploaded with the run (or by `wandb sync`)
    (art,) = run.artifacts
    assert art.type == "results" and {"results.json", "config.yaml", "figures/error_by_block.png"} <= set(
        art.manifest.entries)


def test_wandb_offline_run_end_to_end(tiny_dir, tmp_path, no_wandb_key):
    """`--logger wandb` without a key: an offline W&B run beside the CSV file, holding the resolved
    config, the summary numbers, the per-matrix table, the figures, results.json and config.yaml."""
    import wandb

    run_dir = tmp_path / "run"
    cli_main(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(ROOT / "configs/methods/nf3.yaml"),
              "--model.init_args.model_name_or_path", str(tiny_dir), *CPU, "--run_dir", str(run_dir),
              "--logger", "wandb", "--wandb.project", "reallm-test", "--wandb.tags", "[ci]"])
    assert wandb.run is None  # the run was finished
    assert (run_dir / "logs" / "metrics.csv").is_file()  # the CSV logger is kept
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    files = offline / "files"
    assert json.loads((files / "reallm" / "results.json").read_text())["phase"] == "compress"
    assert (files / "reallm" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    images = {p.name.split("_")[0] for p in (files / "media" / "images" / "figures").glob("*.png")}
    assert images >= {"error", "heatmap"}
    (table,) = (files / "media" / "table" / "tables").glob("matrices*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 14
    keys = (b"model.init_args.compression.bits", b"bits/decoder_linears", b"mean_rel_frobenius_error")
    record_file = next(offline.glob("*.wandb"))
    for _ in range(60):  # W&B's service process may still be writing the record (seen on a loaded machine)
        record = record_file.read_bytes()
        if all(k in record for k in keys):
            break
        time.sleep(0.5)
    for key in keys:
        assert key in record, key  # resolved config and summary are in the run's record
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["logger"] == "wandb" and cfg["trainer"]["logger"][1]["init_args"]["mode"] == "offline"


def test_logger_none_writes_no_logs(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    cli_main(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(ROOT / "configs/methods/rtn3.yaml"),
              "--model.init_args.model_name_or_path", str(tiny_dir), *CPU, "--run_dir", str(run_dir),
              "--logger", "none", "--trainer.fast_dev_run", "true", "--artifacts.figures", "false"])
    assert (run_dir / "results.json").is_file()
    assert not (run_dir / "logs").exists() and not (run_dir / "figures").exists()


# ------------------------------------------------------------------------------------------------
# sweeps
# ------------------------------------------------------------------------------------------------
def test_there_is_a_sweep_for_each_topic():
    names = {p.stem for p in SWEEPS}
    assert {"autoencoder-shape", "bits-rank", "blockwise-lr", "e2e-lr"} <= names
    params = {p.stem: set(load_sweep(p)["parameters"]) for p in SWEEPS}
    assert {"model.init_args.compression.bits", "model.init_args.compression.rank"} <= params["bits-rank"]
    assert "model.init_args.lr" in params["e2e-lr"] and "model.init_args.lr" in params["blockwise-lr"]
    ae = params["autoencoder-shape"]
    for key in ("latent_channels", "n_stages", "decoder_params", "weight_bits"):
        assert f"model.init_args.compression.options.{key}" in ae
    assert "model.init_args.schedule.lr" in ae


def _dotted(d, key):
    for part in key.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_are_accepted_by_the_cli(sweep, monkeypatch):
    """Each sweep's command, built as `wandb agent` builds it (`${env} ${interpreter} ${program}
    ${args}` → `--key=value`), parses; every parameter lands at its key with its value, and the
    compression config it gives is valid."""
    from reallm.weight.config import CompressionConfig

    monkeypatch.chdir(ROOT)  # sweep paths are relative to the repository root
    cfg = load_sweep(sweep)
    assert cfg["program"] == "train.py"
    for params in example_parameter_sets(cfg):
        cmd = command_line(cfg, params)
        assert cmd[:3] == ["/usr/bin/env", "python", "train.py"] and cmd[3] in ("fit", "validate")
        assert all(f"--{k}={v}" in cmd for k, v in params.items())
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            cli_main([*program_args(cfg, params), "--print_config"])
        assert exit_info.value.code in (0, None), out.getvalue()
        printed = yaml.safe_load(out.getvalue())
        for key, value in params.items():
            got = _dotted(printed, key)
            assert got == pytest.approx(value), (key, got, value)
        # a null given as a dict entry (`--x.dict.key=null`) arrives as the string "None"
        nones = [k for k, v in flatten(printed).items() if v == "None"]
        assert not nones, f"{sweep.name}: the string 'None' at {nones}"
        comp = printed["model"]["init_args"].get("compression")
        if comp:
            config = CompressionConfig(**comp)  # validates
            if config.quantizer == "autoencoder":
                from reallm.formats.autoencoder.codec import ae_spec

                spec = ae_spec(config)  # the autoencoder options are real and consistent
                assert spec.decoder_params_count() > 0  # the decoder width can be solved


def test_a_wrong_parameter_name_is_caught(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_sweep(ROOT / "configs/sweeps/bits-rank.yaml")
    bad = {"model.init_args.compression.bitz": 3}
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        cli_main([*program_args(cfg, bad), "--print_config"])
    assert exit_info.value.code == 2


def test_sweep_checks():
    good = {"program": "train.py", "method": "grid", "metric": {"name": "m", "goal": "minimize"},
            "parameters": {"a": {"values": [1, 2]}}, "command": ["${env}", "${interpreter}", "${program}", "${args}"]}
    assert check_sweep(good) == []
    assert "command has no ${args}" in check_sweep({**good, "command": ["python", "train.py"]})[0]
    assert "method" in check_sweep({**good, "method": "hyperband"})[0]
    assert "grid search needs values" in check_sweep({**good, "parameters": {"a": {"min": 0, "max": 1}}})[0]
    assert check_sweep({**good, "method": "random", "parameters": {"a": {"min": 1, "max": 0}}})


def test_bad_sweep_file_is_one_line(tmp_path, capsys):
    from reallm.run.sweep import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("program: train.py\nmethod: grid\nparameters: {a: {min: 0, max: 1}}\n")
    assert main([str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "bad.yaml" in err[0]
    with pytest.raises(SweepError, match="needs --count"):
        from reallm.run.sweep import parameter_sets

        parameter_sets({**yaml.safe_load(bad.read_text()), "method": "random"})


def test_offline_sweep_runner(tiny_dir, tmp_path, monkeypatch, no_wandb_key):
    """`python -m reallm.run.sweep` runs the command `wandb agent` would run, offline, one folder per run.
    (The runs are executed in-process here, with the environment the runner gives them.)"""
    import reallm.run.sweep as sweep_mod

    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tiny", "program": str(ROOT / "train.py"), "method": "grid",
        "metric": {"name": "mean_rel_frobenius_error", "goal": "minimize"},
        "parameters": {"model.init_args.compression.bits": {"values": [3]},
                       "data.init_args.layers": {"value": "layers\\.0\\.self_attn"}},
        "command": ["${env}", "${interpreter}", "${program}", "fit", f"--config={ROOT / 'configs/ae.yaml'}",
                    f"--config={ROOT / 'configs/methods/rtn3.yaml'}",
                    f"--model.init_args.model_name_or_path={tiny_dir}", "--trainer.accelerator=cpu",
                    "--logger=wandb", "${args}"]}))
    launched = []

    def run_in_process(cmd, env):  # replaces reallm.run.sweep._launch (only the sweep's runs go through it)
        assert cmd[:3] == ["/usr/bin/env", sys.executable, str(ROOT / "train.py")]
        for key in ("WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_MODE"):
            monkeypatch.setenv(key, env[key])
        launched.append(cmd)
        try:
            cli_main(cmd[3:])
        except SystemExit as e:
            return e.code or 0
        return 0

    monkeypatch.setattr(sweep_mod, "_launch", run_in_process)
    monkeypatch.chdir(tmp_path)
    (rec,) = sweep_mod.run_sweep(sweep)
    assert rec["returncode"] == 0 and len(launched) == 1
    assert "--model.init_args.compression.bits=3" in launched[0]
    run_dir = tmp_path / rec["run_dir"]
    assert run_dir.parent.name == "sweep-tiny" and run_dir.name == rec["run_id"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["model"]["init_args"]["compression"]["bits"] == 3 and results["compressed_matrices"] == 4
    assert rec["metric"] == pytest.approx(results["mean_rel_frobenius_error"])
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{rec['run_id']}")  # the W&B run id is the run's
    assert (offline / "files" / "output.log").is_file() and list(offline.glob("*.wandb"))
    summary = json.loads((tmp_path / "runs" / "sweep-tiny" / "sweep.json").read_text())
    assert summary["runs"][0]["run_id"] == rec["run_id"]


def test_readme_shows_sweep_usage():
    readme = (ROOT / "README.md").read_text()
    assert "wandb sweep configs/sweeps/" in readme and "wandb agent" in readme
    assert "python -m reallm.run.sweep" in readme


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
