"""The ReALLM checkpoint format: exact round trips, dense export, clear errors, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import sample_ids, tiny_gpt2, tiny_llama, tiny_mistral
from transformers import AutoModelForCausalLM

from reallm import (
    CheckpointError,
    CompressionConfig,
    compress_,
    export_dense,
    iter_reallm_layers,
    load_compressed,
    save_adapters,
    save_compressed,
)
from reallm.checkpoint import format1, format2

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def compressed(build=tiny_llama, **cfg):
    model = build()
    cfg = {"quantizer": "nf", "bits": 3, "rank": 4, **cfg}
    compress_(model, CompressionConfig(**cfg), progress=False)
    return model


def logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


@pytest.mark.parametrize("build,cfg", [
    (tiny_llama, {}),
    (tiny_mistral, {"quantizer": "vq", "bits": 2, "permute": True, "options": {"dim": 4, "kmeans_iters": 5}}),
    (tiny_gpt2, {"quantizer": "rtn", "bits": 3, "rotation": "hadamard"}),
    (tiny_llama, {"quantizer": "vq", "bits": 2, "options": {"dim": 2, "codebook_scope": "model"}}),
])
def test_save_load_identical_logits(tmp_path, build, cfg):
    model = compressed(build, **cfg)
    with torch.no_grad():  # train-like change of the adapters so that they are not the init
        for _, layer in iter_reallm_layers(model):
            layer.lora_B.add_(0.01)
    save_compressed(model, tmp_path / "ck")
    back = load_compressed(tmp_path / "ck")
    assert torch.equal(logits(model), logits(back))
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "reallm" and qc["format_version"] == format2.FORMAT_VERSION == 2
    assert set(qc["layers"]) == {name for name, _ in iter_reallm_layers(model)}
    assert all("bits" in rec and "config" in rec and len(rec["sha256"]) == 64 for rec in qc["layers"].values())
    assert (tmp_path / "ck" / "model.safetensors").is_file() and not (tmp_path / "ck" / "reallm.json").exists()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_export_dense_loads_with_from_pretrained(tmp_path, build):
    model = compressed(build)
    export_dense(model, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    a, b = logits(model), logits(dense)
    assert float((a - b).abs().max()) < 1e-5


def test_several_adapter_sets_over_one_base(tmp_path):
    model = compressed()
    save_compressed(model, tmp_path / "ck")
    ref_default = logits(model)
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.magnitude.mul_(1.1)
    save_adapters(model, tmp_path / "ck", "task_b")
    ref_b = logits(model)
    assert torch.equal(logits(load_compressed(tmp_path / "ck")), ref_default)
    assert torch.equal(logits(load_compressed(tmp_path / "ck", adapters="task_b")), ref_b)
    with pytest.raises(CheckpointError, match="no adapter set 'nope'"):
        load_compressed(tmp_path / "ck", adapters="nope")


@pytest.fixture()
def saved(tmp_path):
    model = compressed()
    return save_compressed(model, tmp_path / "ck")


def _data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_corrupted_file_is_refused(saved):
    path = saved / "model.safetensors"
    raw = bytearray(path.read_bytes())
    start = _data_offset(path)
    raw[start + (len(raw) - start) // 2] ^= 0xFF  # one byte of some tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: checksum mismatch of"):
        load_compressed(saved)


def test_truncated_file_is_refused(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        load_compressed(saved)


def test_wrong_version_is_refused(saved):
    format2.reseal_config(saved, lambda c: c["quantization_config"].__setitem__("format_version", 99))
    with pytest.raises(CheckpointError, match=r"config\.json: ReALLM checkpoint format version 99 is not supported "
                                              r"by this reallm \(it reads versions 1 and 2\): upgrade reallm"):
        load_compressed(saved)


def test_edited_config_is_refused(saved):
    path = saved / "config.json"
    path.write_text(path.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(CheckpointError, match=r"config\.json: checksum mismatch"):
        load_compressed(saved)


def test_missing_tensor_is_refused(saved):
    path = saved / "model.safetensors"
    tensors = load_file(path)
    victim = next(k for k in tensors if k.endswith(".frozen.codes"))
    del tensors[victim]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"model.safetensors: missing tensor '{victim}'"):
        load_compressed(saved)


def test_version_1_errors_are_still_named(tmp_path):
    """A corrupted or edited directory of format 1 (reallm.json) is refused as before."""
    import shutil

    old = shutil.copytree(Path(__file__).parent / "data" / "checkpoints_v1" / "rtn3", tmp_path / "v1")
    path = old / "reallm.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"reallm\.safetensors: checksum mismatch"):
        load_compressed(old)
    meta = json.loads((old / "reallm.json").read_text())
    meta["format_version"] = 99
    format1.write_meta(old, meta)
    with pytest.raises(CheckpointError, match=r"reallm\.json: format version 99 is not supported"):
        load_compressed(old)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compressed(tmp_path / "nothing")


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    import transformers.modeling_utils as hf_modeling

    model = compressed()
    real = hf_modeling.safe_save_file

    def failing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise RuntimeError("simulated crash")  # the weights are written, then the process dies

    monkeypatch.setattr(hf_modeling, "safe_save_file", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_compressed(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(),
                    reason="../shared/models/stories260K is absent (real model not available)")
def test_stories260k_nf3_generation_deterministic_across_save_load(tmp_path):
    from transformers import AutoTokenizer

    path = SHARED / "models" / "stories260K"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    compress_(model, CompressionConfig(quantizer="nf", bits=3), progress=False)
    ids = tok("Once upon a time", return_tensors="pt").input_ids

    def greedy(m):
        with torch.no_grad():
            return m.generate(ids, max_new_tokens=30, do_sample=False)

    first = greedy(model)
    save_compressed(model, tmp_path / "ck", tokenizer=tok)
    back = load_compressed(tmp_path / "ck")
    assert torch.equal(greedy(back), first)
    assert torch.equal(greedy(back), first)


def test_dense_tensors_keep_their_stored_dtypes(tmp_path):
    """A bf16 model whose norms are kept in fp32 (as Hugging Face's _keep_in_fp32_modules does) is
    saved and restored tensor by tensor at its own dtypes, bit-exactly (defect 11.7)."""
    from tiny_models import tiny_qwen2

    model = tiny_qwen2().to(torch.bfloat16)
    for name, mod in model.named_modules():
        if name.endswith("norm"):
            mod.float()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    compress_(model, CompressionConfig(quantizer="nf", bits=3, rank=2), progress=False)
    save_compressed(model, tmp_path / "ck")
    loaded = load_compressed(tmp_path / "ck")
    state = loaded.state_dict()
    dense = {k: v for k, v in state.items() if k in reference}  # embeddings, norms, head
    assert {v.dtype for k, v in dense.items() if "norm" in k} == {torch.float32}
    assert {v.dtype for k, v in dense.items() if "norm" not in k} == {torch.bfloat16}
    for k, v in dense.items():
        assert torch.equal(v, reference[k]), k
    for name, layer in iter_reallm_layers(loaded):  # Qwen2's q/k/v biases: kept at bf16, bit-exactly
        if layer.bias is not None:
            assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, reference[f"{name}.bias"])
        assert layer.stats["orig_dtype"] == "bfloat16"
