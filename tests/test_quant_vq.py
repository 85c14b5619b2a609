"""Batched k-means and chunked exact assignment."""

import numpy as np
import pytest
import torch
from scipy.cluster.vq import kmeans2, vq

from reallm.ops.kmeans import KMeansResult, assign, kmeans

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


# --------------------------------------------------------------------------------------------
# weighted (calibration-aware) assignment and k-means
# --------------------------------------------------------------------------------------------
def _weights(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g) ** 3 * 10  # heavy spread: the weighting changes the choice


@pytest.mark.parametrize(("n", "d", "k", "chunk"), [(3000, 2, 16, None), (3000, 4, 256, 97), (500, 8, 64, 64)])
def test_weighted_assignment_equals_brute_force(n, d, k, chunk):
    """Codes minimise Σ_j w_j (x_j − c_j)² exactly (against an argmin over distances computed term by term
    in float64), and differ from the unweighted nearest codeword on a good share of the points."""
    x, w = _data(n, d, seed=4), _weights(n, d, seed=5)
    cb = _data(k, d, seed=6)
    codes = assign(x, cb, chunk_size=chunk, weights=w)
    ref = (w.double().unsqueeze(1) * (x.double().unsqueeze(1) - cb.double().unsqueeze(0)) ** 2).sum(2)  # (N, K)
    best = ref.min(dim=1).values
    got = ref.gather(1, codes.unsqueeze(1)).squeeze(1)
    assert torch.allclose(got, best, rtol=1e-6, atol=1e-9)  # the chosen codeword is a minimiser
    assert (codes == ref.argmin(dim=1)).float().mean() > 0.999  # (exact float ties aside)
    plain = assign(x, cb)
    assert (plain != codes).float().mean() > 0.05  # the weights matter on this data
    # unit weights give the plain assignment
    assert torch.equal(assign(x, cb, chunk_size=chunk, weights=torch.ones_like(x)), plain)


def test_weighted_kmeans_lowers_the_weighted_inertia():
    """Weighted Lloyd: its codebook has a lower weighted inertia than the unweighted k-means codebook of the
    same data (same seed, same init), the reported inertia is that weighted inertia, and each codeword is the
    per-coordinate weighted mean of its cluster."""
    from reallm.ops.kmeans import weighted_distances

    x, w = _data(4000, 2, seed=7), _weights(4000, 2, seed=8)
    plain = kmeans(x, 16, iters=30, tol=0, seed=1)
    weighted = kmeans(x, 16, iters=30, tol=0, seed=1, weights=w)
    inertia = lambda cb: float(weighted_distances(x, cb, w).min(dim=1).values.double().mean())  # noqa: E731
    assert weighted.inertia == pytest.approx(inertia(weighted.codebook), rel=1e-5)
    assert inertia(weighted.codebook) < 0.95 * inertia(plain.codebook)
    # one Lloyd update from a given codebook: each codeword becomes the per-coordinate weighted mean of the
    # points assigned to it under the weighted distance
    c0 = plain.codebook
    codes = assign(x, c0, weights=w)
    one = kmeans(x, 16, iters=1, tol=0, seed=1, weights=w, init_codebook=c0)
    for j in range(16):
        sel = codes == j
        mean = (w[sel] * x[sel]).sum(0) / w[sel].sum(0)
        assert torch.allclose(one.codebook[j], mean, atol=1e-5)
    # the weighted inertia never rises from one iteration to the next
    path = [kmeans(x, 16, iters=i, tol=0, seed=1, weights=w).inertia for i in range(6)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(path, path[1:])), path
    # deterministic
    again = kmeans(x, 16, iters=30, tol=0, seed=1, weights=w)
    assert torch.equal(again.codebook, weighted.codebook)


def test_weights_are_checked():
    x = _data(10, 2)
    with pytest.raises(ValueError, match="shape of x"):
        assign(x, x[:4], weights=torch.ones(10, 3))
    with pytest.raises(ValueError, match="non-negative"):
        kmeans(x, 4, weights=-torch.ones(10, 2))
