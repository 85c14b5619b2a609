"""Low-rank + quantized decompositions: svd / alternating (LQ-LoRA) / zero (QLoRA)."""

import math

import pytest
import torch

from reallm.ops.lowrank import LowRankResult, low_rank_svd, lowrank_decompose
from reallm.ops.scalar import nearest_level, nf_levels

pytestmark = pytest.mark.usefixtures("single_thread")


def _nf_quantizer(bits: int, block: int = 64):
    """NF-b on absmax-normalised blocks of `block` consecutive values: R -> (R_hat, codes)."""
    levels = nf_levels(bits)

    def quantize(R: torch.Tensor):
        blocks = R.reshape(-1, block)
        scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        codes = nearest_level(blocks / scale, levels)
        return (levels[codes] * scale).reshape(R.shape), codes

    return quantize


def _rtn_quantizer(step: float):
    def quantize(R):
        return torch.round(R / step) * step, None

    return quantize


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _matrix(p, q, seed, kind="gauss"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(p, q, generator=g)
    if kind == "spiky":  # a few large outliers plus a low-rank component, like LLM weights
        W += torch.randn(p, 3, generator=g) @ torch.randn(3, q, generator=g)
        W.view(-1)[torch.randint(p * q, (20,), generator=g)] *= 30
    return W


@pytest.mark.parametrize(("p", "q", "kind"), [(128, 96, "gauss"), (64, 256, "spiky"), (192, 192, "spiky")])
@pytest.mark.parametrize("quantizer", ["nf3", "nf2", "rtn"])
@pytest.mark.parametrize("rank", [4, 16])
def test_alternating_never_worse_than_svd(p, q, kind, quantizer, rank):
    W = _matrix(p, q, p + q + rank, kind)
    quant = {"nf3": _nf_quantizer(3), "nf2": _nf_quantizer(2), "rtn": _rtn_quantizer(0.5)}[quantizer]
    svd = lowrank_decompose(W, rank, "svd", quant)
    alt = lowrank_decompose(W, rank, "alternating", quant, iters=10)
    assert isinstance(alt, LowRankResult)
    assert alt.errors[0] == pytest.approx(svd.errors[0], rel=1e-6)  # first iterate == svd
    assert min(alt.errors) == alt.errors[alt.best_iter]
    best = alt.errors[alt.best_iter]
    assert best <= svd.errors[0] + 1e-7
    recon = alt.q_hat + alt.L1 @ alt.L2.T
    assert _rel(recon, W) == pytest.approx(best, rel=1e-5)
    assert alt.L1.shape == (p, rank) and alt.L2.shape == (q, rank)


def test_alternating_improves_on_nf3():
    W = _matrix(256, 256, 0, "spiky")
    quant = _nf_quantizer(3)
    svd = lowrank_decompose(W, 16, "svd", quant)
    alt = lowrank_decompose(W, 16, "alternating", quant, iters=20)
    assert alt.errors[alt.best_iter] < 0.97 * svd.errors[0]
    assert 1 <= len(alt.errors) <= 20


def test_alternating_recovers_planted_low_rank():
    g = torch.Generator().manual_seed(1)
    p, q, r = 256, 192, 4
    planted = torch.randn(p, r, generator=g) @ torch.randn(r, q, generator=g)  # entries ~ 2
    W = planted + 0.05 * torch.randn(p, q, generator=g)
    res = lowrank_decompose(W, r, "alternating", _nf_quantizer(3))
    assert _rel(res.L1 @ res.L2.T, planted) < 0.02
    assert res.errors[res.best_iter] < 0.01


def test_svd_method_is_best_rank_r():
    W = _matrix(100, 80, 3)
    L1, L2 = low_rank_svd(W, 10, randomized=False)
    U, S, Vh = torch.linalg.svd(W)
    best = (U[:, :10] * S[:10]) @ Vh[:10]
    assert torch.allclose(L1 @ L2.T, best, atol=1e-4)
    # singular values split evenly
    assert torch.allclose(L1.norm(dim=0), S[:10].sqrt(), rtol=1e-4)
    assert torch.allclose(L2.norm(dim=0), S[:10].sqrt(), rtol=1e-4)
    res = lowrank_decompose(W, 10, "svd", _nf_quantizer(3))
    assert torch.allclose(res.L1 @ res.L2.T, best, atol=1e-4)
    assert res.best_iter == 0 and len(res.errors) == 1


def test_zero_init_qlora():
    W = _matrix(64, 128, 4)
    quant = _nf_quantizer(4)
    res = lowrank_decompose(W, 8, "zero", quant, seed=3)
    assert torch.equal(res.L1, torch.zeros(64, 8))
    assert res.L2.shape == (128, 8) and res.L2.abs().max() <= 1 / math.sqrt(128)
    assert res.L2.abs().max() > 0
    assert torch.equal(res.q_hat, quant(W)[0])
    assert torch.equal(lowrank_decompose(W, 8, "zero", quant, seed=3).L2, res.L2)
    assert not torch.equal(lowrank_decompose(W, 8, "zero", quant, seed=4).L2, res.L2)
    assert res.errors[0] == pytest.approx(_rel(res.q_hat, W), rel=1e-5)


def test_randomized_svd_close_to_exact_and_deterministic():
    g = torch.Generator().manual_seed(0)
    p, q = 640, 512
    U, _ = torch.linalg.qr(torch.randn(p, q, generator=g))
    V, _ = torch.linalg.qr(torch.randn(q, q, generator=g))
    S = torch.exp(-torch.arange(q, dtype=torch.float32) / 15)  # decaying spectrum
    W = (U * S) @ V.T
    exact1, exact2 = low_rank_svd(W, 20, randomized=False)
    rand1, rand2 = low_rank_svd(W, 20, randomized=True, seed=1)
    assert rand1.shape == (p, 20) and rand2.shape == (q, 20)
    exact_err = float((W - exact1 @ exact2.T).norm())
    rand_err = float((W - rand1 @ rand2.T).norm())
    assert rand_err <= 1.01 * exact_err
    assert _rel(rand1 @ rand2.T, exact1 @ exact2.T) < 0.02
    again1, _ = low_rank_svd(W, 20, randomized=True, seed=1)
    assert torch.equal(rand1, again1)
    other1, _ = low_rank_svd(W, 20, randomized=True, seed=2)
    assert not torch.equal(rand1, other1)
    # alternating with the randomised SVD is deterministic under the seed
    a = lowrank_decompose(W, 8, "alternating", _nf_quantizer(3), iters=3, randomized=True, seed=5)
    b = lowrank_decompose(W, 8, "alternating", _nf_quantizer(3), iters=3, randomized=True, seed=5)
    assert a.errors == b.errors and torch.equal(a.L1, b.L1)


def test_rank_edge_cases():
    W = _matrix(32, 12, 6)
    L1, L2 = low_rank_svd(W, 0)
    assert L1.shape == (32, 0) and L2.shape == (12, 0)
    L1, L2 = low_rank_svd(W, 16)  # above min(p, q): zero-padded, exact
    assert L1.shape == (32, 16) and L2.shape == (12, 16)
    assert torch.allclose(L1 @ L2.T, W, atol=1e-5)
    res = lowrank_decompose(W, 0, "alternating", _nf_quantizer(3), iters=5)
    assert res.L1.shape == (32, 0) and len(res.errors) <= 2
    with pytest.raises(ValueError):
        lowrank_decompose(W, 2, "bogus", _nf_quantizer(3))
