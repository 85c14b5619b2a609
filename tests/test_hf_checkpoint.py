"""ReALLM checkpoints are Hugging Face directories (format 2, issue 16): `save_pretrained` writes them,
`AutoModelForCausalLM.from_pretrained` loads them after `import reallm` (or with trust_remote_code), with
identical logits for every architecture layout and every stored format; shards, generation, pipelines,
older directories, and bad input (one line, nothing loaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_codec_contract import MADE_ELSEWHERE, ROWS
from tiny_models import ALL, sample_ids, word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import reallm.checkpoint.compressed as ckpt
from reallm import CheckpointError, CompressionConfig, compress_, iter_reallm_layers, load_compressed, save_compressed
from reallm.checkpoint.directory import checkpoint_version, read_meta
from reallm.checkpoint.format2 import reseal_config
from reallm.formats import names

ROOT = Path(__file__).resolve().parents[1]
OLD = Path(__file__).parent / "data" / "checkpoints_v1"
STORIES = (ROOT / ".." / "shared" / "models" / "stories260K").resolve()
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K is absent")


def logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


def compressed(arch="llama", cfg: CompressionConfig | None = None):
    model = ALL[arch]()
    compress_(model, cfg or CompressionConfig(quantizer="nf", bits=3, rank=2), progress=False)
    with torch.no_grad():  # adapters away from their initial values, as after fine-tuning
        for _, layer in iter_reallm_layers(model):
            if layer.rank:
                layer.lora_B.add_(0.01)
    return model


def layer_names(model) -> set[str]:
    return {name for name, _ in iter_reallm_layers(model)}


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ALL))
def test_save_pretrained_from_pretrained_identical_logits(arch, tmp_path):
    """Llama, Mistral, Qwen2 (biases) and GPT-2 (Conv1D, tied head): a model from compress_ saved with the
    plain transformers call loads back with from_pretrained as the same model class, bit-identical; the
    loaded model saves itself again; load_compressed reads the same directory."""
    model = compressed(arch)
    ref = logits(model)
    model.save_pretrained(tmp_path / "ck")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert type(back) is type(model) and layer_names(back) == layer_names(model)
    assert torch.equal(logits(back), ref)
    assert torch.equal(logits(load_compressed(tmp_path / "ck")), ref)
    back.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), ref)
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "reallm" and qc["format_version"] == 2 and set(qc["layers"]) == layer_names(model)


def test_every_stored_format_is_covered():
    """Every format of the registry is round-tripped below: the contract rows, and the autoencoder (made by
    its training phase) from its format-1 checkpoint."""
    assert {row[0].quantizer for row in ROWS.values()} | MADE_ELSEWHERE == set(names())
    assert MADE_ELSEWHERE <= {rec["config"]["quantizer"] for d in OLD.iterdir() if d.is_dir()
                              for rec in read_meta(d)["layers"].values()}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_stored_format_round_trips(row, tmp_path, single_thread):
    cfg, *_ = ROWS[row]
    if hasattr(cfg.options, "kmeans_iters"):  # the formats that fit codebooks by k-means (vq, additive)
        cfg = cfg.with_options(kmeans_iters=min(cfg.options.kmeans_iters, 5))
    model = compressed("llama", cfg)
    ref = logits(model)
    model.save_pretrained(tmp_path / "ck")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), ref)


@pytest.mark.parametrize("name", sorted(p.name for p in OLD.iterdir() if p.is_dir()))
def test_format_1_directories_load_and_resave_as_format_2(name, tmp_path, single_thread):
    """Older directories keep loading (load_compressed), and `save_pretrained` turns them into format 2 that
    computes exactly what the loaded directory computes. The logits they were written with were computed on
    another CPU: within 1e-6 here (tests/test_checkpoint_compat.py says why)."""
    expected = load_file(OLD / f"{name}.expected_logits.safetensors")["logits"]
    old = load_compressed(OLD / name)
    before = logits(old)
    torch.testing.assert_close(before, expected, rtol=0, atol=1e-6)
    old.save_pretrained(tmp_path / "ck")
    assert checkpoint_version(tmp_path / "ck") == 2
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), before)


def test_sharded_save_of_a_model_above_the_shard_size(tmp_path):
    model = compressed("qwen2")
    ref = logits(model)
    model.save_pretrained(tmp_path / "ck", max_shard_size="30KB")
    shards = sorted((tmp_path / "ck").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sum(p.stat().st_size for p in shards) > 3 * 30_000
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), ref)
    assert torch.equal(logits(load_compressed(tmp_path / "ck")), ref)
    # a compressed layer's tensors may sit in any shard: every one is found through the index
    layer_files = {index["weight_map"][k] for k in index["weight_map"] if ".frozen." in k}
    assert len(layer_files) >= 2


def test_save_compressed_directory_and_adapter_sets(tmp_path):
    """save_compressed: tokenizer, loader module and model card beside what save_pretrained writes; a named
    adapter set is a file of its own that load_compressed(adapters=) applies (and nothing else changes)."""
    model = compressed()
    ref = logits(model)
    ck = save_compressed(model, tmp_path / "ck", tokenizer=word_tokenizer(), base_model="org/base")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            "configuration_reallm.py"} <= {p.name for p in ck.iterdir()}
    config = json.loads((ck / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_reallm.ReALLMAutoConfig"}
    assert config["quantization_config"]["base_model"] == "org/base"
    assert "auto_map" not in model.config.to_dict()  # the next plain save_pretrained does not point to it
    name = "model.layers.0.mlp.up_proj"
    before = model.get_submodule(name).magnitude.detach().clone()
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.magnitude.mul_(1.1)
    ckpt.save_adapters(model, ck, "task_b")
    assert torch.equal(logits(load_compressed(ck)), ref)
    assert torch.equal(logits(load_compressed(ck, adapters="task_b")), logits(model))
    assert torch.equal(ckpt.load_layer(ck, name).magnitude, before)
    assert torch.equal(ckpt.load_layer(ck, name, adapters="task_b").magnitude, model.get_submodule(name).magnitude)
    with pytest.raises(CheckpointError, match="no adapter set 'nope'"):
        load_compressed(ck, adapters="nope")
    with pytest.raises(CheckpointError, match="default adapter set is part of the weights"):
        ckpt.save_adapters(model, ck, "default")


def test_stored_dtypes_are_kept_and_an_explicit_dtype_casts(tmp_path):
    """dtype "auto" (the default) keeps every tensor's stored dtype (fp32 norms of a bf16 model stay fp32);
    an explicit other dtype casts the dense tensors as for any model; compressed layers keep theirs."""
    model = ALL["qwen2"]().to(torch.bfloat16)
    for name, mod in model.named_modules():
        if name.endswith("norm"):
            mod.float()
    compress_(model, CompressionConfig(quantizer="nf", bits=3, rank=2), progress=False)
    model.save_pretrained(tmp_path / "ck")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    reference, loaded = model.state_dict(), auto.state_dict()
    assert reference.keys() == loaded.keys()
    for k, v in reference.items():  # norms fp32, the rest bf16, compressed layers' buffers: all bit-exact
        assert v.dtype == loaded[k].dtype and torch.equal(v, loaded[k]), k
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert fp32.model.embed_tokens.weight.dtype == torch.float32
    for (_, a), (_, b) in zip(iter_reallm_layers(fp32), iter_reallm_layers(model)):
        assert a.bias.dtype == b.bias.dtype == torch.bfloat16 if b.bias is not None else a.bias is None


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories_checkpoint(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent")
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    compress_(model, CompressionConfig(quantizer="nf", bits=3), progress=False)
    return save_compressed(model, tmp_path_factory.mktemp("stories") / "reallm",
                           tokenizer=AutoTokenizer.from_pretrained(STORIES), base_model=str(STORIES))


def test_generate_and_pipeline_greedy_equal_load_compressed(stories_checkpoint):
    from transformers import pipeline

    tok = AutoTokenizer.from_pretrained(stories_checkpoint)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    direct = load_compressed(stories_checkpoint).generate(ids, max_new_tokens=30, do_sample=False)
    hf = AutoModelForCausalLM.from_pretrained(stories_checkpoint).generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(hf, direct) and direct.shape[1] == ids.shape[1] + 30
    pipe = pipeline("text-generation", model=str(stories_checkpoint), device="cpu")
    assert type(pipe.model.model.layers[0].self_attn.q_proj).__name__ == "ReALLMLinear"
    text = pipe("Once upon a time", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(direct[0], skip_special_tokens=True)


def test_trust_remote_code_loads_in_a_process_without_reallm(stories_checkpoint, tmp_path, single_thread):
    """`trust_remote_code=True`: the checkpoint's loader module imports reallm (registering the quantizer);
    the program itself never imports it."""
    code = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
            "assert 'reallm' not in sys.modules\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "ids = torch.arange(2, 34).reshape(2, 16)\n"
            "with torch.no_grad(): torch.save(m(ids).logits, sys.argv[2])\n"
            "print(type(m).__name__, type(m.model.layers[0].mlp.up_proj).__name__)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(stories_checkpoint), str(tmp_path / "logits.pt")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LlamaForCausalLM", "ReALLMLinear"]
    ids = torch.arange(2, 34).reshape(2, 16)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits(load_compressed(stories_checkpoint), ids))


# ------------------------------------------------------------------------------------------------
# bad input: one line, nothing loaded
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    model = compressed("llama")
    model.save_pretrained(tmp_path / "ck", max_shard_size="60KB")
    return tmp_path / "ck"


def _refused(directory, match: str) -> None:
    """Both loaders refuse it with one line; the process state is as before (default dtype)."""
    dtype = torch.get_default_dtype()
    for load in (lambda: AutoModelForCausalLM.from_pretrained(directory), lambda: load_compressed(directory)):
        with pytest.raises(CheckpointError, match=match) as e:
            load()
        assert "\n" not in str(e.value)
    assert torch.get_default_dtype() == dtype


def test_newer_format_version(saved):
    reseal_config(saved, lambda c: c["quantization_config"].__setitem__("format_version", 3))
    _refused(saved, r"format version 3 is not supported by this reallm \(it reads versions 1 and 2\): upgrade reallm")


def test_missing_shard(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _refused(saved, f"{shard.name}: missing")


def test_mismatched_digest(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if k.endswith("self_attn.q_proj.frozen.codes"))
    path = saved / index[key]
    tensors = load_file(path)
    tensors[key] = tensors[key].clone()
    tensors[key][0] ^= 1  # one bit of one layer's codes; the file itself is a valid safetensors file
    save_file(tensors, path, metadata={"format": "pt"})
    _refused(saved, r"checksum mismatch of the stored tensors of layer 'model\.layers\.\d\.self_attn\.q_proj'")


def test_a_model_type_the_surgery_cannot_rebuild(saved):
    def as_gpt2(config):
        config["model_type"], config["architectures"] = "gpt2", ["GPT2LMHeadModel"]

    reseal_config(saved, as_gpt2)
    _refused(saved, r"layer 'model\.layers\.0\.\w+\.\w+' does not exist in GPT2LMHeadModel \(model type 'gpt2'\): "
                    r"this checkpoint cannot be rebuilt in that architecture")


def test_an_edited_config_is_refused(saved):
    path = saved / "config.json"
    path.write_text(path.read_text().replace('"rope_theta": 10000.0', '"rope_theta": 10001.0'))
    _refused(saved, r"config\.json: checksum mismatch")


def test_an_unknown_model_type_is_one_line_through_load_compressed(saved):
    reseal_config(saved, lambda c: c.__setitem__("model_type", "no_such_model"))
    with pytest.raises(CheckpointError, match="cannot be loaded by transformers") as e:
        load_compressed(saved)
    assert "\n" not in str(e.value)


def test_unexpected_tensor_is_refused(saved):
    path = sorted(saved.glob("model-*.safetensors"))[0]
    tensors = load_file(path)
    tensors["model.intruder"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    _refused(saved, "unexpected tensor 'model.intruder'")


def test_copy_keeps_loading(saved, tmp_path):
    """Nothing in a checkpoint depends on where it is (the Hub's snapshot directories are copies)."""
    copy = shutil.copytree(saved, tmp_path / "elsewhere")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(copy)), logits(load_compressed(saved)))


@pytest.mark.parametrize("order", ["reallm first", "transformers first"])
def test_import_reallm_registers_the_method_in_either_order(order):
    """`import reallm` does not import transformers' quantizer registry (seconds of imports a light command
    does not need) yet the method is registered whenever the registry is imported, before or after."""
    first, second = "import reallm", "import transformers.quantizers.auto as auto"
    if order == "transformers first":
        first, second = second, first
    code = (f"import sys\n{first}\n"
            "lazy = 'transformers.quantizers.auto' not in sys.modules\n"
            f"{second}\n"
            "import transformers.quantizers.auto as auto\n"
            "print(lazy, auto.AUTO_QUANTIZER_MAPPING['reallm'].__name__,\n"
            "      auto.AUTO_QUANTIZATION_CONFIG_MAPPING['reallm'].__name__)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lazy = "True" if order == "reallm first" else "False"
    assert proc.stdout.split() == [lazy, "ReALLMHfQuantizer", "ReALLMConfig"]


def test_fine_tuned_checkpoint_checks_its_frozen_part_against_the_source(tmp_path):
    """save_compressed(frozen_from=): the source may be of either format; a changed frozen tensor is refused
    (fine-tuning changes only the adapters) and nothing is written."""
    model = load_compressed(OLD / "nf3_svd_int8")
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.lora_B.add_(0.01)
    first = save_compressed(model, tmp_path / "ft1", frozen_from=OLD / "nf3_svd_int8")
    second = save_compressed(model, tmp_path / "ft2", frozen_from=first)
    assert ckpt.frozen_digests(second) == ckpt.frozen_digests(first) == ckpt.frozen_digests(OLD / "nf3_svd_int8")
    assert read_meta(second)["extra"]["frozen_from"]["checkpoint"] == str(first)
    name, layer = next(iter(iter_reallm_layers(model)))
    layer._buffers["frozen__scale_codes"][0] ^= 1
    with pytest.raises(CheckpointError, match=f"the frozen part of layer '{name}' differs from the one in"):
        save_compressed(model, tmp_path / "ft3", frozen_from=first)
    assert not (tmp_path / "ft3").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dequantize_gives_a_plain_model(arch, tmp_path):
    """transformers' `model.dequantize()`: every compressed linear becomes an nn.Linear holding its effective
    weight; the model computes what it computed and is no longer a quantized model."""
    model = compressed(arch)
    model.save_pretrained(tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    ref = logits(loaded)
    plain = loaded.dequantize()
    assert not list(iter_reallm_layers(plain)) and getattr(plain, "hf_quantizer", None) is None
    assert "quantization_config" not in plain.config.to_dict()
    assert float((logits(plain) - ref).abs().max()) < 1e-4
    plain.save_pretrained(tmp_path / "dense")
    assert float((logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")) - ref).abs().max()) < 1e-4
