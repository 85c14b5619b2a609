"""Model surgery on tiny HF models: compress_, filters, per-layer configs, adapters-only training."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ALL, sample_ids, tiny_gpt2, tiny_llama
from torch import nn

from reallm import (
    CompressionConfig,
    ReALLMLinear,
    UnsupportedModelError,
    bits_report,
    compress_,
    iter_reallm_layers,
    mark_only_adapters_trainable,
)

N_LINEARS = {"llama": 7, "mistral": 7, "qwen2": 7, "gpt2": 4}


def logits_error(original, compressed, ids):
    with torch.no_grad():
        a = original(ids).logits
        b = compressed(ids).logits
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("arch", sorted(ALL))
def test_logits_close_at_8_bits_and_degrade_monotonically(arch):
    ids = sample_ids()
    original = ALL[arch]()
    errors = {}
    for bits in (8, 4, 3, 2):
        model = ALL[arch]()
        compress_(model, CompressionConfig(quantizer="nf", bits=bits), progress=False)
        layers = dict(iter_reallm_layers(model))
        assert len(layers) == 2 * N_LINEARS[arch]
        errors[bits] = logits_error(original, model, ids)
    # bound at 8 bits (NF8): relative logits error below 2.5% (measured 1.1–1.5% on these random
    # tiny models; NF4 7–9%, NF3 16–20%, NF2 43–65%)
    assert errors[8] < 0.025, errors
    assert errors[8] < errors[4] < errors[3] < errors[2], errors


def test_embeddings_and_head_are_never_compressed_by_default():
    model = tiny_llama()
    compress_(model, CompressionConfig(quantizer="nf", bits=4), progress=False)
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    names = [n for n, _ in iter_reallm_layers(model)]
    assert all(n.startswith("model.layers.") for n in names)


def test_per_layer_configs_and_filter():
    model = tiny_llama()
    spec = {"*.self_attn.*": CompressionConfig(quantizer="nf", bits=4),
            "*.mlp.down_proj": CompressionConfig(quantizer="rtn", bits=3),
            "*": None}
    compress_(model, spec, filter_fn=lambda n, m: ".layers.0." in n, progress=False)
    layers = dict(iter_reallm_layers(model))
    assert set(layers) == {f"model.layers.0.self_attn.{k}_proj" for k in "qkvo"} | {
        "model.layers.0.mlp.down_proj"}
    assert layers["model.layers.0.mlp.down_proj"].config.quantizer == "rtn"
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)


def test_gpt2_conv1d_layers_are_handled():
    original = tiny_gpt2()
    model = tiny_gpt2()
    compress_(model, CompressionConfig(quantizer="nf", bits=8), progress=False)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, ReALLMLinear) and layer.layout == "conv1d"
    assert (layer.out_features, layer.in_features) == (192, 64)
    assert logits_error(original, model, sample_ids()) < 0.025


def test_mark_only_adapters_trainable_and_grads():
    model = tiny_llama()
    compress_(model, CompressionConfig(quantizer="nf", bits=3, rank=4), progress=False)
    n = mark_only_adapters_trainable(model)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert n > 0 and trainable and all(k.rsplit(".", 1)[1] in {"lora_A", "lora_B", "magnitude"}
                                       for k in trainable)
    out = model(sample_ids(), labels=sample_ids())
    out.loss.backward()
    for k, p in model.named_parameters():
        assert (p.grad is not None) == (k in trainable), k


def test_bits_report_against_original():
    original = tiny_llama()
    model = tiny_llama()
    compress_(model, CompressionConfig(quantizer="nf", bits=3), progress=False)
    rep = bits_report(model, original)
    assert len(rep["matrices"]) == 14
    for m in rep["matrices"]:
        assert 0.05 < m["rel_frobenius_error"] < 0.3
        assert m["rel_frobenius_error"] == pytest.approx(
            dict(iter_reallm_layers(model))[m["name"]].stats["rel_frobenius_error"], rel=1e-5)
    assert 3.0 < rep["decoder_linears"] < 3.2
    # whole model: embeddings (tied head counted once) and norms at fp32 raise the average
    assert rep["decoder_linears"] < rep["whole_model"] < 32


def test_unsupported_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="no list of decoder blocks"):
        compress_(nn.Sequential(nn.Linear(4, 4)), CompressionConfig(quantizer="nf", bits=4))


def test_shared_codebook_across_model():
    model = tiny_llama()
    cfg = CompressionConfig(quantizer="vq", bits=2, options={"dim": 4, "codebook_scope": "model", "kmeans_iters": 10})
    compress_(model, cfg, progress=False)
    layers = [layer for _, layer in iter_reallm_layers(model)]
    books = [layer.container().shared["codebook"] for layer in layers]
    assert all(torch.equal(b, books[0]) for b in books)
    rep = bits_report(model)
    total_codebook = sum(m["items"]["codebook"] for m in rep["matrices"])
    assert total_codebook == pytest.approx(256 * 4 * 16)  # one codebook, divided among all
