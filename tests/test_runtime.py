"""The resident runtime (issue: compressed in memory, not only on disk).

Every stored format gives the same outputs and adapter gradients in "resident" and "cache" mode and as
`dequantize()`; dtype casts never touch a stored tensor; after loading and after a training step no dense
(p, q) tensor is reachable from a resident model; loading decodes nothing; one decode per forward.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import reallm.layer.linear as dora
from reallm import CompressionConfig, compress_, load_compressed, save_compressed
from reallm.checkpoint.directory import WEIGHTS_FILE
from reallm.core.errors import UserError
from reallm.layer.linear import ReALLMLinear, iter_reallm_layers, runtime_report, set_runtime_mode
from reallm.model.surgery import mark_only_adapters_trainable
from tests.tiny_models import ALL, sample_ids

pytestmark = pytest.mark.usefixtures("single_thread")

FORMATS = {
    "fp16": dict(quantizer="none", rank=2),
    "nf3": dict(quantizer="nf", bits=3, rank=2),
    "rtn3": dict(quantizer="rtn", bits=3, rank=2, lowrank_dtype="int8"),
    "vq-perm": dict(quantizer="vq", bits=2, permute=True, permute_rows=16, rank=2,
                    options={"dim": 4, "kmeans_iters": 5}),
    "vq-rot-shared": dict(quantizer="vq", bits=3, rotation="hadamard", rank=2, magnitude_dtype="float16",
                          options={"dim": 2, "codebook_scope": "model", "kmeans_iters": 5}),
}
OLD = __import__("pathlib").Path(__file__).parent / "data" / "checkpoints_v1"


def layer_of(fmt: str, p=172, q=64, seed=0) -> ReALLMLinear:
    from reallm import compress_weight

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(p, q, generator=g) * 0.05
    layer = ReALLMLinear(compress_weight(W, CompressionConfig(**FORMATS[fmt])), torch.randn(p, generator=g) * 0.01)
    with torch.no_grad():
        layer.lora_B.add_(0.01)  # adapters away from the decomposition
    return layer


def out_and_grads(layer: ReALLMLinear, x: torch.Tensor):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.square().sum()).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_resident_and_cache_agree_with_dequantize(fmt):
    layer = layer_of(fmt)
    x = torch.randn(3, 5, 64)
    y_res, gx_res, g_res = out_and_grads(layer, x)
    assert layer._cache is None
    layer.set_mode("cache")
    y_cache, gx_cache, g_cache = out_and_grads(layer, x)
    ref = x @ layer.dequantize().T + layer.bias  # W_ft from the container, independently of the forward
    torch.testing.assert_close(y_res, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_cache, y_res, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_cache, gx_res, rtol=1e-5, atol=1e-6)
    for n in g_res:
        torch.testing.assert_close(g_cache[n], g_res[n], rtol=1e-4, atol=1e-6)


def test_autoencoder_layers_are_cached_automatically_and_reported():
    model = load_compressed(OLD / "autoencoder")
    report = runtime_report(model)
    names = [n for n, layer in iter_reallm_layers(model) if layer.config.quantizer == "autoencoder"]
    assert report["mode"] == "resident" and sorted(report["auto_cached_layers"]) == sorted(names)
    layer = dict(iter_reallm_layers(model))[names[0]]
    assert layer.decode_macs_per_weight > dora.AUTO_CACHE_MACS_PER_WEIGHT and layer.effective_mode == "cache"
    x = torch.randn(2, layer.in_features)
    y = layer(x)
    torch.testing.assert_close(y, x @ layer.dequantize().T + (layer.bias if layer.bias is not None else 0))


def test_dtype_casts_never_change_a_stored_tensor(tmp_path):
    model = ALL["llama"](0)
    compress_(model, CompressionConfig(**FORMATS["vq-rot-shared"]), progress=False)
    before = {n: t.clone() for n, t in model.named_buffers() if "frozen__" in n or "shared__" in n}
    save_compressed(model, tmp_path / "a")
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        for n, t in model.named_buffers():
            if n in before:
                assert t.dtype == before[n].dtype and torch.equal(t, before[n]), n
    for _, layer in iter_reallm_layers(model):  # the typed views keep their stored dtypes too
        stored = layer._frozen_tensors()
        assert stored["codes"].dtype == torch.uint8 and stored["scale_group_max"].dtype == torch.float32
        assert layer._shared_tensors()["codebook"].dtype == torch.float16
    save_compressed(model, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / WEIGHTS_FILE), load_file(tmp_path / "b" / WEIGHTS_FILE)
    frozen = [k for k in a if ".frozen." in k or k.startswith("reallm.shared.")]
    assert frozen and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in frozen)


def test_compute_dtype_follows_the_input():
    layer = layer_of("nf3")
    for dtype in (torch.bfloat16, torch.float32):
        y = layer(torch.randn(2, 64, dtype=dtype))
        assert y.dtype == dtype


def _reachable_tensors(model: torch.nn.Module):
    """Every tensor a model holds: parameters, their gradients, buffers, and tensors kept as attributes."""
    seen = {}
    for m in model.modules():
        for t in [*m._parameters.values(), *m._buffers.values()]:
            if t is not None:
                seen[id(t)] = t
                if getattr(t, "grad", None) is not None:
                    seen[id(t.grad)] = t.grad
        for v in vars(m).values():
            items = v if isinstance(v, tuple) else (v,)
            for t in items:
                if isinstance(t, torch.Tensor):
                    seen[id(t)] = t
    return list(seen.values())


def test_no_dense_weight_is_reachable_after_load_and_a_training_step(tmp_path):
    model = ALL["llama"](0)
    compress_(model, CompressionConfig(**FORMATS["vq-perm"]), progress=False)
    save_compressed(model, tmp_path / "ck")
    model = load_compressed(tmp_path / "ck")
    layers = dict(iter_reallm_layers(model))
    smallest = min(layer.out_features * layer.in_features for layer in layers.values())

    def dense_ones():
        return [tuple(t.shape) for t in _reachable_tensors(model)
                if t.dim() == 2 and any(tuple(t.shape) == (ly.out_features, ly.in_features) for ly in layers.values())]

    assert not dense_ones()
    mark_only_adapters_trainable(model)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = sample_ids()
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert not dense_ones()
    # and nothing compressed is larger than its stored bytes plus adapters: the biggest tensor of a layer
    for layer in layers.values():
        biggest = max(t.numel() * t.element_size() for t in _reachable_tensors(layer))
        assert biggest < 4 * smallest / 2  # well below a dense fp32 (p, q) copy of the smallest matrix
    set_runtime_mode(model, "cache")
    model(ids)
    assert dense_ones()  # the counter does see dense copies when there are some


def test_loading_decodes_nothing(tmp_path, monkeypatch):
    model = ALL["llama"](0)
    compress_(model, CompressionConfig(**FORMATS["nf3"]), progress=False)
    save_compressed(model, tmp_path / "ck")
    calls = []
    for name in ("decode_frozen", "decode_frozen_rows"):
        real = getattr(dora, name)
        monkeypatch.setattr(dora, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    back = load_compressed(tmp_path / "ck")
    assert calls == []
    assert not any(p.is_meta for p in back.parameters())
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tied again after the meta skeleton
    with torch.no_grad():
        torch.testing.assert_close(back(sample_ids()).logits, model(sample_ids()).logits)


def test_one_decode_per_forward_and_norms_cached_while_adapters_do_not_change(monkeypatch):
    layer = layer_of("nf3", p=64)
    layer.set_fast_path("off")  # the plain resident path (a fused kernel would decode nothing at all)
    tiles = []
    real = dora.decode_frozen_rows
    monkeypatch.setattr(dora, "decode_frozen_rows", lambda *a, **k: (tiles.append(a[4]), real(*a, **k))[1])
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert tiles == [0, 0]  # one tile in forward (with the norms), one in backward
    tiles.clear()
    with torch.no_grad():
        layer(x)
        layer(x)
    assert tiles == [0, 0]  # adapters unchanged since: the norms come from the cache
    tiles.clear()
    with torch.no_grad():
        layer.lora_A.add_(0.01)
        layer(x)
    assert tiles == [0]  # a changed adapter: the norms are recomputed from the same single decode


def test_bad_mode_and_too_little_memory_are_one_line(monkeypatch):
    layer = layer_of("nf3")
    layer.name = "model.layers.0.mlp.up_proj"
    with pytest.raises(UserError, match="model.layers.0.mlp.up_proj.*must be one of"):
        layer.set_mode("dense")
    layer.set_mode("cache")
    monkeypatch.setattr(dora, "_free_memory", lambda device: 1000)
    with pytest.raises(UserError, match=r"model.layers.0.mlp.up_proj: runtime mode 'cache' needs .* GiB on cpu"):
        layer(torch.randn(1, 64))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("shape", [(172, 64), (64, 172), (37, 100)])
def test_row_tiles_reassemble_the_whole_decode(fmt, shape):
    """Tiles smaller than a row, crossing scale blocks and permutation blocks, equal the one-shot decode."""
    from reallm import compress_weight
    from reallm.weight.tiling import decode_frozen_rows, row_tiles, tile_plan

    cfg = CompressionConfig(**FORMATS[fmt])
    w = compress_weight(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), cfg)
    plan = tile_plan(w.frozen, cfg, shape)
    tiles = row_tiles(shape, cfg, max_elems=1500)
    assert len(tiles) > 1 or cfg.rotation == "hadamard"
    parts = [decode_frozen_rows(w.frozen, w.meta, cfg, shape, a, b, shared=w.shared, plan=plan) for a, b in tiles]
    assert torch.equal(torch.cat(parts), w.decode_frozen())


@pytest.mark.parametrize("lowrank_dtype", ["float16", "int8"])
def test_inference_reads_stored_factors_in_place_and_trained_ones_at_storage_precision(lowrank_dtype):
    """Without a gradient, factors that hold stored values (as loaded) are used as they are, no per-call
    rounding; factors that do not (moved by training) are still rounded to their storage precision, so a
    no-grad forward always equals the training forward's output."""
    from reallm import compress_weight

    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    cfg = CompressionConfig(quantizer="nf", bits=3, rank=4, lowrank_dtype=lowrank_dtype, dora=True,
                            magnitude_dtype="float16")
    layer = ReALLMLinear(compress_weight(W, cfg))
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x)
        B, A = layer._factors()
    assert B is layer.lora_B and A is layer.lora_A  # stored values, checked once: no copy per call
    with torch.no_grad():
        layer.lora_B.add_(1e-4 * torch.randn_like(layer.lora_B))  # between storage levels now
        B, A = layer._factors()
    assert B is not layer.lora_B and not torch.equal(B, layer.lora_B)
    from reallm.ops.precision import fake_store

    assert torch.equal(B, fake_store(layer.lora_B.detach(), lowrank_dtype))
    with torch.no_grad():
        y_inference = layer(x)
    assert torch.equal(y_inference, layer(x).detach())  # the gradient-enabled (training) forward
