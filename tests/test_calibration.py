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
from reallm.core.hf_models import find_decoder_blocks, is_linear
from reallm.ops.hadamard import orthogonal_transform
from reallm.ops.weighting import output_error_sq, relative_output_error, rotated_column_weights
from reallm.phases.calibration import input_second_moments, load_moments, save_moments

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
    cfg = CompressionConfig(quantizer="vq", bits=2, options={"dim": 2, "kmeans_iters": 30}, **changes)
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


# --------------------------------------------------------------------------------------------
# the adaptive choice under the output error
# --------------------------------------------------------------------------------------------
def test_adaptive_choice_with_weights_picks_differently_where_it_must():
    """Two 64 × 64 matrices, candidates NF2 (cheap) and fp16 (near exact), a budget for one fp16 matrix.
    Matrix A has one outlier column: NF2's absmax blocks (one row each) keep it and round the rest to few
    levels, a large weight error; but A's inputs are (almost) only on that column, so its output error is
    small. Matrix B is Gaussian with isotropic inputs. By weight error the fp16 goes to A, by output error to B."""
    from reallm.model.adaptive import AdaptiveConfig
    from reallm.model.candidates import select

    g = torch.Generator().manual_seed(0)
    A = torch.randn(64, 64, generator=g) * 0.02
    A[:, 63] = 0.1 * torch.sign(torch.randn(64, generator=g))  # the outlier column (5 standard deviations)
    B = torch.randn(64, 64, generator=g) * 0.02
    hA = torch.full((64,), 1e-4)
    hA[63] = 1.0
    moments = {"A": torch.diag(hA), "B": torch.eye(64)}
    cands = {"nf2": CompressionConfig(quantizer="nf", bits=2), "fp16": CompressionConfig(quantizer="none", bits=16)}
    matrices = []
    for name, W in (("A", A), ("B", B)):
        found = {}
        for label, cfg in cands.items():
            w = compress_weight(W, cfg, moments=moments[name])
            W_hat = w.dequantize()
            found[label] = (w, {"rel_frobenius_error": float((W_hat - W).norm() / W.norm()),
                                "rel_output_error": relative_output_error(W, W_hat, moments[name]),
                                "w_norm2": float(W.square().sum()), "out_norm2": output_error_sq(W, moments[name])})
        matrices.append((name, found))
    err = {n: {lab: st for lab, (_, st) in f.items()} for n, f in matrices}
    # the premises: A is worse than B by weight error, better by output error (under NF2)
    assert err["A"]["nf2"]["rel_frobenius_error"] > err["B"]["nf2"]["rel_frobenius_error"]
    assert err["A"]["nf2"]["rel_output_error"] < 0.5 * err["B"]["nf2"]["rel_output_error"]
    bits = {lab: matrices[0][1][lab][0].bits()["per_weight"] for lab in cands}
    adaptive = AdaptiveConfig(budget=(bits["nf2"] + bits["fp16"]) / 2 + 0.01, candidates={k: {} for k in cands})
    by_weight = select(matrices, list(cands), adaptive, error="weight")
    by_output = select(matrices, list(cands), adaptive, error="output")
    assert {n: p.label for n, p in by_weight.picks.items()} == {"A": "fp16", "B": "nf2"}
    assert {n: p.label for n, p in by_output.picks.items()} == {"A": "nf2", "B": "fp16"}
    assert "output" in by_output.summary["adaptive"]["objective"]
    assert "rel. output error" in by_output.picks["A"].record["reason"]
    assert set(by_output.picks["B"].record["candidates"]["nf2"]) == {"own_bits_per_weight", "rel_frobenius_error",
                                                                     "rel_output_error"}
    with pytest.raises(ValueError, match="no rel_output_error"):
        select([(n, {lab: (w, {k: v for k, v in st.items() if k != "rel_output_error"}) for lab, (w, st) in f.items()})
                for n, f in matrices], list(cands), adaptive, error="output")


# --------------------------------------------------------------------------------------------
# the phase-1 option, through the command line
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from phase_helpers import make_phase1

    return make_phase1(tmp_path_factory.mktemp("calib"))


def _phase1(tiny_base, run, preset, extra=()):
    from pathlib import Path

    from phase_helpers import TRAIN_TEXT

    from reallm.run.cli import cli_main

    root = Path(__file__).parents[1]
    cal = ["--model.init_args.calibration.path", str(TRAIN_TEXT), "--model.init_args.calibration.windows", "6",
           "--model.init_args.calibration.seq_len", "32", "--model.init_args.calibration.batch_size", "4",
           "--model.init_args.calibration.cache_dir", str(tiny_base.token_cache)]
    # short k-means; a ReALLM preset's base format (autoencoder) has no k-means option, and its VQ candidates keep
    # vq's default options (a candidate of another format does not inherit the base's)
    short = [] if preset.startswith("reallm") else ["--model.init_args.compression.options.kmeans_iters", "3"]
    cli_main(["fit", "--config", str(root / "configs" / "ae.yaml"), "--config", str(root / "configs" / "methods" /
              f"{preset}.yaml"), "--model.init_args.model_name_or_path", str(tiny_base.base), *short,
              "--trainer.accelerator", "cpu",
              "--artifacts.figures", "false", "--run_dir", str(run), *(cal if "cal" in run.name else []), *extra])
    import json

    return json.loads((run / "results.json").read_text())


def test_phase1_calibration_option_is_recorded_and_reported(tiny_base, tmp_path, capsys, monkeypatch):
    """vq-2bit-ft with `calibration:` records its windows in results.json, reports each matrix's relative output
    error (lower on average than the data-free run's, measured on the same statistics), resumes from its saved
    statistics, and `python -m reallm.run.report` labels both runs."""
    from reallm.run.report import main as report

    free = _phase1(tiny_base, tmp_path / "free", "vq-2bit-ft")
    cal = _phase1(tiny_base, tmp_path / "cal", "vq-2bit-ft")
    assert free["calibration"] == "data-free" and "rel_output_error" not in free["matrices"][0]
    info = cal["calibration"]
    assert info["windows_used"] == 6 and info["tokens"] == 6 * 32 and info["seq_len"] == 32
    assert info["full_matrices"] == len(cal["matrices"]) and info["diagonal_only"] == 0  # q = 64 / 128 ≤ 1024
    assert all(0 < m["rel_output_error"] < 1 for m in cal["matrices"])
    assert (tmp_path / "cal" / "partial" / "calibration.safetensors").is_file()
    # the data-free model measured on the same statistics: calibration lowers the mean output error
    import safetensors

    from reallm.checkpoint.compressed import load_compressed
    from reallm.core.hf_models import load_hf_model
    from reallm.layer.linear import iter_reallm_layers
    from reallm.phases import calibration

    with safetensors.safe_open(str(tmp_path / "cal" / "partial" / "calibration.safetensors"), "pt") as f:
        moments = {k: f.get_tensor(k) for k in f.keys()}
    base = load_hf_model(str(tiny_base.base), "float32")
    errs = []
    for name, layer in iter_reallm_layers(load_compressed(tmp_path / "free" / "reallm")):
        W = base.get_submodule(name).weight.detach()
        errs.append(relative_output_error(W, layer.dequantize().detach(), moments[name]))
    assert cal["mean_rel_output_error"] < sum(errs) / len(errs)
    # a rerun in the same run directory reads the saved statistics (and the finished matrices) back
    monkeypatch.setattr(calibration, "input_second_moments", lambda *a, **k: pytest.fail("statistics recomputed"))
    again = _phase1(tiny_base, tmp_path / "cal", "vq-2bit-ft")
    assert again["calibration"] == cal["calibration"] and again["matrices"] == cal["matrices"]
    # the report says which phase 1 was given
    assert report([str(tmp_path / "free"), str(tmp_path / "cal")]) == 0
    table = capsys.readouterr().out
    assert "| data-free |" in table and "calibrated (6 × 32 tokens of tinystories_train.txt)" in table


def test_adaptive_phase_with_calibration_chooses_on_the_output_error(tiny_base, tmp_path):
    """reallm-3bit (autoencoder candidates and data-free ones) with calibration: the MILP's error term is the
    relative output error, every candidate's both errors are in results.json; the preset keeps a DoRA part on
    every matrix (counted in the budget), so that phase 2 accepts its checkpoint."""
    from pathlib import Path

    from phase_helpers import data_args

    from reallm.checkpoint.compressed import load_compressed
    from reallm.layer.linear import iter_reallm_layers
    from reallm.run.cli import cli_main

    res = _phase1(tiny_base, tmp_path / "cal-ae", "reallm-3bit",
                  ["--model.init_args.schedule.kmeans_iters", "3", "--trainer.max_epochs", "1"])
    layers = list(iter_reallm_layers(load_compressed(tmp_path / "cal-ae" / "reallm")))
    assert layers and all(layer.rank == 1 and layer.magnitude is not None for _, layer in layers)
    assert all(m["items"]["lowrank"] > 0 and m["items"]["magnitude"] > 0 for m in res["matrices"])
    root = Path(__file__).parents[1]
    cli_main(["fit", "--config", str(root / "configs" / "blockwise.yaml"), "--model.init_args.checkpoint",
              str(tmp_path / "cal-ae" / "reallm"), "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "true",
              "--artifacts.figures", "false", "--run_dir", str(tmp_path / "bw"), *data_args(tiny_base, sequences=8)])
    assert list(iter_reallm_layers(load_compressed(tmp_path / "bw" / "reallm")))  # the phase-2 checkpoint loads
    assert res["adaptive"]["error"] == "relative output error on the calibration inputs"
    assert res["calibration"]["windows_used"] == 6
    m = res["matrices"][0]
    assert "rel. output error" in m["reason"]
    assert all({"rel_frobenius_error", "rel_output_error"} <= set(c) for c in m["candidates"].values())
    assert res["adaptive"]["bits_per_weight"] <= res["adaptive"]["budget_bits_per_weight"] + 1e-9


def test_adaptive_error_option_is_checked():
    from reallm.core.errors import UserError
    from reallm.model.adaptive import AdaptiveConfig
    from reallm.phases import AutoencoderPhase
    from reallm.phases.calibration import CalibrationConfig

    with pytest.raises(ValueError, match="adaptive.error must be"):
        AdaptiveConfig(error="both")
    with pytest.raises(UserError, match="output needs calibration-aware phase 1"):
        AutoencoderPhase(adaptive=AdaptiveConfig(error="output"))
    cal = CalibrationConfig(path="x.txt")
    assert AutoencoderPhase(adaptive=AdaptiveConfig(), calibration=cal).choice_error() == "output"
    assert AutoencoderPhase(adaptive=AdaptiveConfig(error="weight"), calibration=cal).choice_error() == "weight"
    assert AutoencoderPhase(adaptive=AdaptiveConfig()).choice_error() == "weight"
    with pytest.raises(ValueError, match="calibration.path"):
        CalibrationConfig()
