"""reallm.weight.store.WeightStore: a compressed matrix and its stats survive the disk bit-exactly; what is
missing, half-written, or written for another layer or configuration reads as missing."""

from __future__ import annotations

import pytest
import torch

from reallm import CompressionConfig, compress_weight
from reallm.model.surgery import fit_shared_tensors
from reallm.weight.store import WeightStore


def _weight(seed: int = 0, **cfg):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 128, generator=g)
    config = CompressionConfig(**{"quantizer": "nf", "bits": 3, "rank": 2, **cfg})
    return W, config, compress_weight(W, config, name="layers.0.q")


def test_round_trip_is_bit_exact(tmp_path):
    W, config, weight = _weight()
    store = WeightStore(tmp_path / "partial")
    store.save(3, "layers.0.q", weight, {"rel_frobenius_error": 0.25}, config.key())
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == ["00003.json", "00003.safetensors"]
    assert store.has(3, "layers.0.q") and store.has(3, "layers.0.q", config.key())
    back, stats = store.load(3, "layers.0.q", config.key())
    assert stats == {"rel_frobenius_error": 0.25}
    assert back.config == config and back.shape == weight.shape and back.meta == weight.meta
    for part in ("frozen", "lowrank"):
        a, b = getattr(weight, part), getattr(back, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert torch.equal(back.dequantize(), weight.dequantize())


def test_shared_tensors_are_kept(tmp_path):
    """A matrix of a model-wide VQ codebook keeps the codebook (and the share it is charged)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 64, generator=g)
    config = CompressionConfig(quantizer="vq", bits=2, options={"dim": 2, "codebook_scope": "model", "kmeans_iters": 3})
    layer = torch.nn.Linear(64, 64, bias=False)
    ((tensors, _),) = fit_shared_tensors([("a", layer, config)], progress=False).values()
    weight = compress_weight(W, config, name="a", shared=tensors, shared_numel=3 * W.numel())
    store = WeightStore(tmp_path)
    store.save(0, "a", weight, {})
    back, _ = store.load(0, "a")
    assert back.shared.keys() == weight.shared.keys() and back.meta["shared_numel"] == 3 * W.numel()
    assert back.bits()["total"] == pytest.approx(weight.bits()["total"])
    assert torch.equal(back.dequantize(), weight.dequantize())


def test_missing_foreign_or_half_written_is_missing(tmp_path):
    _, config, weight = _weight()
    store = WeightStore(tmp_path)
    assert store.load(0, "layers.0.q") is None and not store.has(0, "layers.0.q")  # nothing yet
    store.save(0, "layers.0.q", weight, {}, config.key())
    assert store.load(0, "layers.0.k") is None  # another layer at that index
    assert store.load(0, "layers.0.q", config.replace(bits=4).key()) is None  # another configuration
    assert store.load(0, "layers.0.q") is not None  # no key asked: any configuration

    (tmp_path / "00000.json").write_text('{"name": "layers.0.q", "cont')  # cut short
    assert store.load(0, "layers.0.q") is None and not store.has(0, "layers.0.q")
    store.save(0, "layers.0.q", weight, {})
    raw = (tmp_path / "00000.safetensors").read_bytes()
    (tmp_path / "00000.safetensors").write_bytes(raw[: len(raw) // 2])  # tensors cut short
    assert store.load(0, "layers.0.q") is None
    (tmp_path / "00000.safetensors").unlink()  # the JSON alone does not count
    assert not store.has(0, "layers.0.q") and store.load(0, "layers.0.q") is None
