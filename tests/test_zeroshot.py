"""Zero-shot accuracy through lm-eval-harness's own HF wrapper on our model object, on a tiny local
multiple-choice task (jsonl + task YAML, offline), checked against a direct computation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model_dir, word_tokenizer, write_text

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("lm_eval")

# questions and choices in the word tokenizer's vocabulary (w0 … w124); answer = index of the right choice. Every
# question has at least 5 words, so no request is short enough for the fused 1–4-token kernels (whose first
# compilation on a new machine costs seconds per token count; their correctness is tests/test_kernels.py's)
ROWS = [
    {"question": "w40 w41 w1 w2 w3", "choices": ["w4", "w5 w6", "w7"], "answer": 0},
    {"question": "w42 w43 w3 w3 w8", "choices": ["w1", "w2"], "answer": 1},
    {"question": "w44 w45 w46 w47 w10", "choices": ["w11", "w12", "w13", "w14"], "answer": 3},
    {"question": "w48 w49 w50 w20 w21", "choices": ["w22 w23", "w24"], "answer": 0},
    {"question": "w51 w30 w31 w32 w33", "choices": ["w34", "w35", "w36"], "answer": 2},
    {"question": "w52 w53 w54 w55 w5", "choices": ["w6", "w7 w8 w9"], "answer": 1},
]

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "tiny_mc.yaml").write_text(TASK_YAML.format(data=d / "tiny_mc.jsonl"))
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ReALLM checkpoint of a tiny Llama (NF4 + DoRA, adapters moved off their init)."""
    from tiny_models import tiny_llama

    from reallm import CompressionConfig, compress_, save_compressed
    from reallm.layer.linear import iter_reallm_layers

    model = tiny_llama()
    compress_(model, CompressionConfig(quantizer="nf", bits=4, rank=2), progress=False)
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.lora_B.add_(0.01)
    return save_compressed(model, tmp_path_factory.mktemp("ck") / "reallm", tokenizer=word_tokenizer())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _direct_accuracy(model, tok) -> float:
    """argmax over the choices of log p(" " + choice | question), summed over the choice's tokens."""
    right = 0
    with torch.no_grad():
        for r in ROWS:
            ctx = tok(r["question"], add_special_tokens=False).input_ids
            scores = []
            for choice in r["choices"]:
                cont = tok(r["question"] + " " + choice, add_special_tokens=False).input_ids[len(ctx):]
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            right += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    return right / len(ROWS)


def test_zero_shot_on_our_model_matches_a_direct_computation(checkpoint, task_dir):
    from reallm import load_compressed
    from reallm.eval.zeroshot import zero_shot
    from reallm.layer.linear import ReALLMLinear

    model = load_compressed(checkpoint)
    assert any(isinstance(m, ReALLMLinear) for m in model.modules())  # our model object, not a copy
    tok = word_tokenizer()
    res = zero_shot(model, tok, ["tiny_mc"], include_path=str(task_dir), batch_size=4)
    task = res["tasks"]["tiny_mc"]
    assert res["metric"] == "acc" and task["samples"] == len(ROWS)
    assert task["acc"] == pytest.approx(_direct_accuracy(model, tok))
    assert res["mean_acc"] == task["acc"] and res["lm_eval_version"]


def test_zeroshot_command_writes_results(checkpoint, task_dir, tmp_path, capsys):
    """`python -m reallm.eval.zeroshot` on a checkpoint: a table, results.json, and `zero_shot`'s accuracy."""
    from reallm import load_compressed
    from reallm.eval.zeroshot import main, zero_shot

    rc = main(["--checkpoint", str(checkpoint), "--tasks", "tiny_mc", "--include_path", str(task_dir),
               "--device", "cpu", "--batch_size", "4", "--out", str(tmp_path / "zs")])
    assert rc == 0
    assert "| tiny_mc |" in capsys.readouterr().out
    res = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert res["phase"] == "zero_shot" and res["zero_shot"]["tasks"]["tiny_mc"]["samples"] == len(ROWS)
    direct = zero_shot(load_compressed(checkpoint), word_tokenizer(), ["tiny_mc"], include_path=str(task_dir),
                       batch_size=4)
    assert res["zero_shot"]["tasks"]["tiny_mc"]["acc"] == direct["tasks"]["tiny_mc"]["acc"]


def test_unknown_task_and_missing_folder_are_one_line(checkpoint, task_dir, tmp_path, capsys):
    from reallm.eval.zeroshot import ZeroShotError, main, task_manager

    with pytest.raises(ZeroShotError, match=r"unknown lm-eval task\(s\) \['nope'\]"):
        task_manager(["nope"], include_path=str(task_dir), include_defaults=False)
    assert main(["--checkpoint", str(checkpoint), "--tasks", "tiny_mc", "--include_path", str(tmp_path / "none"),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no such task directory" in err[0]


def test_evaluation_phase_runs_zero_shot(task_dir, tmp_path, monkeypatch):
    """`validate --model.init_args.zero_shot_tasks [...]`: perplexity and zero-shot accuracy in one run."""
    from reallm.run.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["train.py"])
    tiny = save_tiny_model_dir(tmp_path / "tiny")
    text = write_text(tmp_path / "words.txt")
    cli_main(["validate", "--config", str(ROOT / "configs/eval.yaml"), "--model.init_args.model_name_or_path",
              str(tiny), "--data.init_args.path", str(text), "--data.init_args.seq_len", "64",
              "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu",
              "--trainer.fast_dev_run", "true", "--model.init_args.zero_shot_tasks", "[tiny_mc]",
              "--model.init_args.zero_shot_include_path", str(task_dir), "--run_dir", str(tmp_path / "eval")])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["perplexity"]["words"]["value"] > 1
    assert 0.0 <= res["zero_shot"]["tasks"]["tiny_mc"]["acc"] <= 1.0
    assert res["zero_shot"]["tasks"]["tiny_mc"]["samples"] == len(ROWS)
