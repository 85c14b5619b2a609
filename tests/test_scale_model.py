"""benchmarks/scale.py, the Llama-2-7B-shaped rehearsal model, on its tiny variant (hidden 64, 2 layers, vocabulary
512): seeded builds are byte-identical, the directory loads in transformers and in phase 1, the index is complete,
the weights are heavy-tailed with outlier columns, and an interrupted build leaves nothing that looks complete."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).parents[1]
GAUSSIAN_KURTOSIS = 3.0
pytestmark = pytest.mark.usefixtures("single_thread")


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


scale = _scale_module()


@pytest.fixture(scope="module")
def text(shared_dir) -> Path:
    return shared_dir / "data" / "tinystories_train.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, text) -> Path:
    out = tmp_path_factory.mktemp("rehearsal") / "tiny"
    scale.build(out, scale.TINY, seed=0, text=text)
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_same_bytes(tiny, tmp_path, text):
    """A second build with seed 0 (through the command line) is byte-identical, file by file; seed 1 differs."""
    again = tmp_path / "again"
    scale.main(["build", "--tiny", "--out", str(again), "--tokenizer-text", str(text)])
    assert _files(again) == _files(tiny)
    other = tmp_path / "other"
    scale.build(other, scale.TINY, seed=1, text=text)
    shards = [n for n in _files(tiny) if n.endswith(".safetensors")]
    assert all((other / n).read_bytes() != (tiny / n).read_bytes() for n in shards)


def test_index_lists_every_tensor_once(tiny):
    """model.safetensors.index.json maps every tensor of every shard to its file, and nothing else; total_size is
    the tensors' bytes; the shapes are the config's (untied lm_head, one shard per block plus one)."""
    from safetensors import safe_open

    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    config = json.loads((tiny / "config.json").read_text())
    shards = sorted(p.name for p in tiny.glob("*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values()))
    assert len(shards) == config["num_hidden_layers"] + 1
    found, total = {}, 0
    for shard in shards:
        with safe_open(str(tiny / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16
                found[name] = shard
                total += t.numel() * 2
    assert found == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    plans = {t.name: t.shape for shard in scale.shard_plans(scale.TINY) for t in shard}
    assert set(plans) == set(found) and "lm_head.weight" in plans and not config["tie_word_embeddings"]
    assert config["vocab_size"] == 512 and config["hidden_size"] == 64 and config["intermediate_size"] == 172


def test_loads_in_transformers_and_runs(tiny, shared_dir):
    """from_pretrained in bf16 finds every weight (nothing missing, nothing left at random init) and a forward on
    TinyStories text gives finite logits of the right shape."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    first = load_file(tiny / scale.shard_name(0, 3))
    assert torch.equal(model.lm_head.weight, first["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok((shared_dir / "data" / "tinystories_valid.txt").read_text()[:600], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all()


def test_tokenizer_has_every_id_and_encodes_any_text(text, shared_dir):
    """32,000 ids for the 7B shape (BPE pieces, byte fallback, placeholders); TinyStories' validation text and
    text outside the training alphabet encode without <unk> and decode back exactly."""
    tok = scale.build_tokenizer(32000, text)
    assert tok.get_vocab_size() == 32000
    assert tok.id_to_token(0) == "<unk>" and tok.id_to_token(3) == "<0x00>" and tok.id_to_token(31999)
    sample = (shared_dir / "data" / "tinystories_valid.txt").read_text()[:20000] + " naïve ☃  two  spaces\n"
    ids = tok.encode(sample).ids
    assert ids[0] == 1 and 0 not in ids and max(ids) < 32000
    assert tok.decode(ids, skip_special_tokens=True) == sample


def test_tiny_weights_are_heavy_tailed(tiny):
    """Every decoder linear of the tiny variant: kurtosis above a Gaussian's, RMS near its kind's target, and an
    outlier input column wherever its kind has them; RMSNorm weights near 1."""
    rows = scale.stream_stats(tiny)
    linears = [r for r in rows if r["kind"] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")]
    assert len(linears) == 14
    for r in linears:
        spread = scale.SPREADS[r["kind"]]
        assert r["kurtosis"] > GAUSSIAN_KURTOSIS, r
        assert min(spread.rms) * 0.75 < r["std"] < max(spread.rms) * 1.25, r
        assert r["outlier_cols"] >= (1 if spread.col_frac > 0 else 0), r
    norms = [r for r in rows if r["kind"] == "norm"]
    assert len(norms) == 5 and all(0.8 < r["mean"] < 1.25 for r in norms)


def test_7b_shaped_rows_are_heavy_tailed_with_outliers_at_the_hidden_dims():
    """512 rows of a 7B q_proj (4096 inputs): kurtosis and max|w|/std well above a Gaussian's, the 8 outlier
    columns exactly at the model's outlier hidden dimensions, and a top singular value far above the
    ≈ 4 / 512 share of i.i.d. entries; generated in chunks that join into the same matrix whatever the split."""
    plan = scale.TensorPlan("model.layers.0.self_attn.q_proj.weight", (512, 4096), "q_proj", 0)
    dims = scale.hidden_outlier_dims(0, 4096)
    spread = scale.SPREADS["q_proj"]
    W = torch.cat(list(scale.matrix_chunks(plan, spread, 0.03, 0, dims))).float()
    assert W.shape == (512, 4096) and len(dims) == 8
    st = scale.matrix_stats(W)
    assert 5 < st["kurtosis"] < 40 and st["max_over_std"] > 15 and st["top_sv_share"] > 10 * 4 / 512
    col = W.norm(dim=0)
    assert sorted(torch.topk(col, 8).indices.tolist()) == dims.tolist()


def test_layer_variants_share_tensors(tiny, tmp_path, text):
    """A tensor's numbers depend on the seed and its name only (the RMS follows the 7B depth, not the variant's):
    the 3-layer variant's shards hold the same embeddings, head and blocks 0-1 as the 2-layer one."""
    from safetensors.torch import load_file

    three = tmp_path / "three"
    scale.build(three, dataclasses.replace(scale.TINY, layers=3), seed=0, text=text)
    for k in range(3):
        a, b = load_file(three / scale.shard_name(k, 4)), load_file(tiny / scale.shard_name(k, 3))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_interrupted_build_leaves_nothing_complete(tmp_path, text, monkeypatch):
    """A failure while shards are written: during the build only a hidden partial directory exists, without
    config.json, index or marker; afterwards neither it nor the target exists."""
    out = tmp_path / "model"
    real = scale.write_safetensors
    seen = []

    def failing(path, entries):
        if seen:
            partial = path.parent
            seen.append(sorted(p.name for p in partial.iterdir()))
            assert not out.exists() and partial.name.startswith(".model.partial-")
            raise RuntimeError("simulated interruption")
        seen.append(path.name)
        return real(path, entries)

    monkeypatch.setattr(scale, "write_safetensors", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        scale.build(out, scale.TINY, seed=0, text=text)
    assert not {"config.json", "model.safetensors.index.json", scale.MARKER} & set(seen[1])
    assert scale.shard_name(0, 3) in seen[1] and not any(n.endswith(".tmp") for n in seen[1])
    assert list(tmp_path.iterdir()) == []


def test_killed_build_is_not_a_model_and_delete_clears_it(tmp_path, text, monkeypatch):
    """A build killed with no chance to clean up (simulated: the cleanup does nothing) leaves only the hidden
    partial directory, which transformers refuses; the next build removes those of dead processes only, `delete`
    every one; delete refuses a directory that is not a rehearsal model."""
    from transformers import AutoConfig

    out = tmp_path / "model"
    real = scale.write_safetensors

    def killed(path, entries):
        if path.name != scale.shard_name(0, 3):
            raise KeyboardInterrupt
        return real(path, entries)

    monkeypatch.setattr(scale, "shutil", SimpleNamespace(rmtree=lambda *a, **k: None, disk_usage=shutil.disk_usage))
    monkeypatch.setattr(scale, "write_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        scale.build(out, scale.TINY, seed=0, text=text)
    monkeypatch.undo()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".model.partial-") and not out.exists()
    assert (left / scale.shard_name(0, 3)).is_file() and not (left / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # "no config.json" / "Unrecognized model"
        AutoConfig.from_pretrained(left)
    assert scale.partial_builds(out, dead_only=True) == []  # this process is alive: a build leaves it alone
    dead = tmp_path / ".model.partial-999999999-x"  # above Linux's pid_max
    dead.mkdir()
    scale.build(out, scale.TINY, seed=0, text=text)
    assert not dead.exists() and (out / scale.MARKER).is_file()
    assert scale.remove(out) == [out, left] and list(tmp_path.iterdir()) == []
    other = tmp_path / "mine"
    other.mkdir()
    with pytest.raises(SystemExit, match="not a rehearsal model"):
        scale.main(["delete", "--out", str(other)])
    assert other.is_dir()


def test_existing_directory_needs_force(tiny, tmp_path, text, capsys):
    """build refuses to overwrite; --force replaces a rehearsal directory; delete removes it."""
    out = tmp_path / "copy"
    shutil.copytree(tiny, out)
    with pytest.raises(SystemExit, match="exists"):
        scale.build(out, scale.TINY, seed=0, text=text)
    scale.build(out, scale.TINY, seed=2, text=text, force=True)
    assert json.loads((out / scale.MARKER).read_text())["seed"] == 2
    scale.main(["delete", "--out", str(out)])
    assert not out.exists() and f"removed {out}" in capsys.readouterr().out


def test_stats_command_prints_a_row_per_kind(tiny, tmp_path, capsys):
    scale.main(["stats", str(tiny), "--json", str(tmp_path / "stats.json")])
    out = capsys.readouterr().out
    for kind in ("embed_tokens", "lm_head", "norm", "q_proj", "down_proj"):
        assert f"| {kind}" in out
    assert len(json.loads((tmp_path / "stats.json").read_text())["tensors"]) == 21


@pytest.mark.slow
def test_phase1_compresses_the_tiny_variant(tiny, tmp_path):
    """Phase 1 (NF3, data-free) through the CLI, as README documents it, on the rehearsal model."""
    from reallm.run.cli import cli_main

    cli_main(["fit", "--config", str(ROOT / "configs" / "ae.yaml"),
              "--config", str(ROOT / "configs" / "methods" / "nf3.yaml"),
              "--model.init_args.model_name_or_path", str(tiny), "--trainer.accelerator", "cpu",
              "--run_dir", str(tmp_path / "run")])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["complete"] and res["method"] == "nf3"
