"""The phase contract (reallm.phases.base.ReALLMModule): every phase declares what it starts from and
which model it works on; the CLI checks a checkpoint only for phases that read one; the autoencoder phase
tells its datamodule the steps of an epoch."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from tiny_models import save_tiny_model_dir

import reallm.phases as phases
from reallm.data import PatchDataModule
from reallm.phases.base import ReALLMModule, StartsFrom
from reallm.run.cli import cli_main, phase_class

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.accelerator", "cpu"]
PHASES = sorted((c for c in vars(phases).values() if isinstance(c, type) and issubclass(c, ReALLMModule)
                 and c is not ReALLMModule), key=lambda c: c.__name__)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def test_every_phase_declares_its_start_and_its_model():
    assert [c.__name__ for c in PHASES] == ["AutoencoderPhase", "BlockwisePhase", "CompressPhase", "EndToEndPhase",
                                            "EvaluatePhase"]
    expected = {"AutoencoderPhase": "base_model", "CompressPhase": "base_model", "BlockwisePhase": "checkpoint",
                "EndToEndPhase": "checkpoint", "EvaluatePhase": "checkpoint"}
    for cls in PHASES:
        assert cls.starts_from in typing.get_args(StartsFrom) and cls.starts_from == expected[cls.__name__]
        assert cls.phase_model is not ReALLMModule.phase_model, f"{cls.__name__} does not implement phase_model"
        kwargs = {"checkpoint": "unused"} if cls.starts_from == "checkpoint" else {}
        assert cls(**kwargs).phase_model is None  # nothing loaded yet
    assert phase_class("reallm.phases.EvaluatePhase") is phases.EvaluatePhase


def test_evaluation_phase_model_is_the_evaluated_model(tiny_dir):
    phase = phases.EvaluatePhase(model_name_or_path=str(tiny_dir))
    phase.configure_model()
    assert phase.phase_model is phase.model and sum(p.numel() for p in phase.phase_model.parameters()) > 0


def test_checkpoint_is_checked_only_by_phases_that_read_one(tiny_dir, tmp_path, capsys):
    """Phase 1 starts from the base model: a --model.init_args.checkpoint it does not read is not opened
    (the run succeeds); the evaluation phase names a missing one before anything loads."""
    missing = str(tmp_path / "no_checkpoint")
    cli_main(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(ROOT / "configs/methods/nf3.yaml"),
              "--model.init_args.model_name_or_path", str(tiny_dir), "--model.init_args.checkpoint", missing,
              *CPU, "--trainer.fast_dev_run", "true", "--artifacts.figures", "false", "--run_dir", str(tmp_path / "c")])
    assert json.loads((tmp_path / "c" / "results.json").read_text())["phase"] == "compress"
    with pytest.raises(SystemExit):
        cli_main(["validate", "--config", str(ROOT / "configs/eval.yaml"), "--model.init_args.checkpoint", missing,
                  *CPU, "--run_dir", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no_checkpoint" in err[-1]


def test_patch_datamodule_yields_the_steps_it_is_told():
    dm = PatchDataModule()
    assert list(dm.train_dataloader()) == [0]  # before the phase says otherwise: one step
    dm.set_steps_per_epoch(5)
    loader = dm.train_dataloader()
    assert len(loader) == 5 and [int(s) for s in loader] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        dm.set_steps_per_epoch(0)


def test_autoencoder_phase_refuses_another_datamodule(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config",
                  str(ROOT / "configs/methods/reallm-3bit.yaml"), "--data", "reallm.data.WeightDataModule",
                  "--model.init_args.model_name_or_path", str(tiny_dir), *CPU, "--trainer.fast_dev_run", "true",
                  "--run_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "PatchDataModule" in err[-1]
