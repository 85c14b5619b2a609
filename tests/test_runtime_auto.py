"""The "auto" runtime mode (reallm/layer/auto_runtime.py): one decision per model, at its first forward.

With room the compressed linears are cached and compute exactly what "cache" mode computes; with no room they
stay resident and compute exactly what "resident" mode computes; in between, layers are cached in model order
while they fit. The decision is recorded in `runtime_report` / results.json, is dropped when the model moves, and
the evaluation phase uses "auto" by default (after Lightning has put the model on its device).
"""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import reallm.layer.auto_runtime as auto_runtime
from reallm import CompressionConfig, compress_, load_compressed, save_compressed
from reallm.core.errors import UserError
from reallm.layer.linear import RuntimeMode, iter_reallm_layers, runtime_report, set_runtime_mode
from reallm.phases import BlockwisePhase, EndToEndPhase, EvaluatePhase
from tests.tiny_models import VOCAB, tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = dict(quantizer="nf", bits=3, rank=2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama (14 compressed linears) compressed to NF3 + rank-2 adapters, saved."""
    model = tiny_llama()
    compress_(model, CompressionConfig(**CONFIG), progress=False)
    path = tmp_path_factory.mktemp("auto") / "reallm"
    save_compressed(model, path)
    return path


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, L)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (B, L, V)


def dense_bytes(model, itemsize: int = 4) -> list[int]:
    """p·q·itemsize of every compressed linear, in model order."""
    return [layer.out_features * layer.in_features * itemsize for _, layer in iter_reallm_layers(model)]


def test_auto_with_room_caches_every_layer_and_equals_cache_mode(checkpoint, ids):
    cached = load_compressed(checkpoint, mode="cache")
    model = load_compressed(checkpoint, mode="auto", memory_fraction=1.0)
    assert runtime_report(model)["auto"]["decided"] is False  # nothing decided (nor decoded) before a forward
    torch.testing.assert_close(logits(model, ids), logits(cached, ids), rtol=0, atol=0)
    rec = runtime_report(model)["auto"]
    sizes = dense_bytes(model)
    assert rec["decided"] and rec["chosen"] == "cache" and rec["memory_fraction"] == 1.0
    assert rec["layers"] == rec["cached_layers"] == len(sizes) == 14
    assert rec["dense_bytes"] == rec["cached_bytes"] == sum(sizes) and rec["dtype"] == "float32"
    assert rec["free_bytes"] > 0 and rec["budget_bytes"] == rec["free_bytes"]
    assert list(rec["devices"]) == ["cpu"]
    assert all(layer.effective_mode == "cache" and layer._cache is not None for _, layer in iter_reallm_layers(model))


def test_auto_without_room_stays_resident_and_equals_resident_mode(checkpoint, ids, monkeypatch):
    monkeypatch.setattr(auto_runtime, "free_memory", lambda device: 1000)  # 1 kB free: nothing fits
    resident = load_compressed(checkpoint, mode="resident")
    model = load_compressed(checkpoint, mode="auto")
    torch.testing.assert_close(logits(model, ids), logits(resident, ids), rtol=0, atol=0)
    rec = runtime_report(model)["auto"]
    assert rec["chosen"] == "resident" and rec["cached_layers"] == 0 and rec["cached_bytes"] == 0
    assert rec["free_bytes"] == 1000 and rec["budget_bytes"] == 500 and rec["memory_fraction"] == 0.5
    assert rec["dense_bytes"] == sum(dense_bytes(model))
    assert all(layer.effective_mode == "resident" and layer._cache is None for _, layer in iter_reallm_layers(model))


def test_a_tiny_share_stays_resident(checkpoint, ids):
    model = load_compressed(checkpoint, mode="auto", memory_fraction=1e-15)  # of some GB: under one byte
    logits(model, ids)
    assert runtime_report(model)["auto"]["chosen"] == "resident"


def test_layers_are_cached_in_model_order_while_they_fit(checkpoint, ids, monkeypatch):
    model = load_compressed(checkpoint, mode="auto")
    sizes = dense_bytes(model)
    monkeypatch.setattr(auto_runtime, "free_memory", lambda device: 2 * sum(sizes[:3]))  # share 0.5: 3 layers
    logits(model, ids)
    modes = [layer.effective_mode for _, layer in iter_reallm_layers(model)]
    assert modes == ["cache"] * 3 + ["resident"] * (len(sizes) - 3)
    rec = runtime_report(model)["auto"]
    assert rec["chosen"] == "partial" and rec["cached_layers"] == 3 and rec["cached_bytes"] == sum(sizes[:3])


def test_the_decision_is_made_again_after_a_move(checkpoint, ids, monkeypatch):
    calls = []
    measure = auto_runtime.free_memory
    monkeypatch.setattr(auto_runtime, "free_memory", lambda device: calls.append(device) or measure(device))
    model = load_compressed(checkpoint, mode="auto")
    logits(model, ids)
    logits(model, ids)
    assert calls == [torch.device("cpu")]  # once for the whole model, not per layer or per forward
    model.to("cpu")  # what Lightning does after configure_model: the device may have changed
    assert runtime_report(model)["auto"]["decided"] is False
    assert all(layer._cache is None for _, layer in iter_reallm_layers(model))
    logits(model, ids)
    assert len(calls) == 2 and runtime_report(model)["auto"]["chosen"] == "cache"


def test_a_checkpoint_saved_with_runtime_mode_auto_loads_as_one_decision(checkpoint, ids, tmp_path):
    """`from_pretrained` honours `quantization_config.runtime_mode: auto` with one decision for the model."""
    import shutil

    from transformers import AutoModelForCausalLM

    from reallm.checkpoint.format2 import reseal_config

    path = shutil.copytree(checkpoint, tmp_path / "auto")
    reseal_config(path, lambda config: config["quantization_config"].update(runtime_mode="auto"))
    model = AutoModelForCausalLM.from_pretrained(path)
    logits(model, ids)
    report = runtime_report(model)
    assert report["mode"] == "auto" and isinstance(report["auto"], dict)  # one shared decision, not 14
    assert report["auto"]["chosen"] == "cache" and report["auto"]["cached_layers"] == 14


def test_set_runtime_mode_switches_into_and_out_of_auto(checkpoint, ids):
    model = load_compressed(checkpoint)
    report = set_runtime_mode(model, "auto", memory_fraction=0.25)
    assert report["mode"] == "auto" and report["auto"]["memory_fraction"] == 0.25
    logits(model, ids)
    layers = [layer for _, layer in iter_reallm_layers(model)]
    assert len({id(layer._auto) for layer in layers}) == 1  # one decision shared by all the layers
    report = set_runtime_mode(model, "resident")
    assert report["mode"] == "resident" and "auto" not in report
    assert all(layer._auto is None and layer._cache is None for layer in layers)


def test_unknown_mode_and_bad_share_are_one_line(checkpoint):
    model = load_compressed(checkpoint)
    expected = r"^runtime mode must be one of \('resident', 'cache', 'auto'\), got 'fast'$"
    with pytest.raises(UserError, match=expected):
        set_runtime_mode(model, "fast")
    with pytest.raises(UserError, match=expected):
        load_compressed(checkpoint, mode="fast")
    with pytest.raises(UserError, match=expected):
        EvaluatePhase(checkpoint=str(checkpoint), runtime="fast")
    for bad in (0, 1.5, -0.1):
        with pytest.raises(UserError, match=r"^runtime_memory_fraction must be a number in \(0, 1\], got "):
            load_compressed(checkpoint, mode="auto", memory_fraction=bad)
    with pytest.raises(UserError, match="runtime_memory_fraction"):
        EvaluatePhase(checkpoint=str(checkpoint), runtime_memory_fraction=2.0)


def test_phase_defaults_auto_for_evaluation_resident_for_training():
    assert "auto" in typing.get_args(RuntimeMode)  # the CLI (jsonargparse) accepts it for every phase
    assert inspect.signature(EvaluatePhase.__init__).parameters["runtime"].default == "auto"
    for phase in (BlockwisePhase, EndToEndPhase):
        params = inspect.signature(phase.__init__).parameters
        assert params["runtime"].default == "resident"
        assert params["runtime_memory_fraction"].default == auto_runtime.AUTO_MEMORY_FRACTION
        assert phase(checkpoint="unused", runtime="auto", runtime_memory_fraction=0.3).runtime_memory_fraction == 0.3


class RandomWindows(L.LightningDataModule):
    """What EvaluatePhase needs of a datamodule: named evaluation sets of token windows (B, L)."""

    dataset_names = ["random"]
    seq_len = 16

    def val_dataloader(self):
        windows = torch.randint(0, VOCAB, (4, self.seq_len), generator=torch.Generator().manual_seed(1))
        return DataLoader(windows, batch_size=2)


def run_validate(checkpoint, run_dir, **phase_args) -> dict:
    phase = EvaluatePhase(checkpoint=str(checkpoint), run_dir=str(run_dir), **phase_args)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir))
    trainer.validate(phase, datamodule=RandomWindows())
    return json.loads((run_dir / "results.json").read_text())


def test_evaluation_records_the_auto_decision_in_results_json(checkpoint, tmp_path, monkeypatch):
    calls = []
    measure = auto_runtime.free_memory
    monkeypatch.setattr(auto_runtime, "free_memory", lambda device: calls.append(device) or measure(device))
    res = run_validate(checkpoint, tmp_path / "auto")  # the default runtime
    rec = res["runtime"]["auto"]
    assert res["runtime"]["mode"] == "auto" and res["runtime"]["last_paths"] == ["cache"]
    assert rec["decided"] and rec["chosen"] == "cache" and rec["cached_layers"] == rec["layers"] == 14
    assert rec["memory_fraction"] == 0.5 and rec["free_bytes"] > 0
    assert rec["dense_bytes"] == rec["cached_bytes"] > 0
    assert len(calls) == 1  # decided once, after Lightning moved the model (the move drops a decision)

    small = run_validate(checkpoint, tmp_path / "small", runtime_memory_fraction=1e-15)["runtime"]
    assert small["auto"]["chosen"] == "resident" and small["auto"]["cached_layers"] == 0
    assert small["last_paths"] == ["decode"] and small["auto"]["memory_fraction"] == 1e-15


@pytest.mark.parametrize("config", ["eval.yaml", "blockwise.yaml", "e2e.yaml"])
def test_the_cli_accepts_auto_and_refuses_an_unknown_mode_in_one_line(config, checkpoint, tmp_path, capsys):
    from reallm.run.cli import cli_main

    args = ["--config", str(ROOT / "configs" / config), "--model.init_args.checkpoint", str(checkpoint),
            "--trainer.accelerator", "cpu", "--run_dir", str(tmp_path / "run")]
    cli = cli_main([*args, "--model.init_args.runtime", "auto", "--model.init_args.runtime_memory_fraction", "0.3"],
                   run=False)
    assert (cli.model.runtime, cli.model.runtime_memory_fraction) == ("auto", 0.3)
    with pytest.raises(SystemExit) as e:
        cli_main([*args, "--model.init_args.runtime", "fast"], run=False)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert "runtime" in err[-1] and "'resident', 'cache', 'auto'" in err[-1] and "fast" in err[-1]
    assert "Union subtypes" not in err[-1]  # the one error that matters, not jsonargparse's list
