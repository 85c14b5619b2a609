"""Randomised Hadamard rotation: orthonormal, exact inverse, explicit-matrix check, seeds."""

import pytest
import torch

from reallm.ops.hadamard import _params, _sylvester, orthogonal_transform, rotate, unrotate

pytestmark = pytest.mark.usefixtures("single_thread")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [1, 2, 3, 12, 64, 172, 4096])
def test_inverse_and_norm_preserved(n):
    x = torch.randn(8, n, generator=torch.Generator().manual_seed(n))
    y = orthogonal_transform(x, seed=5)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert _rel(orthogonal_transform(y, seed=5, inverse=True), x) < 1e-5


@pytest.mark.parametrize("n", [12, 64, 172, 256])
def test_matches_explicit_matrix(n):
    """T = (H_{2^k}/sqrt(2^k) ⊗ Q_m) diag(S), orthogonal, applied along any dim."""
    k = (n & -n).bit_length() - 1
    signs, q = _params(7, n)
    H = _sylvester(k) / 2 ** (k / 2)
    T = (torch.kron(H, q) if q is not None else H) @ torch.diag(signs)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(T @ T.T, eye, atol=1e-12)
    assert torch.allclose(orthogonal_transform(eye, seed=7, dim=0), T, atol=1e-12)  # columns
    x = torch.randn(3, n, 4, dtype=torch.float64)
    y = orthogonal_transform(x, seed=7, dim=1)
    assert torch.allclose(y, torch.einsum("ij,ajb->aib", T, x), atol=1e-12)
    assert torch.allclose(orthogonal_transform(y, seed=7, dim=1, inverse=True), x, atol=1e-12)


@pytest.mark.parametrize(("p", "q"), [(64, 64), (172, 64), (64, 172), (4096, 64)])
def test_rotate_unrotate(p, q):
    W = torch.randn(p, q, generator=torch.Generator().manual_seed(p * q))
    R = rotate(W, 1, 2)
    assert R.shape == W.shape
    assert abs(float(R.norm() / W.norm()) - 1) < 1e-5
    assert _rel(unrotate(R, 1, 2), W) < 1e-5
    # left transform acts on columns (dim 0), right transform on rows (dim 1)
    expected = orthogonal_transform(orthogonal_transform(W, 1, dim=0), 2, dim=1)
    assert torch.equal(R, expected)


def test_llama_mlp_width_along_one_dim():
    W = torch.randn(16, 11008, generator=torch.Generator().manual_seed(0))  # 11008 = 2^8 * 43
    R = rotate(W, 3, 4)
    assert abs(float(R.norm() / W.norm()) - 1) < 1e-5
    assert _rel(unrotate(R, 3, 4), W) < 1e-5
    Rt = rotate(W.T.contiguous(), 4, 3)  # 11008 along dim 0
    assert _rel(unrotate(Rt, 4, 3), W.T) < 1e-5


def test_seeds_determinism_and_incoherence():
    W = torch.zeros(64, 128)
    W[5, 7] = 1.0  # a spike
    R = rotate(W, 1, 2)
    assert torch.equal(R, rotate(W, 1, 2))
    X = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate(X, 1, 2), rotate(X, 1, 2))
    assert not torch.allclose(rotate(X, 1, 2), rotate(X, 1, 3), atol=1e-3)
    assert not torch.allclose(rotate(X, 1, 2), rotate(X, 4, 2), atol=1e-3)
    assert float(R.abs().max()) < 0.05  # spread over all 64*128 entries (1/sqrt(8192) = 0.011)
    # fp64 input stays fp64 and is exact to 1e-12
    W64 = torch.randn(96, 40, dtype=torch.float64)
    R64 = rotate(W64, 8, 9)
    assert R64.dtype == torch.float64 and _rel(unrotate(R64, 8, 9), W64) < 1e-12
