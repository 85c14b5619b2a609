"""ReALLMLinear: DoRA identity at init, gradients only for m/A/B, training, frozen buffers intact."""

from __future__ import annotations

import pytest
import torch

from reallm import CompressionConfig, ReALLMLinear, compress_weight
from reallm.layer.matmul import FrozenMatmul


def make_layer(p=48, q=64, **cfg):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(p, q, generator=g) * 0.05
    cfg = {"quantizer": "nf", "bits": 3, "rank": 4, **cfg}
    weight = compress_weight(W, CompressionConfig(**cfg))
    bias = torch.randn(p, generator=g) * 0.01
    return W, weight, ReALLMLinear(weight, bias)


def test_initial_output_equals_decomposition():
    _, weight, layer = make_layer()
    x = torch.randn(5, 7, 64)
    ref = x @ weight.dequantize().T + layer.bias
    out = layer(x).detach()
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    # dequantize() and merge() give the same effective weight
    assert torch.allclose(layer.dequantize(), weight.dequantize(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(layer.merge()(x), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flavour", [
    dict(lowrank_init="zero"),  # QLoRA: B = 0, so the layer starts at x Q̂ᵀ
    dict(dora=False),  # plain LoRA: no magnitude
    dict(lowrank_dtype="int8"),
    dict(rank=0),
])
def test_flavours_start_at_the_decomposition(flavour):
    _, weight, layer = make_layer(**flavour)
    x = torch.randn(3, 64)
    ref = x @ weight.dequantize().T + layer.bias
    assert float((layer(x) - ref).norm() / ref.norm()) < 1e-5
    if flavour.get("dora") is False or flavour.get("rank") == 0:
        assert layer.magnitude is None
    if flavour.get("lowrank_init") == "zero":
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_only_adapters_get_gradients_and_frozen_buffers_stay_identical():
    _, weight, layer = make_layer()
    before = {k: v.clone() for k, v in layer.named_buffers()}
    params = dict(layer.named_parameters())
    assert set(params) == {"lora_A", "lora_B", "magnitude"}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, generator=g)
    # a nearby map the adapters can reach: the decomposition plus a rank-1 change
    shift = 0.05 * torch.randn(48, 1, generator=g) @ torch.randn(1, 64, generator=g)
    target = x @ (weight.dequantize() + shift).T
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x) - layer.bias, target)
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for k, v in layer.named_buffers():
        assert torch.equal(v, before[k]), f"frozen buffer {k} changed"
        assert not v.requires_grad


def test_frozen_matmul_returns_only_input_gradient():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: FrozenMatmul.apply(a, w), (x,))
    y = FrozenMatmul.apply(x, w)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(4, 3, dtype=torch.float64) @ w)


def test_mode_switch_gives_same_output():
    _, weight, layer = make_layer()
    x = torch.randn(3, 64)  # 3 tokens: a token count the kernel tests compile too
    resident = layer(x)
    assert layer._cache is None  # resident: nothing dense is kept
    layer.set_mode("cache")
    cached = layer(x)
    assert layer._cache is not None and layer._cache.shape == (48, 64)
    assert torch.allclose(cached, resident, rtol=1e-5, atol=1e-6)  # resident may take a fused kernel


def test_stored_precision_is_what_the_layer_computes_with():
    # fp16 storage: the adapters are used exactly as they would be saved
    _, _, layer = make_layer(lowrank_dtype="float16")
    with torch.no_grad():
        layer.lora_B.add_(1e-4 * torch.randn_like(layer.lora_B))  # off the fp16 grid
    x = torch.randn(3, 64)
    out = layer(x)
    stored = layer.adapter_tensors()
    clone = ReALLMLinear(layer.container(), layer.bias)
    clone.load_adapter_tensors(stored)
    assert torch.equal(clone(x), out)
