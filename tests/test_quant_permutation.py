"""Greedy column permutation (paper Algorithm 1): vectorised == reference, exact inverse."""

import pytest
import torch

from reallm.ops.permutation import (
    greedy_column_permutation,
    greedy_column_permutation_reference,
    index_bits,
    permute_columns,
    unpermute_columns,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("p", "q", "row_block"), [(256, 96, 128), (300, 200, 128), (130, 64, 64), (50, 33, 7)])
def test_vectorised_equals_reference(p, q, row_block):
    # fp64 data: no near-ties decided by rounding
    W = torch.randn(p, q, generator=torch.Generator().manual_seed(p + q), dtype=torch.float64)
    perm = greedy_column_permutation(W, row_block)
    ref = greedy_column_permutation_reference(W, row_block)
    n_blocks = -(-p // row_block)
    assert perm.shape == (n_blocks, q) and perm.dtype == torch.int64
    assert torch.equal(perm, ref)
    assert (perm[:, 0] == 0).all()
    assert torch.equal(perm.sort(dim=1).values, torch.arange(q).expand(n_blocks, q))


def test_greedy_rule_by_hand():
    # one row block, 1-D columns: values 0, 10, 1, 9, 2 -> order 0, 2, 4, 3, 1
    W = torch.tensor([[0.0, 10.0, 1.0, 9.0, 2.0]], dtype=torch.float64)
    assert greedy_column_permutation(W, 128).tolist() == [[0, 2, 4, 3, 1]]
    # ties go to the lowest index: columns 1 and 2 are both at distance 1 from column 0
    W = torch.tensor([[0.0, 1.0, -1.0, 5.0]])
    assert greedy_column_permutation(W, 128).tolist() == [[0, 1, 2, 3]]
    assert greedy_column_permutation_reference(W, 128).tolist() == [[0, 1, 2, 3]]


def test_permute_unpermute_exact_inverse():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 70, generator=g)
    for row_block in (128, 64, 300, 1):
        perm = greedy_column_permutation(W, row_block)
        Wp = permute_columns(W, perm, row_block)
        assert Wp.shape == W.shape
        assert torch.equal(unpermute_columns(Wp, perm, row_block), W)
        # block b really holds W[rows of b][:, perm[b]]
        b = perm.shape[0] - 1
        rows = slice(b * row_block, min(300, (b + 1) * row_block))
        assert torch.equal(Wp[rows], W[rows][:, perm[b]])
    # any permutation (random) round-trips as well
    rand = torch.stack([torch.randperm(70, generator=g) for _ in range(3)])
    assert torch.equal(unpermute_columns(permute_columns(W, rand, 128), rand, 128), W)


def test_permutation_makes_neighbours_closer():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(128, 256, generator=g).cumsum(dim=0)[:, torch.randperm(256, generator=g)]
    perm = greedy_column_permutation(W, 128)
    Wp = permute_columns(W, perm, 128)
    step = lambda M: float((M[:, 1:] - M[:, :-1]).norm(dim=0).mean())
    assert step(Wp) < 0.7 * step(W)


def test_index_bits():
    assert [index_bits(q) for q in (1, 2, 3, 4, 5, 1024, 4096, 4097, 11008)] == [1, 1, 2, 2, 3, 10, 12, 13, 14]


def test_fp32_input_and_single_column():
    W = torch.randn(10, 1)
    assert greedy_column_permutation(W, 4).tolist() == [[0], [0], [0]]
    W = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    perm = greedy_column_permutation(W, 32)
    assert torch.equal(unpermute_columns(permute_columns(W, perm, 32), perm, 32), W)
