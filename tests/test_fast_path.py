"""Dispatch of the fused kernels in ReALLMLinear (issue 13): small token counts without a gradient take
the fastest path serving the format, the same numbers as the plain path; training keeps the plain path;
greedy generation of stories260K gives the same tokens with and without the fast path."""

from __future__ import annotations

import pytest
import torch

from reallm import CompressionConfig, compress_, compress_weight
from reallm.layer.kernels import available_paths
from reallm.layer.linear import ReALLMLinear, runtime_report, set_runtime_mode

pytestmark = pytest.mark.usefixtures("single_thread")


def layer(quantizer="vq", **kw) -> ReALLMLinear:
    g = torch.Generator().manual_seed(0)
    options = {"kmeans_iters": 5, **kw.pop("options", {})} if quantizer == "vq" else {}
    cfg = CompressionConfig(quantizer=quantizer, bits=kw.pop("bits", 3), rank=2, options=options, **kw)
    lay = ReALLMLinear(compress_weight(torch.randn(128, 192, generator=g) * 0.05, cfg), torch.randn(128) * 0.01)
    with torch.no_grad():
        lay.lora_B.add_(0.01)
    return lay


def cpu_fast_paths(cfg, shape, n=1):
    return [p for p in available_paths(cfg, "cpu", torch.float32, n, shape) if p != "decode"]


@pytest.mark.parametrize("kw", [dict(quantizer="vq", options={"dim": 2}), dict(quantizer="nf"),
                                dict(quantizer="vq", options={"dim": 2}, permute=True, permute_rows=32)])
def test_small_batches_without_grad_take_a_kernel_with_the_plain_paths_numbers(kw):
    lay = layer(**kw)
    if not cpu_fast_paths(lay.config, (128, 192)):
        pytest.skip("no fused CPU path on this machine (numba missing and no AVX-512)")
    x = torch.randn(1, 3, 192)  # 3 tokens
    with torch.no_grad():
        fast = lay(x)
        assert lay.last_path in ("cpu", "cpu_avx512")
        lay.set_fast_path("off")
        plain = lay(x)
        assert lay.last_path == "decode"
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=2e-6)


def test_training_and_many_tokens_keep_the_plain_path():
    lay = layer(quantizer="nf")
    lay(torch.randn(2, 192, requires_grad=True)).sum().backward()  # a gradient to x: the kernels have none
    assert lay.last_path == "decode"
    with torch.no_grad():
        lay(torch.randn(64, 192))  # 64 tokens: no kernel serves that many
    assert lay.last_path == "decode"


def test_formats_without_a_table_kernel_and_small_cached_matrices_use_the_plain_path():
    lay = layer(quantizer="rtn")
    with torch.no_grad():
        lay(torch.randn(1, 192))
    assert lay.last_path == "decode"
    lay = layer(quantizer="nf")
    lay.set_mode("cache")
    with torch.no_grad():
        lay(torch.randn(1, 192))
    assert lay.last_path == "cache"  # 128 × 192 is below KERNEL_MIN_WEIGHTS_WITH_CACHE


def test_greedy_generation_is_the_same_with_and_without_the_fast_path(shared_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_dir / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    compress_(model, CompressionConfig(quantizer="vq", bits=3,
                                       options={"dim": 2, "codebook_scope": "model", "kmeans_iters": 20}),
              progress=False)
    model.eval()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = {}
    for mode, fast in (("resident", "auto"), ("resident", "off"), ("cache", "auto")):
        set_runtime_mode(model, mode, fast_path=fast)
        key = fast if mode == "resident" else mode
        with torch.no_grad():
            out[key] = model.generate(ids, max_new_tokens=24, do_sample=False)
        out[key + "_paths"] = runtime_report(model)["last_paths"]
    assert torch.equal(out["auto"], out["off"]) and torch.equal(out["cache"], out["off"])  # every mode generates
    assert out["off_paths"] == ["decode"] and out["cache_paths"] == ["cache"]
    if any(cpu_fast_paths(m.config, (m.out_features, m.in_features)) for m in model.modules()
           if isinstance(m, ReALLMLinear)):
        assert set(out["auto_paths"]) & {"cpu", "cpu_avx512"}  # some layers did use a kernel
