"""train.py / LightningCLI (every shipped config runs: tests/test_configs.py): phase 1 then evaluation through
the CLI, the model's context, --print_config round-trips, resume is exact,
bad input is one clear line with a non-zero exit code."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model_dir, write_text

from reallm.run.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "words.txt")


def compress_args(tiny_dir, run_dir, preset="nf3", *extra):
    return ["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(ROOT / f"configs/methods/{preset}.yaml"),
            "--model.init_args.model_name_or_path", str(tiny_dir), *CPU, "--run_dir", str(run_dir), *extra]


def test_compress_then_evaluate_matches_direct_perplexity(tiny_dir, text_file, tmp_path):
    """The whole phase 1 + evaluation through the CLI; the perplexity equals a direct computation."""
    from reallm import load_compressed
    from reallm.data.text import TextDataModule
    from reallm.eval.perplexity import perplexity

    cli_main(compress_args(tiny_dir, tmp_path / "c", "nf4"))
    compress = json.loads((tmp_path / "c" / "results.json").read_text())
    assert compress["complete"] and compress["compressed_matrices"] == 14
    assert 4.0 < compress["bits"]["decoder_linears"] < 6.5  # NF4 + rank-1 QLoRA adapters at 16 bits
    cli_main(["validate", "--config", str(ROOT / "configs/eval.yaml"), "--model.init_args.checkpoint",
              str(tmp_path / "c" / "reallm"), "--data.init_args.path", str(text_file), "--data.init_args.seq_len",
              "64", "--data.init_args.cache_dir", str(tmp_path / "cache"), *CPU, "--run_dir", str(tmp_path / "e")])
    ev = json.loads((tmp_path / "e" / "results.json").read_text())
    assert ev["method"] == "nf4" and ev["bits"]["decoder_linears"] == pytest.approx(compress["bits"]["decoder_linears"])
    dm = TextDataModule(path=str(text_file), model_name_or_path=str(tiny_dir), seq_len=64,
                        cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("validate")
    direct = perplexity(load_compressed(tmp_path / "c" / "reallm"), dm.val_windows[0], progress=False)
    assert ev["perplexity"]["words"]["value"] == pytest.approx(direct["value"], rel=1e-5)
    assert ev["perplexity"]["words"]["tokens"] == direct["tokens"]


def test_evaluation_defaults_to_the_model_context_and_refuses_a_longer_window(tiny_dir, text_file, tmp_path, capsys):
    """eval.yaml evaluates at the model's context (128 here, max_position_embeddings), records it in
    results.json, and refuses a longer window with one line unless forced (defect 11.2)."""
    base = ["validate", "--config", str(ROOT / "configs/eval.yaml"), "--model.init_args.model_name_or_path",
            str(tiny_dir), "--data.init_args.path", str(text_file), "--data.init_args.max_eval_windows", "2",
            "--data.init_args.cache_dir", str(tmp_path / "cache"), *CPU]
    cli_main([*base, "--run_dir", str(tmp_path / "default")])
    results = json.loads((tmp_path / "default" / "results.json").read_text())
    assert results["perplexity"]["words"]["context"] == 128

    with pytest.raises(SystemExit) as e:
        cli_main([*base, "--data.init_args.seq_len", "256", "--run_dir", str(tmp_path / "long")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "256" in err[-1] and "128" in err[-1]
    assert "allow_beyond_context" in err[-1]
    assert not (tmp_path / "long" / "results.json").exists()

    cli_main([*base, "--data.init_args.seq_len", "256", "--data.init_args.allow_beyond_context", "true",
              "--run_dir", str(tmp_path / "forced")])
    results = json.loads((tmp_path / "forced" / "results.json").read_text())
    assert results["perplexity"]["words"]["context"] == 256


def test_eval_after_fit_defaults_to_the_model_context(tiny_dir, text_file, tmp_path, capsys):
    """--eval_after_fit measures at the model's context by default and refuses a longer one (defect 11.2)."""
    after = ["--eval_after_fit.path", str(text_file), "--eval_after_fit.max_eval_windows", "2",
             "--eval_after_fit.cache_dir", str(tmp_path / "cache")]
    cli_main(compress_args(tiny_dir, tmp_path / "run", "nf3", *after))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["perplexity"]["words"]["context"] == 128 and results["eval_info"][0]["context"] == 128
    with pytest.raises(SystemExit):
        cli_main(compress_args(tiny_dir, tmp_path / "long", "nf3", *after, "--eval_after_fit.seq_len", "512"))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "512" in err[-1] and "128" in err[-1]


def _printed_config(args: list[str]) -> str:
    """What `train.py <args> --print_config` prints (in-process: the CLI prints, then exits 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        cli_main([*args, "--print_config"])
    assert e.value.code in (0, None)
    return out.getvalue()


def test_print_config_round_trips(tiny_dir, tmp_path):
    first = _printed_config(compress_args(tiny_dir, tmp_path / "run", "vq-3bit"))
    assert "quantizer: vq" in first and "bits: 3" in first
    (tmp_path / "printed.yaml").write_text(first)
    assert _printed_config(["fit", "--config", str(tmp_path / "printed.yaml")]) == first


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_interrupted_phase1_resumes_to_an_identical_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from reallm.phases.compress import CompressPhase

    cli_main(compress_args(tiny_dir, tmp_path / "straight", "vq-2bit"))

    real_step = CompressPhase.training_step

    def dying_step(self, batch, batch_idx):
        if batch_idx == 6:
            raise RuntimeError("simulated kill")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(CompressPhase, "training_step", dying_step)
    with pytest.raises(RuntimeError, match="simulated kill"):
        cli_main(compress_args(tiny_dir, tmp_path / "resumed", "vq-2bit"))
    assert len(list((tmp_path / "resumed" / "partial").glob("*.json"))) == 6
    assert not (tmp_path / "resumed" / "reallm").exists()
    monkeypatch.setattr(CompressPhase, "training_step", real_step)
    done_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed" / "partial").glob("*.safetensors")}
    cli_main(compress_args(tiny_dir, tmp_path / "resumed", "vq-2bit"))
    # the 6 finished matrices were skipped, not recomputed
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())
    for name in ("model.safetensors", "config.json"):
        assert _sha(tmp_path / "resumed" / "reallm" / name) == _sha(tmp_path / "straight" / "reallm" / name)


def _run_train(args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _one_clear_line_in_process(args, capsys, *needles):
    """The CLI run in this process (the subprocess is tested by test_bad_model_path_is_one_clear_line): it exits
    non-zero with one `error:` line naming the problem, and no traceback."""
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code not in (0, None)
    stderr = capsys.readouterr().err
    err = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert err and err[-1].startswith("error:"), stderr
    for n in needles:
        assert n in err[-1], err[-1]


def _one_clear_line(proc, *needles):
    assert proc.returncode != 0
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err and err[-1].startswith("error:"), proc.stderr
    for n in needles:
        assert n in err[-1], err[-1]


def test_phase1_prints_no_expected_noise(tiny_dir, tmp_path):
    """What a user of `make demo` read as errors is gone from a phase-1 run (which showed all of it):
    Lightning's "configure_optimizers returned None" (phase 1 optimises nothing on purpose), its LeafSpec
    deprecation warning and its litlogger / litmodels tips (defect 11.8)."""
    noise = ("configure_optimizers` returned `None`", "LeafSpec", "litlogger", "litmodels")
    fit = _run_train(compress_args(tiny_dir, tmp_path / "c", "nf3"))
    assert fit.returncode == 0, fit.stderr[-2000:]
    out = fit.stdout + fit.stderr
    assert not [n for n in noise if n in out], out[-3000:]
    assert "| **decoder linears** |" in fit.stdout  # the output itself is still there


def test_bad_model_path_is_one_clear_line(tmp_path):
    proc = _run_train(["fit", "--config", "configs/ae.yaml", "--config", "configs/methods/nf3.yaml",
                       "--model.init_args.model_name_or_path", str(tmp_path / "no_such_model"), *CPU,
                       "--run_dir", str(tmp_path / "r")])
    _one_clear_line(proc, "no_such_model")


def test_missing_dataset_is_one_clear_line(tiny_dir, tmp_path, capsys):
    _one_clear_line_in_process(["validate", "--config", str(ROOT / "configs/eval.yaml"),
                                "--model.init_args.model_name_or_path", str(tiny_dir), "--data.init_args.path",
                                str(tmp_path / "missing.txt"), *CPU, "--run_dir", str(tmp_path / "r")],
                               capsys, "missing.txt")


def test_unknown_preset_key_is_one_clear_line(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    compression:\n      quantiser: nf\n")
    _one_clear_line_in_process(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(bad),
                                "--model.init_args.model_name_or_path", str(tiny_dir), *CPU,
                                "--run_dir", str(tmp_path / "r")], capsys, "quantiser")


def test_impossible_config_is_one_clear_line(tiny_dir, tmp_path, capsys):
    _one_clear_line_in_process(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config",
                                str(ROOT / "configs/methods/vq-3bit.yaml"), "--model.init_args.compression.options.dim",
                                "8", "--model.init_args.model_name_or_path", str(tiny_dir), *CPU,
                                "--run_dir", str(tmp_path / "r")], capsys, "b·d")


def test_phase1_keeps_a_bf16_models_dense_dtype(tmp_path):
    """Phase 1 loads the base model in its own dtype: a bf16 model's embeddings, norms and biases are
    saved in bf16 (the matrices are still compressed in fp32), restored so, and "whole model" bits count
    them at 16 bits; float32 only when asked (defect 11.7)."""
    from safetensors.torch import load_file
    from tiny_models import ALL, word_tokenizer

    from reallm import iter_reallm_layers, load_compressed
    from reallm.checkpoint.directory import read_meta

    base = tmp_path / "qwen2-bf16"
    ALL["qwen2"]().to(torch.bfloat16).save_pretrained(base)  # q/k/v biases, untied head
    word_tokenizer().save_pretrained(base)
    cli_main(compress_args(base, tmp_path / "auto", "nf3"))
    cli_main(compress_args(base, tmp_path / "fp32", "nf3", "--data.init_args.dtype", "float32"))

    stored = load_file(tmp_path / "auto" / "reallm" / "model.safetensors")
    dense_keys = set(read_meta(tmp_path / "auto" / "reallm")["dense"])  # embeddings, norms, head
    dense = {k: v for k, v in stored.items() if k in dense_keys}
    biases = {k: v for k, v in stored.items() if k.endswith(".bias")}
    assert dense and {v.dtype for v in dense.values()} == {torch.bfloat16}
    assert biases and {v.dtype for v in biases.values()} == {torch.bfloat16}
    original = load_file(base / "model.safetensors")
    for k, v in dense.items():
        assert torch.equal(v, original[k]), k  # the stored values, bit-exactly
    fp32_keys = set(read_meta(tmp_path / "fp32" / "reallm")["dense"])
    assert {v.dtype for k, v in load_file(tmp_path / "fp32" / "reallm" / "model.safetensors").items()
            if k in fp32_keys} == {torch.float32}

    model = load_compressed(tmp_path / "auto" / "reallm")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    layers = dict(iter_reallm_layers(model))
    assert all(layer.stats["orig_dtype"] == "bfloat16" for layer in layers.values())
    assert layers["model.layers.0.self_attn.q_proj"].bias.dtype == torch.bfloat16

    # "whole model" bits: the same compressed matrices, dense weights at 16 instead of 32 bits
    auto, fp32 = (json.loads((tmp_path / r / "results.json").read_text())["bits"] for r in ("auto", "fp32"))
    assert auto["decoder_linears"] == pytest.approx(fp32["decoder_linears"])
    n_dense = sum(v.numel() for v in dense.values()) + sum(v.numel() for v in biases.values())
    n_total = n_dense + sum(p * q for p, q in (layer.container().shape for layer in layers.values()))
    assert fp32["whole_model"] - auto["whole_model"] == pytest.approx(16 * n_dense / n_total, rel=1e-9)
