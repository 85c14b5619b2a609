"""Format-2 checkpoints written before the package's files moved (issue 20) still load, and compute what they
computed.

`tests/data/checkpoints_v2/` holds one tiny Hugging Face checkpoint directory per stored format, written by the
code of commit 7fcab89 (`save_compressed`, or the plain `model.save_pretrained`; see `generate.py` there), with
the logits that code computed for `sample_ids()` and its bit accounting (`expected_bits.json`). Only the public
API is used here (`import reallm`, transformers' loader), so that the test does not depend on where the package
keeps its modules; the directories' own config.json is read as the file format it is.

Logits are compared bit for bit (torch.equal, one thread) on the kind of machine that wrote them
(`environment.json`: torch version, CPU, its kernels). Elsewhere the same code computes logits a few ulps away
(MKL and torch pick their kernels per CPU: the format-1 set, written on another CPU, is 2.4e-7 to 3.6e-7 away
on an AVX2 AMD EPYC, and forcing other kernels on the writing machine moves float32 logits by ≤ 1.2e-7 and the
bfloat16 ones by one bfloat16 ulp), so they are compared within `TOLERANCE` there, and
`test_logits_are_compared_bit_for_bit` is skipped saying so.
"""

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reallm import CompressionConfig, ReALLMLinear, bits_report, iter_reallm_layers, load_compressed
from tests.tiny_models import sample_ids

DATA = Path(__file__).parent / "data" / "checkpoints_v2"
NAMES = sorted(p.name for p in DATA.iterdir() if (p / "config.json").is_file())  # not caches
# the stored formats registered at commit 7fcab89; formats added later have no format-2 directory from then
FORMATS = {"none", "nf", "rtn", "vq", "autoencoder", "additive", "e8p"}
# "<name>.<adapter set>.expected_logits.safetensors": the logits of a named adapter set of a checkpoint
ADAPTER_SETS = sorted(tuple(p.name.split(".")[:2]) for p in DATA.glob("*.expected_logits.safetensors")
                      if p.name.count(".") == 3)


# float32 / bfloat16 logits of the same code on another CPU: a few ulps (at |logit| < 1), see the docstring
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-8}


def environment() -> dict:
    """What decides the float arithmetic besides the code (as generate.py records it in environment.json)."""
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line
                    and line.split(":", 1)[0].strip() in ("vendor_id", "model name"))
        cpu = " / ".join(v.strip() for _, v in sorted(info.items()))
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpu": cpu,
            "mkl": {k: os.environ.get(k) for k in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")}}


WRITTEN_ON = json.loads((DATA / "environment.json").read_text())
SAME_ARITHMETIC = environment() == WRITTEN_ON


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if SAME_ARITHMETIC:
        assert torch.equal(actual, expected)  # same decode, same arithmetic: bit-identical
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE[expected.dtype])


def quantization_config(name: str) -> dict:
    return json.loads((DATA / name / "config.json").read_text())["quantization_config"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_ids()).logits


def expected_logits(name: str, adapters: str = "default") -> torch.Tensor:
    stem = name if adapters == "default" else f"{name}.{adapters}"
    return load_file(DATA / f"{stem}.expected_logits.safetensors")["logits"]


def test_logits_are_compared_bit_for_bit():
    if not SAME_ARITHMETIC:
        pytest.skip(f"the logits were computed on {WRITTEN_ON}, this is {environment()}: they are compared within "
                    f"{TOLERANCE[torch.float32]} (float32) and {TOLERANCE[torch.bfloat16]} (bfloat16), not bit for bit")


def test_every_stored_format_has_a_format_2_checkpoint():
    """Every format of then has a directory, and today's code still knows every stored config (a format may be
    added, never dropped: its checkpoints must keep loading)."""
    quantizers = set()
    for name in NAMES:
        qc = quantization_config(name)
        assert qc["quant_method"] == "reallm" and qc["format_version"] == 2, name
        for rec in qc["layers"].values():
            quantizers.add(CompressionConfig.from_dict(rec["config"]).quantizer)
    assert quantizers == FORMATS


def test_the_fixtures_cover_what_generate_py_says():
    """The layouts and options the directories were written with (a regenerated set must keep them)."""
    qcs = {name: quantization_config(name) for name in NAMES}
    records = [rec for qc in qcs.values() for rec in qc["layers"].values()]
    configs = [rec["config"] for rec in records]
    assert {rec["layout"] for rec in records} == {"linear", "conv1d"}  # GPT-2's Conv1D
    assert any(c["lowrank_dtype"] == "int8" and c["rank"] for c in configs)
    assert any(c["dora"] and c["rank"] for c in configs) and any(not c["dora"] and c["rank"] for c in configs)
    assert any(c["rank"] == 0 for c in configs)
    assert any(c["quantizer"] == "vq" and c["permute"] and c["rotation"] == "hadamard" and c["rank"]
               and c["codebook_scope"] == "model" for c in configs)
    assert any(qc["shared"] for qc in qcs.values())  # tensors stored once for several layers
    assert any(rec["bias"] for rec in records)
    assert {qc["dtype"] for qc in qcs.values()} >= {"float32", "bfloat16"}
    assert any((DATA / n / "model.safetensors.index.json").is_file() for n in NAMES)  # shards
    assert any(not (DATA / n / "configuration_reallm.py").is_file() for n in NAMES)  # plain save_pretrained
    assert ADAPTER_SETS and all(s in qcs[n]["adapter_sets"] for n, s in ADAPTER_SETS)


@pytest.mark.parametrize("name", NAMES)
def test_format_2_checkpoint_loads_with_the_same_logits(name, single_thread):
    """`load_compressed`: the same compressed layers, bit-identical logits (one thread, as when they were
    written: the same decode and the same arithmetic)."""
    model = load_compressed(DATA / name)
    layers = dict(iter_reallm_layers(model))
    assert set(layers) == set(quantization_config(name)["layers"])
    assert all(isinstance(layer, ReALLMLinear) for layer in layers.values())
    assert_same_logits(logits(model), expected_logits(name))


@pytest.mark.parametrize("name", NAMES)
def test_format_2_checkpoint_from_pretrained_gives_the_same_logits(name, single_thread):
    """transformers' own loader (after `import reallm`), as any Hugging Face model: bit-identical too."""
    model = AutoModelForCausalLM.from_pretrained(DATA / name)
    assert {n for n, _ in iter_reallm_layers(model)} == set(quantization_config(name)["layers"])
    assert_same_logits(logits(model.eval()), expected_logits(name))


@pytest.mark.parametrize("name,adapters", ADAPTER_SETS)
def test_named_adapter_set_loads_with_the_same_logits(name, adapters, single_thread):
    model = load_compressed(DATA / name, adapters=adapters)
    assert_same_logits(logits(model), expected_logits(name, adapters))
    default = logits(load_compressed(DATA / name))
    assert float((default - expected_logits(name, adapters)).abs().max()) > 1e-3  # the set changes the model


@pytest.mark.parametrize("name", NAMES)
def test_format_2_checkpoint_bits_are_the_recorded_ones(name):
    """The bit accounting of today's code equals what was recorded at writing time (expected_bits.json) and
    what the checkpoint says about each of its layers (config.json)."""
    expected = json.loads((DATA / "expected_bits.json").read_text())[name]
    records = quantization_config(name)["layers"]
    report = bits_report(load_compressed(DATA / name))
    matrices = {m["name"]: m for m in report["matrices"]}
    assert set(matrices) == set(expected["matrices"]) == set(records)
    assert report["decoder_linears"] == pytest.approx(expected["decoder_linears"], rel=1e-12)
    assert report["whole_model"] == pytest.approx(expected["whole_model"], rel=1e-12)
    for layer, m in matrices.items():
        assert m["bits"] == pytest.approx(expected["matrices"][layer]["bits"], rel=1e-12)
        assert m["items"] == pytest.approx(expected["matrices"][layer]["items"], rel=1e-12)
        rec = records[layer]["bits"]
        assert m["bits"] == pytest.approx(rec["per_weight"], rel=1e-12)
        assert m["items"] == pytest.approx({k: v for k, v in rec.items() if k not in ("total", "per_weight")},
                                           rel=1e-12)
