"""Phase 3, end-to-end causal-LM fine-tuning of the DoRA parts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from phase_helpers import (  # noqa: F401 (_one_thread is an autouse fixture)
    _one_thread,
    adapters_of,
    data_args,
    frozen_state,
    make_phase1,
    text_datamodule,
    trainer,
)

from reallm.checkpoint.compressed import frozen_digests, load_compressed
from reallm.checkpoint.directory import read_meta
from reallm.core.schedules import cosine_warmup
from reallm.phases import BlockwisePhase, EndToEndPhase, UserError

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    return make_phase1(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
def phase2(phase1, tmp_path_factory):
    """A phase-2 (block-wise) checkpoint of the tiny model."""
    run_dir = tmp_path_factory.mktemp("e2e-bw")
    module = BlockwisePhase(checkpoint=str(phase1.checkpoint), run_dir=str(run_dir), lr=3e-3, effective_batch=8)
    trainer(run_dir, max_epochs=-1, limit_val_batches=0).fit(module, datamodule=text_datamodule(phase1))
    return run_dir / "reallm"


@pytest.mark.parametrize("total, warmup, floor", [(103, 3, 0.1), (40, 0, 0.0), (12, 11, 0.05), (1, 1, 0.0)])
def test_cosine_schedule_with_warmup(total, warmup, floor):
    """The one schedule (phase 3 and the autoencoder recipe) against torch's own schedulers: LinearLR from
    1/(W+1) to 1 over the W = min(warmup, total - 1) warm-up steps, then CosineAnnealingLR down to the floor
    at `total`; the floor after it."""
    f = cosine_warmup(total, warmup, min_ratio=floor)
    W = min(warmup, total - 1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - W, eta_min=floor)
    if W:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / (W + 1), end_factor=1.0, total_iters=W)
        ref = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[W])
    else:
        ref = cosine
    expected = []
    for _ in range(total + 1):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [f(s) for s in range(total + 1)] == pytest.approx(expected, abs=1e-9)
    assert all(f(s) == pytest.approx(floor) for s in range(total, total + 5))
    if total == 103:  # the hand values: warm-up 1/4, 2/4, 3/4, peak at step 3, half-way 0.55, floor 0.1
        assert [f(s) for s in (0, 1, 2, 3, 53, 103)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.55, 0.1])


def test_validation_loss_decreases_frozen_identical_and_phase2_loads(phase1, phase2, tmp_path):
    """Phase 3 from a phase-2 checkpoint: validation perplexity falls over a few steps, frozen tensors
    stay bit-identical, the adapters-only Lightning checkpoint resumes, the output evaluates."""
    dm = text_datamodule(phase1, source=phase2, eval_windows=8, seed=1)
    module = EndToEndPhase(checkpoint=str(phase2), run_dir=str(tmp_path / "run"), lr=3e-3, warmup_ratio=0.1)
    tr = trainer(tmp_path, max_steps=8, val_check_interval=4, enable_checkpointing=True)
    before = tr.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    frozen0 = frozen_state(module.model)
    tr.fit(module, datamodule=dm)
    hist = module.validation_history
    assert [h["step"] for h in hist[-2:]] == [4, 8]
    after = math.log(hist[-1]["tinystories_valid"])
    assert after < before - 1e-3, (before, hist)
    assert hist[-1]["tinystories_valid"] < hist[-2]["tinystories_valid"]
    for k, v in frozen_state(module.model).items():
        assert torch.equal(v, frozen0[k]), k

    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["phase"] == "e2e" and res["optimizer_steps"] == 8
    assert res["perplexity"]["tinystories_valid"]["value"] == pytest.approx(hist[-1]["tinystories_valid"])
    out = tmp_path / "run" / "reallm"
    meta = read_meta(out)  # complete on its own; its frozen part was checked equal to phase 2's when written
    assert meta["extra"]["frozen_from"]["checkpoint"] == str(Path(phase2).absolute())
    assert frozen_digests(out) == frozen_digests(phase2)
    # the saved adapters are the trained ones; the frozen part is phase 1's, untouched
    reloaded = load_compressed(out)
    for k, v in frozen_state(reloaded).items():
        assert torch.equal(v, frozen0[k]), k
    new = adapters_of(out)
    assert any(not torch.equal(new[k], adapters_of(phase2)[k]) for k in new)

    # the Lightning checkpoint holds only the trainable tensors, and training resumes from it
    ckpt_path = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.rpartition(".")[2] in ("lora_A", "lora_B", "magnitude") for k in state)
    resumed = EndToEndPhase(checkpoint=str(phase2), run_dir=str(tmp_path / "resumed"), lr=3e-3)
    tr2 = trainer(tmp_path / "r", max_steps=10, val_check_interval=4)
    tr2.fit(resumed, datamodule=dm, ckpt_path=str(ckpt_path))
    assert tr2.global_step == 10
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["optimizer_steps"] == 10


def test_phase2_and_phase3_checkpoints_evaluate(phase1, phase2, tmp_path):
    """A phase-2 checkpoint goes through phase 3 and evaluation on the command line."""
    from reallm.run.cli import cli_main

    args = data_args(phase1)
    cli_main(["fit", "--config", str(ROOT / "configs" / "e2e.yaml"), "--model.init_args.checkpoint", str(phase2),
              "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
              "--run_dir", str(tmp_path / "e2e"), *args])
    for ck, name in ((phase2, "eval2"), (tmp_path / "e2e" / "reallm", "eval3")):
        cli_main(["validate", "--config", str(ROOT / "configs" / "eval.yaml"), "--model.init_args.checkpoint", str(ck),
                  "--trainer.accelerator", "cpu", "--run_dir", str(tmp_path / name), *args])
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert res["phase"] == "eval" and math.isfinite(res["perplexity"]["tinystories_valid"]["value"])
    e2e = json.loads((tmp_path / "e2e" / "results.json").read_text())
    ev = json.loads((tmp_path / "eval3" / "results.json").read_text())
    # the evaluation of the written checkpoint reproduces the last validation of the run: the same mean
    # token NLL up to fp32 summation order (this tiny run's NLL is ≈ 63 nats, so compare in log space)
    assert math.log(ev["perplexity"]["tinystories_valid"]["value"]) == pytest.approx(
        math.log(e2e["perplexity"]["tinystories_valid"]["value"]), abs=1e-5)


def test_ddp_two_processes_through_the_cli(phase1, tmp_path):
    """Two CPU processes (gloo) run the end-to-end phase through the CLI with the compressed linears resident
    (decoded on the fly, the default): one synchronised optimizer step changes the adapters and rank 0 writes a
    checkpoint that loads. That resident and cache mode give the same outputs and adapter gradients, format by
    format, is tests/test_runtime.py's (in-process: DDP averages those gradients whichever mode computed them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "ddp"
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "e2e.yaml"),
           "--model.init_args.checkpoint", str(phase1.checkpoint), "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.fast_dev_run", "true",
           "--run_dir", str(run), *data_args(phase1)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["phase"] == "e2e" and res["optimizer_steps"] == 1 and res["runtime"]["mode"] == "resident"
    assert int(res["config"]["trainer"]["devices"]) == 2
    load_compressed(run / "reallm")
    start, trained = adapters_of(phase1.checkpoint), adapters_of(run / "reallm")
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # the step changed them
    assert all(torch.isfinite(v.float()).all() for v in trained.values())


def test_bad_arguments_are_user_errors(phase1, tmp_path):
    with pytest.raises(UserError, match="needs --model.init_args.checkpoint"):
        EndToEndPhase(run_dir=str(tmp_path))
    with pytest.raises(UserError, match="warmup_ratio"):
        EndToEndPhase(checkpoint=str(phase1.checkpoint), warmup_ratio=1.5)


def test_bf16_autocast_and_gradient_checkpointing(phase1, tmp_path):
    """The GPU settings (bf16 autocast, gradient checkpointing) also run on CPU and train the adapters."""
    module = EndToEndPhase(checkpoint=str(phase1.checkpoint), run_dir=str(tmp_path / "run"), lr=3e-3,
                           autocast="bf16", gradient_checkpointing=True)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=text_datamodule(phase1))
    assert module.model.is_gradient_checkpointing
    old, new = adapters_of(phase1.checkpoint), adapters_of(tmp_path / "run" / "reallm")
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_train_stored_codebook_and_scales_through_the_cli(phase1, tmp_path):
    """--model.init_args.train_stored "[codebook, scales]": phase 3 also tunes the model-wide codebook and the
    block-scale maxima; the codes and the accounted bits are unchanged, and the checkpoint loads."""
    from reallm.layer.bits import bits_report
    from reallm.layer.linear import iter_reallm_layers
    from reallm.run.cli import cli_main

    run = tmp_path / "e2e-stored"
    cli_main(["fit", "--config", str(ROOT / "configs" / "e2e.yaml"), "--model.init_args.checkpoint",
              str(phase1.checkpoint), "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
              "--model.init_args.lr", "1e-2", "--model.init_args.train_stored", "[codebook, scales]",
              "--run_dir", str(run), *data_args(phase1)])
    before, after = load_compressed(phase1.checkpoint), load_compressed(run / "reallm")
    assert bits_report(after)["decoder_linears"] == bits_report(before)["decoder_linears"]
    old, new = dict(iter_reallm_layers(before)), dict(iter_reallm_layers(after))
    for name, layer in new.items():
        assert torch.equal(layer._frozen_tensors()["codes"], old[name]._frozen_tensors()["codes"])
    name = next(iter(new))
    assert not torch.equal(new[name]._shared_tensors()["codebook"], old[name]._shared_tensors()["codebook"])
    assert new[name]._shared_tensors()["codebook"].dtype == torch.float16


def test_train_stored_refuses_an_unknown_item(phase1):
    with pytest.raises(UserError, match="train_stored takes"):
        EndToEndPhase(checkpoint=str(phase1.checkpoint), train_stored=["decoder"])
