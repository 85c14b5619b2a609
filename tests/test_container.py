"""The weight container: bit accounting by hand, configs refused, low-rank and shared codebooks.
(The contract every stored format fulfils is tests/test_codec_contract.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from reallm import CompressionConfig, CompressionError, compress_weight


def gaussian(p, q, seed=0):
    return torch.randn(p, q, generator=torch.Generator().manual_seed(seed)) * 0.02


# --- bit accounting by hand -----------------------------------------------------------------
def test_bits_nf3_by_hand():
    w = compress_weight(gaussian(64, 128), CompressionConfig(quantizer="nf", bits=3))
    b = w.bits()
    n = 64 * 128
    assert b["codes"] == n * 3  # 8192 codes × 3 bits, packed exactly into 3072 bytes
    n_blocks = n // 64
    assert b["scales"] == n_blocks * 8 + 32 * math.ceil(n_blocks / 256) + 32
    assert b["total"] == n * 3 + 128 * 8 + 32 + 32
    assert b["per_weight"] == pytest.approx(25664 / 8192)  # 3.1328


def test_bits_vq_2bit_d4_by_hand():
    cfg = CompressionConfig(quantizer="vq", bits=2, options={"dim": 4, "kmeans_iters": 5})
    w = compress_weight(gaussian(128, 256), cfg)
    b = w.bits()
    n = 128 * 256
    assert b["codes"] == (n // 4) * 8
    assert b["codebook"] == 256 * 4 * 16
    assert b["scales"] == (n // 64) * 8 + 2 * 32 + 32
    assert b["per_weight"] == pytest.approx((65536 + 16384 + 4192) / n)  # 2.628


def test_bits_rtn3_lowrank_permutation_by_hand():
    cfg = CompressionConfig(quantizer="rtn", bits=3, rank=8, permute=True, lowrank_dtype="float16",
                            dora=True, magnitude_dtype="float32")
    w = compress_weight(gaussian(64, 96), cfg)
    b = w.bits()
    n = 64 * 96
    assert b["codes"] == n * 3
    assert b["scales"] == (n // 64) * 2 * 16  # fp16 min and step per block of 64
    assert b["permutation"] == 96 * 7  # one row block (64 < 128 rows) × 96 columns × ⌈log2 96⌉ bits
    assert b["lowrank"] == (64 + 96) * 8 * 16
    assert b["magnitude"] == 64 * 32
    assert b["total"] == 18432 + 3072 + 672 + 20480 + 2048


def test_bits_ordering_nominal():
    W = gaussian(128, 128)
    per = {b: compress_weight(W, CompressionConfig(quantizer="nf", bits=b)).bits()["per_weight"]
           for b in (2, 3, 4)}
    assert per[2] < per[3] < per[4]


def test_rank_fraction_resolves_per_shape():
    cfg = CompressionConfig(quantizer="nf", bits=3, rank=1 / 64)
    assert cfg.resolve_rank(4096, 4096) == 64
    assert cfg.resolve_rank(4096, 11008) == 64
    assert cfg.resolve_rank(64, 172) == 1
    assert CompressionConfig(rank=64).resolve_rank(32, 64) == 32


def test_nan_weight_is_refused_with_its_name():
    W = gaussian(64, 64)
    W[3, 5] = float("nan")
    with pytest.raises(CompressionError, match=r"layers\.0\.q_proj.*NaN/Inf.*\(3, 5\)"):
        compress_weight(W, CompressionConfig(quantizer="nf", bits=3), name="layers.0.q_proj")


@pytest.mark.parametrize("kwargs, msg", [
    (dict(quantizer="vq", bits=3, options={"dim": 8}), "b·d"),
    (dict(quantizer="vq", options={"dim": 3}), "vq: dim must be 1, 2, 4 or 8"),
    (dict(quantizer="nf", bits=12), "1..8"),
    (dict(rank=2.5), "integer"),
    (dict(quantizer="bogus"), "quantizer"),
])
def test_impossible_configs_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        CompressionConfig(**kwargs)


def test_alternating_never_worse_than_svd():
    W = gaussian(128, 128, seed=3) + 0.05 * torch.randn(128, 4) @ torch.randn(4, 128) / 4
    base = dict(quantizer="nf", bits=2, rank=4)
    e_svd = compress_weight(W, CompressionConfig(**base, lowrank_init="svd")).dequantize()
    e_alt = compress_weight(W, CompressionConfig(**base, lowrank_init="alternating")).dequantize()
    assert (W - e_alt).norm() <= (W - e_svd).norm() + 1e-7


def test_shared_codebook_is_used_and_charged_fairly():
    cfg = CompressionConfig(quantizer="vq", bits=2, options={"dim": 4, "codebook_scope": "model"})
    codebook = torch.randn(256, 4).half()
    w = compress_weight(gaussian(64, 64), cfg, codebook=codebook, shared_numel=4 * 64 * 64)
    assert "codebook" not in w.frozen and torch.equal(w.shared["codebook"], codebook)
    assert w.bits()["codebook"] == pytest.approx(256 * 4 * 16 / 4)  # a quarter of the sharers' weights


def test_permutation_orientation_helps_on_correlated_columns():
    # columns come in near-duplicate pairs placed far apart: the permutation brings them side by
    # side, inside one horizontal VQ vector, so VQ with permutation must be clearly better
    g = torch.Generator().manual_seed(0)
    base = torch.randn(128, 32, generator=g)
    W = torch.cat([base, base + 0.01 * torch.randn(128, 32, generator=g)], dim=1)  # (128, 64)
    W = W[:, torch.randperm(64, generator=g)]
    cfg = dict(quantizer="vq", bits=2, options={"dim": 2, "kmeans_iters": 30})
    e_plain = compress_weight(W, CompressionConfig(**cfg)).dequantize()
    e_perm = compress_weight(W, CompressionConfig(**cfg, permute=True)).dequantize()
    assert (W - e_perm).norm() < 0.8 * (W - e_plain).norm()


@pytest.mark.parametrize("init", ["svd", "alternating"])
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_quantizer_sees_the_residual_of_the_stored_factors(init, dtype):
    """The frozen part encodes W − L1 L2ᵀ with L1, L2 exactly as stored (int8 / bf16), and the recorded
    error of the kept iterate is the error of the stored reconstruction."""
    from reallm.weight.pipeline import encode_frozen

    W = gaussian(96, 128, seed=5) + 0.05 * gaussian(96, 1, seed=6) @ gaussian(1, 128, seed=7) * 50
    cfg = CompressionConfig(quantizer="nf", bits=3, rank=4, lowrank_init=init, lowrank_iters=4, lowrank_dtype=dtype)
    w = compress_weight(W, cfg)
    L1, L2 = w.lowrank_factors()  # the stored factors, fp32
    stored, _, _, _ = encode_frozen(W - L1 @ L2.T, cfg)
    assert torch.equal(stored["codes"], w.frozen["codes"])
    actual = float((w.dequantize() - W).norm() / W.norm())
    assert w.meta["lowrank_errors"][w.meta["lowrank_best_iter"]] == pytest.approx(actual, abs=2e-6)
