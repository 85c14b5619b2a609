"""Calibration-aware phase 1: the input statistics (streamed, deterministic, exact), the output-error weights
carried through rotation and permutation, weighted VQ in the pipeline, and the adaptive choice under the
output error."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny_models import sample_ids, tiny_gpt2, tiny_llama

from reallm import CompressionConfig, compress_weight
from reallm.hf import find_decoder_blocks, is_linear
from reallm.quant.hadamard import orthogonal_transform
from reallm.quant.weighting import output_error_sq, relative_output_error, rotated_column_weights
from reallm.training.calibration import input_second_moments, load_moments, save_moments

pytestmark = pytest.mark.usefixtures("single_thread")


def _linears(model):
    prefix, _ = find_decoder_blocks(model)
    return [n for n, m in model.named_modules() if is_linear(m) and n.startswith(prefix + ".")]


def _direct(model, names, ids):
    """E[x xᵀ] of every linear's inputs, from the concatenated inputs of one forward pass (float64)."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in seen.items():
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()  # (tokens, q)
        out[n] = X.T @ X / X.shape[0]
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_statistics_equal_a_direct_computation_and_do_not_depend_on_the_batch_size(arch):
    model = (tiny_llama if arch == "llama" else tiny_gpt2)()
    names = _linears(model)
    ids = sample_ids(8, 16, seed=3)
    ref = _direct(model, names, ids)
    qs = {n: ref[n].shape[0] for n in names}
    full_max = min(qs.values())  # the narrowest inputs full, the wider (96, 256) diagonal
    assert len(set(qs.values())) > 1
    results = [input_second_moments(model, names, ids.split(b), full_max=full_max) for b in (1, 3, 8)]
    for res in results:
        assert res.tokens == 8 * 16 and res.windows == 8
        for n in names:
            got = res.moments[n].double()
            want = ref[n] if qs[n] <= full_max else torch.diagonal(ref[n])
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-9)
    for a in results[1:]:  # batch size 3 and 8 against 1: float64 sums, rounded once to fp32
        for n in names:
            torch.testing.assert_close(a.moments[n], results[0].moments[n], rtol=1e-6, atol=0)
    again = input_second_moments(model, names, ids.split(3), full_max=full_max)
    assert all(torch.equal(again.moments[n], results[1].moments[n]) for n in names)  # deterministic


def test_statistics_are_streamed_batch_by_batch():
    """No activation of a batch is alive when the next batch is drawn: the accumulation keeps running sums
    only (a weak reference to each batch's layer input dies before the next batch starts)."""
    model = tiny_llama()
    names = _linears(model)
    probe = names[0]
    refs: list[weakref.ref] = []
    handle = model.get_submodule(probe).register_forward_pre_hook(lambda m, a: refs.append(weakref.ref(a[0])))
    alive_when_drawn = []

    def batches():
        for i in range(6):
            gc.collect()
            alive_when_drawn.append(sum(r() is not None for r in refs))
            yield sample_ids(2, 16, seed=i)

    res = input_second_moments(model, names, batches())
    handle.remove()
    assert len(refs) == 6 and alive_when_drawn == [0] * 6
    assert res.windows == 12


def test_moments_round_trip_keyed(tmp_path):
    model = tiny_llama()
    names = _linears(model)
    res = input_second_moments(model, names, sample_ids(4, 8).split(2))
    save_moments(tmp_path / "m.safetensors", res, {"windows": "abc"})
    back = load_moments(tmp_path / "m.safetensors", {"windows": "abc"})
    assert back is not None and back.tokens == res.tokens
    assert all(torch.equal(back.moments[n], res.moments[n]) for n in names)
    assert load_moments(tmp_path / "m.safetensors", {"windows": "other"}) is None  # other windows: recomputed


# --------------------------------------------------------------------------------------------
# the output error and its weights
# --------------------------------------------------------------------------------------------
def _spd(q, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(q, 2 * q, generator=g) * torch.linspace(0.1, 3.0, q)[:, None]
    return A @ A.T / (2 * q)  # (q, q) symmetric positive definite, uneven diagonal


def test_output_error_is_the_error_on_the_inputs():
    """tr(E H Eᵀ) with H = XᵀX/N equals ‖E Xᵀ‖²/N computed directly, and the diagonal form Σ h_j E_ij²."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(500, 24, generator=g).double() * torch.linspace(0.2, 2.0, 24).double()  # (N, q) inputs
    E = torch.randn(10, 24, generator=g).double()
    H = X.T @ X / 500
    direct = float(((E @ X.T) ** 2).sum() / 500)
    assert output_error_sq(E, H) == pytest.approx(direct, rel=1e-5)
    assert output_error_sq(E, torch.diagonal(H)) == pytest.approx(float((E**2 * torch.diagonal(H)).sum()), rel=1e-6)
    W = torch.randn(10, 24, generator=g)
    assert relative_output_error(W, W, H.float()) == 0.0
    assert relative_output_error(W, 0 * W, H.float()) == pytest.approx(1.0)


@pytest.mark.parametrize("q", [64, 96])
def test_rotated_column_weights(q):
    """diag(B H Bᵀ) for the seeded transform B (x ↦ B x along rows), exactly, from H; and (B∘B) h from the
    diagonal alone equals diag(B diag(h) Bᵀ)."""
    H = _spd(q)
    B = orthogonal_transform(torch.eye(q, dtype=torch.float64), 11, dim=0)  # (q, q): column j is B e_j
    want = torch.diagonal(B @ H.double() @ B.T)
    torch.testing.assert_close(rotated_column_weights(H, 11).double(), want, rtol=1e-4, atol=1e-6)
    h = torch.diagonal(H).clone()
    torch.testing.assert_close(rotated_column_weights(h, 11).double(), torch.diagonal(B @ torch.diag(h.double()) @ B.T),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("changes", [dict(), dict(permute=True, permute_rows=16), dict(rotation="hadamard"),
                                     dict(rank=2)])
def test_weighted_vq_lowers_the_output_error(changes):
    """With the inputs' second moments, VQ's codebook and codes minimise the weighted error: the relative output
    error falls below the data-free one (same config, same seed), the Frobenius error rises, and the stored
    form decodes as any other (bits unchanged)."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(128, 64, generator=g) * 0.02
    h = torch.logspace(-2, 1, 64)[torch.randperm(64, generator=g)]  # uneven input energy per column
    H = torch.diag(h)
    cfg = CompressionConfig(quantizer="vq", bits=2, vq_dim=2, kmeans_iters=30, **changes)
    free = compress_weight(W, cfg)
    cal = compress_weight(W, cfg, moments=H)
    assert cal.meta.get("weighted") and not free.meta.get("weighted")
    out_free = relative_output_error(W, free.dequantize(), H)
    out_cal = relative_output_error(W, cal.dequantize(), H)
    if changes.get("rotation") == "hadamard":
        # the rotation spreads every column's energy over all columns: diag(B H Bᵀ) is nearly flat, so the
        # weights change little (measured 0.3167 against 0.3186)
        w = rotated_column_weights(h, 0)
        assert float(w.std() / w.mean()) < 0.2 * float(h.std() / h.mean())
        assert out_cal < out_free
    else:
        assert out_cal < 0.9 * out_free, (out_cal, out_free)
    fro = lambda w: float((w.dequantize() - W).norm() / W.norm())  # noqa: E731
    assert fro(cal) > fro(free)
    assert cal.bits()["total"] == free.bits()["total"]


def test_formats_without_weights_are_unchanged():
    """NF ignores the moments (nearest level is weight-free): the stored tensors are identical."""
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    cfg = CompressionConfig(quantizer="nf", bits=3)
    a, b = compress_weight(W, cfg), compress_weight(W, cfg, moments=torch.rand(64) + 0.1)
    assert all(torch.equal(a.frozen[k], b.frozen[k]) for k in a.frozen) and "weighted" not in b.meta
