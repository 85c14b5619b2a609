"""Hardening: NaN / Inf stop a run with one line naming the layer and the step; the same seed gives
bit-identical checkpoints on CPU (across processes); corrupted or truncated checkpoint files never
load as a different model; user errors are one line with a non-zero exit code; the long loops show
a progress bar with an ETA."""

from __future__ import annotations

import hashlib
import random
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from phase_helpers import SHARED, data_args, make_phase1
from tiny_models import save_tiny_model_dir, tiny_llama, word_tokenizer, write_text

from reallm.checkpoint.compressed import (
    adapters_fingerprint,
    load_compressed,
    save_adapters,
    save_compressed,
)
from reallm.core.errors import CheckpointError
from reallm.phases.base import ReALLMModule
from reallm.run.callbacks import NonFiniteError, NonFiniteGuard
from reallm.run.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.accelerator", "cpu"]
ETA = re.compile(r"\d+:\d\d:\d\d • \d+:\d\d:\d\d|\[\d\d:\d\d<\d\d:\d\d")  # Rich "elapsed • left", tqdm "[a<b"
needs_shared = pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(), reason="needs ../shared")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def compress_args(tiny_dir, run_dir, preset="nf3", *extra):
    return ["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(ROOT / f"configs/methods/{preset}.yaml"),
            "--model.init_args.model_name_or_path", str(tiny_dir), *CPU, "--run_dir", str(run_dir), *extra]


def one_line_error(capsys, exc_info, *needles, code=None) -> str:
    """The run ended with a non-zero exit code and exactly one `error:` line, no traceback."""
    assert exc_info.value.code not in (0, None)
    if code is not None:
        assert exc_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------
# NaN / Inf guard
# ------------------------------------------------------------------------------------------------
class _Diverging(ReALLMModule):
    """A two-layer regression whose second layer's weight turns NaN at optimiser step 3 (a phase of its
    own: the guard reads the phase contract)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))

    @property
    def phase_model(self):
        return None  # no model apart from the module: its parameters are named from the module itself

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            with torch.no_grad():
                self.net[1].weight[0, 2] = float("nan")
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(32, 4), batch_size=4)


def test_guard_names_the_weight_and_the_step(tmp_path):
    trainer = L.Trainer(max_epochs=1, callbacks=[NonFiniteGuard()], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit(_Diverging())
    msg = str(e.value)
    assert "\n" not in msg
    # the NaN written at step 3 reaches the loss of that same step, and names the weight
    assert msg.startswith("training loss is nan at global step 3 (epoch 0, batch 3)"), msg
    assert "first non-finite weight: net.1.weight (layer net.1)" in msg, msg
    trainer = L.Trainer(max_epochs=1, callbacks=[NonFiniteGuard(enabled=False)], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(_Diverging())  # switched off: runs to the end


def test_nan_in_a_weight_stops_phase1_with_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    from reallm.data.weights import WeightDataModule

    real = WeightDataModule.weight

    def poisoned(self, name):
        W = real(self, name)
        if name == "model.layers.1.mlp.up_proj":
            W = W.clone()
            W[3, 5] = float("inf")
        return W

    monkeypatch.setattr(WeightDataModule, "weight", poisoned)
    with pytest.raises(SystemExit) as e:
        cli_main(compress_args(tiny_dir, tmp_path / "run", "rtn3"))
    one_line_error(capsys, e, "inf in the weight of layer model.layers.1.mlp.up_proj",
                   "at step 12 (epoch 0)", code=1)


@needs_shared
def test_nan_in_a_trained_weight_stops_blockwise_with_one_line(tmp_path, monkeypatch, capsys):
    """Block-wise distillation (its model is not a registered submodule): a DoRA weight that turns
    NaN in the first step is reported with its layer, the step and the block."""
    from reallm.phases.blockwise import BlockwisePhase

    real = BlockwisePhase.training_step

    def step_then_poison(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        with torch.no_grad():
            self._blocks[0].self_attn.v_proj.lora_A[0, 0] = float("nan")
        return loss

    monkeypatch.setattr(BlockwisePhase, "training_step", step_then_poison)
    p = make_phase1(tmp_path / "p1")
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(ROOT / "configs/blockwise.yaml"), "--model.init_args.checkpoint",
                  str(p.checkpoint), "--model.init_args.effective_batch", "4", *CPU,
                  "--run_dir", str(tmp_path / "bw"), *data_args(p, sequences=8, batch_size=4)])
    one_line_error(capsys, e, "nan in weight model.layers.0.self_attn.v_proj.lora_A "
                              "(layer model.layers.0.self_attn.v_proj) after the optimiser step, at global step 1 "
                              "(epoch 0, batch 0), block 0", code=1)


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_phase1_same_seed_same_bytes(tiny_dir, tmp_path, capfd):
    """Phase 1 with every random choice in play (k-means++, permutation, SVD low-rank in int8, DoRA),
    twice in one process (the second run starts from whatever global random state the first left):
    identical files. (Another process with another PYTHONHASHSEED gives the same bytes as well, on
    the same machine and thread count: float reductions depend on the number of threads.) The run
    shows a progress bar with an ETA."""
    extra = ["--model.init_args.compression.options.kmeans_iters", "10", "--data.init_args.layers", r"layers\.0\.",
             "--artifacts.figures", "false"]
    cli_main(compress_args(tiny_dir, tmp_path / "a", "vq-3bit-ft", *extra))
    out = capfd.readouterr()
    assert ETA.search(out.out + out.err), "no ETA in the progress bar output"
    torch.manual_seed(1234)
    random.seed(1234)
    cli_main(compress_args(tiny_dir, tmp_path / "b", "vq-3bit-ft", *extra))
    a, b = _hashes(tmp_path / "a" / "reallm"), _hashes(tmp_path / "b" / "reallm")
    assert {"model.safetensors", "config.json", "generation_config.json"} <= set(a)
    del a["README.md"], b["README.md"]  # the model card names its own command line (run directories differ)
    assert a == b


@needs_shared
def test_e2e_same_seed_same_adapters(tmp_path, capfd):
    p = make_phase1(tmp_path / "p1")
    for run in ("a", "b"):
        cli_main(["fit", "--config", str(ROOT / "configs/e2e.yaml"), "--model.init_args.checkpoint", str(p.checkpoint),
                  *CPU, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--run_dir",
                  str(tmp_path / run), *data_args(p, sequences=12, batch_size=4)])
    out = capfd.readouterr()
    assert ETA.search(out.out + out.err)
    assert adapters_fingerprint(tmp_path / "a" / "reallm") == adapters_fingerprint(tmp_path / "b" / "reallm")


# ------------------------------------------------------------------------------------------------
# corrupted checkpoints
# ------------------------------------------------------------------------------------------------
def _logits(model) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % 100 + 3
    with torch.no_grad():
        return model(ids).logits


def test_fuzzed_checkpoints_never_load_silently_wrong(tmp_path):
    """Flip random bytes in, truncate, and extend every file of a saved checkpoint: loading either
    raises CheckpointError or gives exactly the original logits. (README.md, the model card, is
    documentation: nothing reads it, so it is left out.)"""
    from reallm import CompressionConfig, compress_
    from reallm.layer.linear import iter_reallm_layers

    model = tiny_llama()
    compress_(model, CompressionConfig(quantizer="vq", bits=2, permute=True, rotation="hadamard", rank=2,
                                       lowrank_dtype="int8",
                                       options={"dim": 2, "codebook_scope": "model", "kmeans_iters": 5}),
              progress=False)
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.lora_B.add_(0.01)
    ck = save_compressed(model, tmp_path / "ck", tokenizer=word_tokenizer())
    save_adapters(model, ck, "other")
    ref = _logits(load_compressed(ck))
    ref_other = _logits(load_compressed(ck, adapters="other"))
    rng = random.Random(0)
    files = sorted(p for p in ck.rglob("*") if p.is_file() and p.name != "README.md")
    assert {"config.json", "model.safetensors", "other.safetensors", "generation_config.json", "tokenizer.json",
            "configuration_reallm.py"} <= {p.name for p in files}
    outcomes = {"refused": 0, "identical": 0}
    for path in files:
        raw = path.read_bytes()
        variants = []
        for _ in range(6):
            pos = rng.randrange(len(raw))
            flipped = bytearray(raw)
            flipped[pos] ^= rng.randrange(1, 256)
            variants.append((f"flip byte {pos}", bytes(flipped)))
        variants += [(f"truncate to {n}", raw[:n]) for n in (0, len(raw) // 2, len(raw) - 1)]
        variants.append(("append", raw + b"\x00junk"))
        for what, data in variants:
            path.write_bytes(data)
            try:
                for adapters, expected in (("default", ref), ("other", ref_other)):
                    got = _logits(load_compressed(ck, adapters=adapters))
                    assert torch.equal(got, expected), f"{path.name}: {what} loaded a different model"
                outcomes["identical"] += 1
            except CheckpointError as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
            finally:
                path.write_bytes(raw)
    assert outcomes["refused"] >= len(files) * 8  # nearly every corruption is caught, none slips through


# ------------------------------------------------------------------------------------------------
# one-line user errors
# ------------------------------------------------------------------------------------------------
def test_user_errors_are_one_line(tiny_dir, tmp_path, capsys):
    run = tmp_path / "c"
    cli_main(compress_args(tiny_dir, run, "rtn3", "--trainer.fast_dev_run", "true", "--artifacts.figures", "false"))
    capsys.readouterr()
    text = write_text(tmp_path / "words.txt")
    weights = run / "reallm" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the tensors' bytes, after the header
    raw[start + (len(raw) - start) // 3] ^= 0x40
    weights.write_bytes(bytes(raw))
    eval_args = ["validate", "--config", str(ROOT / "configs/eval.yaml"), "--data.init_args.path", str(text),
                 "--data.init_args.seq_len", "32", "--data.init_args.cache_dir", str(tmp_path / "cache"), *CPU]
    cases = [
        # a checkpoint that does not exist: named before any model or data is loaded
        ([*eval_args, "--model.init_args.checkpoint", str(tmp_path / "nothing"), "--run_dir", str(tmp_path / "e0")],
         ("nothing", "does not exist"), 1),
        # a corrupted checkpoint
        ([*eval_args, "--model.init_args.checkpoint", str(run / "reallm"), "--run_dir", str(tmp_path / "e1")],
         ("model.safetensors: checksum mismatch",), 1),
        # a run directory that cannot be created
        (compress_args(tiny_dir, tmp_path / "words.txt" / "sub"), ("words.txt",), 1),
        # accelerators this machine does not have (TPU: not even its package)
        (compress_args(tiny_dir, tmp_path / "r3", "nf3", "--trainer.accelerator", "mps"), ("MPS",), 1),
        (compress_args(tiny_dir, tmp_path / "r3", "nf3", "--trainer.accelerator", "tpu"), ("torch_xla",), 1),
        # a bad value of the logger switch
        (compress_args(tiny_dir, tmp_path / "r4", "nf3", "--logger", "tensorboard"), ("logger",), 2),
        # an impossible context length
        ([*eval_args, "--model.init_args.model_name_or_path", str(tiny_dir), "--data.init_args.seq_len", "1",
          "--run_dir", str(tmp_path / "e5")], ("seq_len",), 2),
    ]
    for args, needles, code in cases:
        with pytest.raises(SystemExit) as e:
            cli_main(args)
        one_line_error(capsys, e, *needles, code=code)


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("REALLM_DEBUG", "1")
    with pytest.raises(CheckpointError):  # raised as it is, not turned into one line
        cli_main(["validate", "--config", str(ROOT / "configs/eval.yaml"), "--model.init_args.checkpoint",
                  str(tmp_path / "nothing"), *CPU, "--run_dir", str(tmp_path / "e")])
