"""GPTQ-style error feedback (`reallm.ops.gptq`, `compression.error_feedback: gptq`).

The reference below is the textbook optimal-brain-quantiser loop written independently: it keeps the
inverse Hessian of the columns still free explicitly and updates it after each group by the Schur
complement, instead of reading the rows of one Cholesky factor as the implementation does.
"""

from __future__ import annotations

import pytest
import torch

from reallm.core.errors import CompressionError
from reallm.ops.gptq import feedback_codes
from reallm.ops.weighting import output_error_sq, relative_output_error
from reallm.weight.config import CompressionConfig
from reallm.weight.pipeline import compress_weight, feedback_applies


def obq_reference(X, scales, table, H, damp):
    """Codes by explicit inverse-Hessian updates (float64): for each group g of d columns, in order,
    nearest codeword under diag((Hinv_gg)⁻¹), W_r −= E_g (Hinv_gg)⁻¹ Hinv_gr,
    Hinv ← Hinv_rr − Hinv_rg (Hinv_gg)⁻¹ Hinv_gr."""
    X, table, H, scales = X.double(), table.double(), H.double(), scales.double()
    p, q = X.shape
    d = table.shape[1]
    H = H + damp * H.diagonal().mean() * torch.eye(q, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    W = X.clone()
    codes = torch.empty(p, q // d, dtype=torch.int64)
    for v, j in enumerate(range(0, q, d)):
        g, r = slice(0, d), slice(d, None)  # Hinv covers columns j.. only
        Hgg_inv = torch.linalg.inv(Hinv[g, g])
        metric = Hgg_inv.diagonal()
        x = W[:, j:j + d] / scales[:, v:v + 1]
        dist = ((x[:, None, :] - table[None, :, :]) ** 2 * metric).sum(-1)  # (p, K)
        c = dist.argmin(dim=1)
        codes[:, v] = c
        err = W[:, j:j + d] - table[c] * scales[:, v:v + 1]  # (p, d)
        W[:, j + d:] -= err @ Hgg_inv @ Hinv[g, r]
        Hinv = Hinv[r, r] - Hinv[r, g] @ Hgg_inv @ Hinv[g, r]
    return codes


def correlated_problem(p, q, d, seed, k=8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(p, q, generator=g, dtype=torch.float64)
    mix = torch.randn(q, q, generator=g, dtype=torch.float64) / q ** 0.5 + torch.eye(q, dtype=torch.float64)
    inputs = torch.randn(4 * q, q, generator=g, dtype=torch.float64) @ mix
    H = inputs.T @ inputs / inputs.shape[0]
    table = torch.randn(1 << k if d > 1 else 8, d, generator=g, dtype=torch.float64)
    scales = torch.rand(p, q // d, generator=g, dtype=torch.float64) + 0.5
    return X, scales, table, H


@pytest.mark.parametrize("d", [1, 2, 4])
def test_feedback_codes_equal_the_explicit_inverse_hessian_reference(d):
    X, scales, table, H = correlated_problem(12, 24, d, seed=d)
    got = feedback_codes(X, scales, table, H, damp=0.01, batch=8)  # batches smaller than q: the lazy updates
    ref = obq_reference(X, scales, table, H, 0.01)
    assert torch.equal(got, ref)


def test_diagonal_moments_give_the_plain_nearest_codes():
    # no correlation between columns: nothing to compensate, each vector keeps its nearest codeword under
    # Σ_j h_j (x_j − c_j)², h the (dampened) diagonal
    X, scales, table, _ = correlated_problem(10, 16, 2, seed=3)
    h = torch.rand(16, dtype=torch.float64) + 0.1
    got = feedback_codes(X, scales, table, torch.diag(h), damp=0.01)
    x = (X / scales.repeat_interleave(2, dim=1)).view(10, 8, 2)
    w = (h + 0.01 * h.mean()).view(8, 2)
    nearest = ((x[:, :, None, :] - table) ** 2 * w[None, :, None, :]).sum(-1).argmin(-1)  # (p, q/d)
    assert torch.equal(got, nearest)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feedback_lowers_the_output_error_of_correlated_inputs(seed):
    X, scales, table, H = correlated_problem(64, 32, 2, seed=seed)
    d = 2
    plain = ((X / scales.repeat_interleave(d, 1)).view(64, 16, 1, d) - table).pow(2).sum(-1).argmin(-1)

    def err(codes):
        Q = (table[codes] * scales[..., None]).reshape(64, 32)
        return output_error_sq(X - Q, H)

    assert err(feedback_codes(X, scales, table, H)) < 0.9 * err(plain)


def test_bad_shapes_are_refused():
    X, scales, table, H = correlated_problem(4, 6, 1, seed=0)
    with pytest.raises(ValueError, match="multiple of d"):
        feedback_codes(X, scales[:, :3], torch.zeros(4, 4, dtype=torch.float64), H)
    with pytest.raises(ValueError, match="expected"):
        feedback_codes(X, scales[:, :2], table, H)


# -- through the encoding pipeline ---------------------------------------------------------------------------------
def layer(p=96, q=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(p, q, generator=g)
    mix = torch.randn(q, q, generator=g) / q ** 0.5 + torch.eye(q)
    inputs = (torch.randn(1024, q, generator=g) @ mix) * (torch.rand(q, generator=g) * 2 + 0.2)
    return W, inputs.T @ inputs / inputs.shape[0]


CASES = [
    dict(quantizer="vq", bits=3, options={"dim": 2}),
    # three row blocks, each its own order
    dict(quantizer="vq", bits=2, permute=True, permute_rows=32, options={"dim": 4}),
    dict(quantizer="nf", bits=3),
    dict(quantizer="nf", bits=3, rotation="hadamard"),
    dict(quantizer="vq", bits=2, rank=2, options={"dim": 4}),  # on the residual after the low-rank part
]


def _case_id(kw: dict) -> str:
    flat = {**{k: v for k, v in kw.items() if k != "options"}, **kw.get("options", {})}
    return "-".join(f"{k}={v}" for k, v in flat.items())


@pytest.mark.parametrize("kw", CASES, ids=_case_id)
def test_compress_weight_with_feedback_keeps_the_format_and_lowers_the_output_error(kw):
    W, H = layer()
    plain = compress_weight(W, CompressionConfig(**kw), moments=H)
    fed = compress_weight(W, CompressionConfig(**kw, error_feedback="gptq"), moments=H)
    assert fed.meta["error_feedback"] == "gptq" and "error_feedback" not in plain.meta
    # the same stored tensors (names, shapes, dtypes) and bits: only the codes differ
    layout = [{k: (v.shape, v.dtype) for k, v in w.frozen.items()} for w in (fed, plain)]
    assert layout[0] == layout[1]
    assert fed.bits()["per_weight"] == plain.bits()["per_weight"]
    assert not torch.equal(fed.frozen["codes"], plain.frozen["codes"])
    for key in ("scale_codes", "codebook"):
        if key in plain.frozen:
            assert torch.equal(fed.frozen[key], plain.frozen[key])
    assert relative_output_error(W, fed.dequantize(), H) < 0.95 * relative_output_error(W, plain.dequantize(), H)


def test_feedback_needs_the_full_moments():
    W, H = layer()
    cfg = CompressionConfig(quantizer="vq", bits=3, error_feedback="gptq", options={"dim": 2})
    with pytest.raises(CompressionError, match="data-free"):
        compress_weight(W, cfg, name="mlp.up")
    with pytest.raises(CompressionError, match="only their diagonal"):
        compress_weight(W, cfg, name="mlp.up", moments=torch.diagonal(H).clone())


def test_a_width_that_cuts_vectors_across_rows_is_encoded_without_feedback_and_says_so():
    W, H = layer(16, 6)
    kw = dict(quantizer="vq", bits=2, block_size=8, options={"dim": 4})
    fed = compress_weight(W, CompressionConfig(**kw, error_feedback="gptq"), moments=H)
    plain = compress_weight(W, CompressionConfig(**kw), moments=H)
    assert fed.meta["error_feedback"] == "skipped: q = 6 is not a multiple of d = 4"
    assert torch.equal(fed.dequantize(), plain.dequantize())


def test_formats_without_a_code_table_are_encoded_as_without_feedback():
    assert feedback_applies(CompressionConfig(quantizer="vq")) and feedback_applies(CompressionConfig(quantizer="nf"))
    assert not feedback_applies(CompressionConfig(quantizer="rtn"))
    W, H = layer(32, 16)
    kw = dict(quantizer="rtn", bits=3)
    fed = compress_weight(W, CompressionConfig(**kw, error_feedback="gptq"), moments=H)
    plain = compress_weight(W, CompressionConfig(**kw), moments=H)
    assert "error_feedback" not in fed.meta and torch.equal(fed.dequantize(), plain.dequantize())


def test_config_checks():
    with pytest.raises(ValueError, match="error_feedback"):
        CompressionConfig(error_feedback="obq")
    with pytest.raises(ValueError, match="feedback_damp"):
        CompressionConfig(feedback_damp=0.0)


def test_phase_1_without_calibration_refuses_feedback_in_one_line():
    from reallm.core.errors import UserError
    from reallm.phases.compress import CompressPhase

    with pytest.raises(UserError, match="needs calibration-aware phase 1"):
        CompressPhase("unused", compression=CompressionConfig(error_feedback="gptq"))


def test_the_report_says_how_many_matrices_got_feedback_codes():
    from reallm.run.report import calibration_label

    info = {"windows_used": 8, "seq_len": 512, "path": "/data/tinystories_train.txt"}
    assert calibration_label({**info, "error_feedback_matrices": 35}) == (
        "calibrated (8 × 512 tokens of tinystories_train.txt; GPTQ codes in 35 matrices)")
    plain = calibration_label({**info, "error_feedback_matrices": 0})
    assert plain == "calibrated (8 × 512 tokens of tinystories_train.txt)"
