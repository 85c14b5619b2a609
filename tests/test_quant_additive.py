"""Additive multi-codebook VQ (AQLM-like): beam search, joint least squares, refinement, packing."""

import itertools

import pytest
import torch

import reallm.formats.additive.search as additive_mod
from reallm.formats.additive.search import (
    AdditiveResult,
    additive_bits,
    additive_decode,
    additive_encode,
    additive_errors,
    additive_fit,
    additive_lstsq_update,
    additive_pack_codes,
    additive_unpack_codes,
)
from reallm.ops.packing import pack_bits

pytestmark = pytest.mark.usefixtures("single_thread")


def _data(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _one_hot(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Explicit (N, M*K) design matrix: a 1 in column m*K + codes[n, m] for each m."""
    n, m = codes.shape
    x = torch.zeros(n, m * k, dtype=torch.float64)
    for j in range(m):
        x[torch.arange(n), j * k + codes[:, j]] = 1.0
    return x


def test_beam_search_with_full_width_is_exhaustive_and_never_worse_than_greedy():
    v = _data(3000, 4, seed=1)
    cb = _data(2 * 16 * 4, 1, seed=2).view(2, 16, 4) * 0.7  # (M, K, d)
    # Exhaustive reference over all K^2 code pairs.
    pairs = torch.tensor(list(itertools.product(range(16), repeat=2)))  # (256, 2)
    sums = cb[0][pairs[:, 0]] + cb[1][pairs[:, 1]]  # (256, 4)
    best = torch.cdist(v.double(), sums.double()).argmin(dim=1)
    exhaustive_err = additive_errors(v, pairs[best], cb)
    full = additive_encode(v, cb, beam=16)  # stage 0 keeps all 16 codewords: exact search
    assert torch.allclose(additive_errors(v, full, cb), exhaustive_err, rtol=1e-6, atol=1e-7)
    greedy = additive_encode(v, cb, beam=1)
    e_greedy = additive_errors(v, greedy, cb)
    for beam in (2, 4, 16):
        e_beam = additive_errors(v, additive_encode(v, cb, beam=beam), cb)
        assert bool((e_beam <= e_greedy).all())
        assert float(e_beam.sum()) < float(e_greedy.sum())
    # greedy is residual nearest-codeword assignment
    first = torch.cdist(v, cb[0]).argmin(dim=1)
    second = torch.cdist(v - cb[0][first], cb[1]).argmin(dim=1)
    assert torch.equal(greedy, torch.stack([first, second], dim=1))


@pytest.mark.parametrize("m_books", [2, 3])
def test_lstsq_update_equals_dense_lstsq_on_the_one_hot_design(m_books):
    k, d, n = 8, 3, 700
    v = _data(n, d, seed=3).double()
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, k, (n, m_books), generator=g)
    old = _data(m_books * k * d, 1, seed=5).view(m_books, k, d)
    new = additive_lstsq_update(v, codes, old, ridge=1e-9)
    x = _one_hot(codes, k)  # (N, M*K), rank deficient for M >= 2
    ref = torch.linalg.lstsq(x, v, driver="gelsd").solution  # (M*K, d) minimum-norm solution
    fit_ours = x @ new.double().reshape(-1, d)
    fit_ref = x @ ref
    assert torch.allclose(fit_ours, fit_ref, atol=1e-5)  # the fitted values are unique
    err_ours = float((v - fit_ours).pow(2).sum())
    err_ref = float((v - fit_ref).pow(2).sum())
    assert err_ours <= err_ref * (1 + 1e-6)
    assert err_ours < float((v - x @ old.double().reshape(-1, d)).pow(2).sum())


def test_lstsq_unused_codewords_keep_their_value_and_block_path(monkeypatch):
    k, d, n = 8, 2, 400
    v = _data(n, d, seed=6)
    codes = torch.randint(0, 6, (n, 2), generator=torch.Generator().manual_seed(7))  # codewords 6, 7 unused
    old = _data(2 * k * d, 1, seed=8).view(2, k, d)
    new = additive_lstsq_update(v, codes, old)
    assert torch.allclose(new[:, 6:], old[:, 6:], atol=1e-5)
    # M = 1: least squares = the mean of each codeword's vectors
    c1 = codes[:, :1]
    new1 = additive_lstsq_update(v, c1, old[:1])
    means = torch.stack([v[c1[:, 0] == j].mean(dim=0) for j in range(6)])
    assert torch.allclose(new1[0, :6], means, atol=1e-5)
    # Above the dense size limit: codebooks one at a time; M = 1 is the same exact solution, M = 2
    # lowers the error but stays at or above the joint optimum.
    monkeypatch.setattr(additive_mod, "_DENSE_LSTSQ_MAX", 0)
    assert torch.allclose(additive_lstsq_update(v, c1, old[:1])[0, :6], means, atol=1e-5)
    block = additive_lstsq_update(v, codes, old)
    e_old, e_block, e_joint = (float(additive_errors(v, codes, c).sum()) for c in (old, block, new))
    assert e_joint <= e_block * (1 + 1e-6) and e_block < e_old
    assert torch.equal(block[:, 6:], old[:, 6:])


def test_fit_error_non_increasing_and_codes_consistent():
    v = _data(4000, 8, seed=9)
    res = additive_fit(v, 2, 6, beam=4, iters=6, tol=0, seed=0)
    assert isinstance(res, AdditiveResult) and res.n_iter == 6 and len(res.errors) == 7
    assert all(b <= a for a, b in zip(res.errors, res.errors[1:]))
    assert res.errors[-1] < 0.97 * res.errors[0]  # refinement does something
    assert abs(float(additive_errors(v, res.codes, res.codebooks).double().mean()) - res.errors[-1]) < 1e-5
    # shapes, dtypes, fp16 storage
    assert res.codebooks.shape == (2, 64, 8) and res.codebooks.dtype == torch.float32
    assert torch.equal(res.codebooks, res.codebooks.half().float())
    assert res.codes.shape == (4000, 2) and res.codes.dtype == torch.int64
    out = additive_decode(res.codes, res.codebooks)
    assert out.shape == (4000, 8) and out.dtype == torch.float32
    # beam search beats greedy on this problem
    greedy = additive_fit(v, 2, 6, beam=1, iters=6, tol=0, seed=0)
    assert res.errors[-1] < greedy.errors[-1]
    # tolerance stops early
    assert additive_fit(v, 2, 6, iters=50, tol=0.05, seed=0).n_iter < 50


def test_fit_deterministic_and_warm_start():
    v = _data(2000, 4, seed=10)
    a = additive_fit(v, 2, 4, beam=2, iters=3, seed=1)
    b = additive_fit(v, 2, 4, beam=2, iters=3, seed=1)
    c = additive_fit(v, 2, 4, beam=2, iters=3, seed=2)
    assert torch.equal(a.codebooks, b.codebooks) and torch.equal(a.codes, b.codes) and a.errors == b.errors
    assert not torch.equal(a.codebooks, c.codebooks)
    warm = additive_fit(v, 2, 4, beam=2, iters=2, init_codebooks=a.codebooks)
    assert warm.errors[-1] <= a.errors[-1] * (1 + 1e-6)


def test_chunked_equals_unchunked_and_init_codes_never_worse():
    v = _data(3000, 8, seed=11)
    cb = _data(2 * 32 * 8, 1, seed=12).view(2, 32, 8) * 0.6
    whole = additive_encode(v, cb, beam=4, chunk_size=10**6)
    assert torch.equal(additive_encode(v, cb, beam=4, chunk_size=7), whole)
    assert torch.equal(additive_encode(v, cb, beam=4), whole)
    # random current codes: the result is per vector no worse than them
    init = torch.randint(0, 32, (3000, 2), generator=torch.Generator().manual_seed(13))
    kept = additive_encode(v, cb, beam=1, init_codes=init)
    assert bool((additive_errors(v, kept, cb) <= additive_errors(v, init, cb)).all())


def test_max_points_fits_on_a_subsample_and_encodes_everything():
    v = _data(5000, 4, seed=14)
    res = additive_fit(v, 2, 4, iters=2, max_points=1000)
    assert res.codes.shape == (5000, 2)
    assert torch.equal(res.codes, additive_encode(v, res.codebooks, 1))


def test_packing_is_m_times_k_bits_per_vector():
    g = torch.Generator().manual_seed(15)
    codes = torch.randint(0, 256, (1001, 2), generator=g)
    packed = additive_pack_codes(codes, 8)
    combined = codes[:, 0] | (codes[:, 1] << 8)  # the per-vector code at width M*k = 16
    assert torch.equal(packed, pack_bits(combined, 16))
    assert torch.equal(additive_unpack_codes(packed, 1001, 2, 8), codes)
    odd = torch.randint(0, 32, (77, 3), generator=g)
    p5 = additive_pack_codes(odd, 5)
    assert p5.numel() == -(-77 * 3 * 5 // 8) and torch.equal(additive_unpack_codes(p5, 77, 3, 5), odd)
    bits = additive_bits(1001, 2, 8, 8)
    assert bits == {"codes": 1001 * 16, "codebooks": 2 * 256 * 8 * 16}
    assert packed.numel() * 8 == bits["codes"]


def test_bad_input_one_line_errors():
    v = _data(10, 4)
    with pytest.raises(ValueError, match="k must be"):
        additive_fit(v, 2, 17)
    with pytest.raises(ValueError, match="NaN"):
        additive_fit(torch.full((4, 4), float("nan")), 1, 2)
    with pytest.raises(ValueError, match="fp16"):
        additive_fit(v * 1e6, 1, 2)
    with pytest.raises(ValueError, match="codes must lie"):
        additive_decode(torch.tensor([[0, 9]]), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="dimension"):
        additive_encode(v, torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="beam"):
        additive_encode(v, torch.zeros(2, 4, 4), beam=0)
