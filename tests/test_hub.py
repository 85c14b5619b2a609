"""The checkpoint as a Hub repository (model card, upload, `--push_to_hub`), and lm-eval's own
`--model hf` on it: tested offline, up to the network call (huggingface_hub's HfApi is replaced by a
recorder of what would be created and uploaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import ALL, save_tiny_model_dir, word_tokenizer, write_text

from reallm import CheckpointError, CompressionConfig, compress_, iter_reallm_layers, load_compressed, save_compressed
from reallm.checkpoint.hub import main as hub_main
from reallm.checkpoint.hub import push_to_hub, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records create_repo / upload_folder (what would go over the
    network) and keeps a copy of the uploaded folder's files."""

    calls: list = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        FakeHub.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, "files": files, **kwargs}))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0123abc"

        return Info()


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


@pytest.fixture()
def checkpoint(tmp_path):
    model = ALL["llama"]()
    compress_(model, CompressionConfig(quantizer="nf", bits=3, rank=2), progress=False)
    return save_compressed(model, tmp_path / "run" / "reallm", tokenizer=word_tokenizer(), base_model="org/tiny")


def test_push_to_hub_uploads_the_verified_directory(checkpoint, fake_hub, tmp_path):
    results = {"method": "nf3", "bits": {"nominal": 3, "decoder_linears": 3.5123, "whole_model": 7.25},
               "perplexity": {"words": {"context": 64, "value": 123.45678, "tokens": 999}}}
    url = push_to_hub(checkpoint, "me/tiny-nf3", private=True, results=results, command="python train.py fit ...")
    assert url == "https://huggingface.co/me/tiny-nf3/commit/0123abc"
    (create, repo, kw), (upload, repo2, up) = fake_hub.calls
    assert (create, repo, kw["private"], kw["repo_type"], kw["exist_ok"]) == ("create_repo", "me/tiny-nf3", True,
                                                                              "model", True)
    assert (upload, repo2, up["repo_type"], Path(up["folder_path"])) == ("upload_folder", "me/tiny-nf3", "model",
                                                                         checkpoint)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "configuration_reallm.py"} <= set(
        up["files"])
    card = up["files"]["README.md"].decode()
    assert "base_model: org/tiny" in card and "| accounted bits, decoder linears | 3.512 |" in card
    assert "| words | 64 | 123.4568 | 999 |" in card and 'from_pretrained("me/tiny-nf3")' in card
    # what was uploaded is a checkpoint that loads, with the model's logits
    copy = tmp_path / "downloaded"
    for name, data in up["files"].items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    ids = torch.arange(20).reshape(2, 10) + 3
    with torch.no_grad():
        assert torch.equal(load_compressed(copy)(ids).logits, load_compressed(checkpoint)(ids).logits)


def test_a_corrupted_checkpoint_is_never_uploaded(checkpoint, fake_hub):
    path = checkpoint / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # a byte of the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        push_to_hub(checkpoint, "me/tiny")
    assert fake_hub.calls == []
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(checkpoint)


def test_hub_command_and_its_errors(checkpoint, fake_hub, monkeypatch, capsys):
    card = (checkpoint / "README.md").read_text()
    assert hub_main([str(checkpoint), "me/tiny"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/tiny/commit/0123abc"
    assert fake_hub.calls[-1][2]["files"]["README.md"].decode() == card  # a checkpoint's own card is kept
    assert hub_main([str(checkpoint), "not a repo id"]) == 1
    assert "repo_id must be" in capsys.readouterr().err

    def offline(self, *args, **kwargs):
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(FakeHub, "create_repo", offline)
    assert hub_main([str(checkpoint), "me/tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offline mode is enabled" in err[0]
    assert "retry with: python -m reallm.checkpoint.hub" in err[0]


def test_cli_run_writes_the_model_card_of_its_results_and_pushes(tmp_path, fake_hub, monkeypatch):
    """A phase-1 run with --eval_after_fit and --push_to_hub: the card states results.json's accounted bits
    and perplexity, the command and the versions; the upload is the run's checkpoint."""
    import transformers

    import reallm
    from reallm.run.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["train.py"])
    tiny = save_tiny_model_dir(tmp_path / "tiny")
    text = write_text(tmp_path / "words.txt")
    run = tmp_path / "run"
    cli_main(["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(ROOT / "configs/methods/nf3.yaml"),
              "--model.init_args.model_name_or_path", str(tiny), "--trainer.accelerator", "cpu",
              "--eval_after_fit.path", str(text), "--eval_after_fit.seq_len", "32",
              "--artifacts.figures", "false", "--run_dir", str(run), "--push_to_hub", "me/tiny-nf3"])
    res = json.loads((run / "results.json").read_text())
    card = (run / "reallm" / "README.md").read_text()
    assert f"| accounted bits, decoder linears | {res['bits']['decoder_linears']:.3f} |" in card
    assert f"| accounted bits, whole model | {res['bits']['whole_model']:.3f} |" in card
    assert "| nominal bits | 3 |" in card and "| method | nf3 |" in card
    ppl = res["perplexity"]["words"]
    assert f"| words | 32 | {ppl['value']:.4f} | {ppl['tokens']} |" in card
    assert f"python train.py fit --config {ROOT / 'configs/ae.yaml'}" in card and "--push_to_hub me/tiny-nf3" in card
    assert f"reallm {reallm.__version__}, transformers {transformers.__version__}" in card
    assert f"`{tiny}`" in card  # the base model
    upload = next(c for c in fake_hub.calls if c[0] == "upload_folder")
    assert Path(upload[2]["folder_path"]) == run / "reallm" and upload[2]["files"]["README.md"].decode() == card


# ------------------------------------------------------------------------------------------------
# lm-eval-harness, --model hf, without our wrapper
# ------------------------------------------------------------------------------------------------
def test_lm_eval_model_hf_equals_reallm_zeroshot(tmp_path, capsys):
    """`lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True` in a process that imports
    only lm-eval gives, document by document, the log-likelihoods of `reallm.eval.zeroshot` on our model object,
    hence the same accuracy as `python -m reallm.eval.zeroshot` (which tests/test_zeroshot.py checks against
    `zero_shot`)."""
    pytest.importorskip("lm_eval")
    from test_zeroshot import ROWS, TASK_YAML

    from reallm.eval.zeroshot import zero_shot

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tasks / "tiny_mc.jsonl"))
    model = ALL["llama"]()
    compress_(model, CompressionConfig(quantizer="nf", bits=4, rank=2), progress=False)
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.lora_B.add_(0.01)
    ck = save_compressed(model, tmp_path / "ck", tokenizer=word_tokenizer())

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={ck},trust_remote_code=True", "--tasks", "tiny_mc", "--include_path",
                           str(tasks), "--device", "cpu", "--batch_size", "4", "--log_samples", "--output_path",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_tiny_mc_*.jsonl")).open()]
    theirs = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}

    ours = zero_shot(load_compressed(ck), word_tokenizer(), ["tiny_mc"], include_path=str(tasks), batch_size=4,
                     log_samples=True)
    mine = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in ours["samples"]["tiny_mc"]}
    assert theirs.keys() == mine.keys() == set(range(len(ROWS)))
    for doc in mine:
        assert theirs[doc] == pytest.approx(mine[doc], rel=1e-5, abs=1e-5), doc
    # (`python -m reallm.eval.zeroshot` gives zero_shot's accuracy: tests/test_zeroshot.py)
    assert result["results"]["tiny_mc"]["acc,none"] == ours["tasks"]["tiny_mc"]["acc"]
