"""Batched k-means and chunked exact assignment."""

import numpy as np
import pytest
import torch
from scipy.cluster.vq import kmeans2, vq

from reallm.quant.vq import KMeansResult, assign, kmeans

pytestmark = pytest.mark.usefixtures("single_thread")


def _data(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _mse(x: np.ndarray, codebook: np.ndarray) -> float:
    codes, _ = vq(x, codebook)
    return float(((x - codebook[codes]) ** 2).sum(axis=1).mean())


@pytest.mark.parametrize(("n", "d", "k", "iters"), [(12000, 2, 16, 20), (12000, 2, 64, 20), (4000, 4, 256, 10)])
def test_mse_no_worse_than_scipy(n, d, k, iters):
    """Same data, same iteration count, k-means++ init on both sides; averaged over 3 seeds."""
    x = _data(n, d)
    ours, theirs = [], []
    for seed in range(3):
        res = kmeans(x, k, iters=iters, tol=0, seed=seed)
        assert isinstance(res, KMeansResult) and res.codebook.shape == (k, d) and res.n_iter == iters
        ours.append(_mse(x.numpy(), res.codebook.numpy()))
        assert abs(ours[-1] - res.inertia) < 1e-4 * ours[-1]  # inertia = mean sq. distance to nearest
        cb, _ = kmeans2(x.numpy(), k, iter=iters, minit="++", seed=seed)
        theirs.append(_mse(x.numpy(), cb))
    assert np.mean(ours) <= 1.01 * np.mean(theirs), (ours, theirs)


def test_codes_in_range_and_determinism():
    x = _data(5000, 2, seed=1)
    a = kmeans(x, 16, seed=3)
    b = kmeans(x, 16, seed=3)
    c = kmeans(x, 16, seed=4)
    assert torch.equal(a.codebook, b.codebook) and a.inertia == b.inertia
    assert not torch.equal(a.codebook, c.codebook)
    codes = assign(x, a.codebook)
    assert codes.dtype == torch.int64 and codes.shape == (5000,)
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    r = kmeans(x, 16, init="random", seed=3)
    assert torch.equal(r.codebook, kmeans(x, 16, init="random", seed=3).codebook)


def test_assign_equals_bruteforce_cdist():
    x = _data(30000, 4, seed=2)
    cb = _data(64, 4, seed=3)
    brute = torch.cdist(x.double(), cb.double(), compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    assert torch.equal(assign(x, cb), brute)
    assert torch.equal(assign(x, cb, chunk_size=1000), brute)
    # ties -> lowest index (duplicated codebook)
    assert torch.equal(assign(x, torch.cat([cb, cb])), brute)
    # exact duplicates of codewords are assigned to themselves
    assert torch.equal(assign(cb, cb), torch.arange(64))


def test_converges_and_tolerance_stops_early():
    # well separated clusters: Lloyd converges in a few iterations and stops on tol
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 3, generator=g) * 20
    x = (centers.repeat_interleave(500, 0) + torch.randn(4000, 3, generator=g) * 0.1)
    res = kmeans(x, 8, iters=100, tol=1e-4, seed=0)
    assert res.n_iter < 100
    assert res.inertia < 0.05  # 3 * 0.1^2 = 0.03 per point
    assert torch.cdist(res.codebook, centers).min(dim=1).values.max() < 0.1


def test_warm_start_and_subsample():
    x = _data(20000, 2, seed=5)
    base = kmeans(x, 16, iters=30, seed=0)
    warm = kmeans(x, 16, iters=5, init_codebook=base.codebook)
    assert warm.inertia <= base.inertia * (1 + 1e-6)
    sub = kmeans(x, 16, iters=30, seed=0, max_points=2000)
    assert _mse(x.numpy(), sub.codebook.numpy()) < 1.05 * base.inertia
    assert torch.equal(sub.codebook, kmeans(x, 16, iters=30, seed=0, max_points=2000).codebook)


def test_fewer_points_than_codewords_and_empty_clusters():
    x = _data(5, 3)
    res = kmeans(x, 8)
    assert res.codebook.shape == (8, 3) and res.inertia == 0.0
    assert torch.equal(assign(x, res.codebook), torch.arange(5))
    # duplicated points -> some clusters start empty / duplicated: no NaN, still a valid codebook
    y = torch.cat([torch.zeros(50, 2), torch.ones(50, 2)])
    res = kmeans(y, 4, seed=0)
    assert torch.isfinite(res.codebook).all() and res.inertia < 1e-12
    # an initial codebook with far-away codewords: their clusters are empty and get re-seeded
    init = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
    z = _data(1000, 2, seed=9)
    res = kmeans(z, 4, iters=10, init_codebook=init)
    assert torch.bincount(assign(z, res.codebook), minlength=4).min() > 0
