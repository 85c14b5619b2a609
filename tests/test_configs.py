"""Every shipped config runs: each top-level configs/*.yaml on its own, and each method preset composed with
configs/ae.yaml, through the CLI (in process) with --trainer.fast_dev_run on a tiny model.

What a config needs comes from the phase contract of the class it names: a phase that starts from a
checkpoint is given a phase-1 checkpoint made once in a fixture, a phase that starts from the base model the
tiny model's directory; a text datamodule reads a local text file of the tiny tokenizer's words.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import save_tiny_model_dir, word_tokenizer, write_text

from reallm import CompressionConfig, compress_, load_compressed, save_compressed
from reallm.core.hf_models import load_hf_model
from reallm.run.cli import cli_main, phase_class

ROOT = Path(__file__).resolve().parents[1]
TOP = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
METHODS = sorted(f"methods/{p.name}" for p in (ROOT / "configs" / "methods").glob("*.yaml"))
SUBCOMMAND = {"eval.yaml": "validate"}  # every other config is a fit
CPU = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--artifacts.figures", "false"]
SEQ_LEN = 32
# the ReALLM presets' candidates and networks as shipped, their k-means made short
FAST_AE = "model:\n  init_args:\n    compression: {kmeans_iters: 3}\n    schedule: {kmeans_iters: 3}\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # tiny matrices: one thread is faster and robust to a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny base model directory, a phase-1 checkpoint of it (NF3 with rank-1 DoRA adapters, so that
    phases 2 and 3 have something to train), a text file and a token cache."""
    root = tmp_path_factory.mktemp("configs")
    base = save_tiny_model_dir(root / "base")
    model = load_hf_model(str(base), "float32")
    compress_(model, CompressionConfig(quantizer="nf", bits=3, rank=1), progress=False)
    save_compressed(model, root / "phase1", base_model=str(base), tokenizer=word_tokenizer())
    (root / "fast_ae.yaml").write_text(FAST_AE)
    return {"base": base, "checkpoint": root / "phase1", "text": write_text(root / "words.txt"),
            "cache": root / "tokens", "fast_ae": root / "fast_ae.yaml"}


def _class_paths(configs: list[Path]) -> tuple[str, str]:
    """(model class_path, data class_path) after composing the configs (the last one that sets it wins)."""
    model = data = None
    for path in configs:
        cfg = yaml.safe_load(path.read_text()) or {}
        model = (cfg.get("model") or {}).get("class_path", model)
        data = (cfg.get("data") or {}).get("class_path", data)
    return model, data


@pytest.mark.parametrize("config", TOP + METHODS)
def test_every_config_runs_one_fast_step(config, setup, tmp_path):
    configs = [ROOT / "configs" / "ae.yaml"] if config.startswith("methods/") else []
    configs.append(ROOT / "configs" / config)
    if Path(config).stem.startswith("reallm"):
        configs.append(setup["fast_ae"])
    model_path, data_path = _class_paths(configs)
    phase = phase_class(model_path)
    args = [SUBCOMMAND.get(config, "fit")] + [a for c in configs for a in ("--config", str(c))]
    if phase.starts_from == "checkpoint":
        args += ["--model.init_args.checkpoint", str(setup["checkpoint"])]
    else:
        args += ["--model.init_args.model_name_or_path", str(setup["base"])]
    if data_path.endswith("TextDataModule"):
        args += ["--data.init_args.path", str(setup["text"]), "--data.init_args.seq_len", str(SEQ_LEN),
                 "--data.init_args.max_eval_windows", "2", "--data.init_args.cache_dir", str(setup["cache"])]
        if args[0] == "fit":
            args += ["--data.init_args.train_path", str(setup["text"]), "--data.init_args.train_sequences", "8",
                     "--data.init_args.batch_size", "4"]
    run = tmp_path / "run"
    cli_main([*args, *CPU, "--trainer.fast_dev_run", "true", "--run_dir", str(run)])

    results = json.loads((run / "results.json").read_text())
    assert results["phase"] == phase.phase
    assert (run / "config.yaml").is_file()
    if config.startswith("methods/"):  # fast_dev_run: one matrix; the autoencoder phase makes all 14 in one step
        assert results["method"] == Path(config).stem
        assert results["compressed_matrices"] == (14 if phase.__name__ == "AutoencoderPhase" else 1)
        assert results["complete"] is (phase.__name__ == "AutoencoderPhase")
    if results["phase"] == "eval":
        assert results["perplexity"]["words"]["context"] == SEQ_LEN and results["perplexity"]["words"]["value"] > 1
    else:  # a fit leaves a loadable checkpoint, even from a shortened run
        load_compressed(run / "reallm")
    if "adaptive" in results:
        assert results["adaptive"]["bits_per_weight"] <= results["adaptive"]["budget_bits_per_weight"] + 1e-9
