"""Bits known before encoding (reallm.weight.layout, Codec.stored_layout) and the budget refused before encoding
(reallm.model.candidates.check_budget, AutoencoderPhase.setup).

For every registered format and several configs each, the predicted layout is the encoded matrix's, tensor by
tensor (name, shape, dtype, order), and the predicted bits are `ReALLMWeight.bits()`, item by item, exactly. The
check before encoding refuses exactly the budgets `select` refuses after encoding, with the same numbers, and the
phase refuses one before it computes or writes anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_codec_contract import ROWS as CONTRACT_ROWS
from tiny_models import save_tiny_model_dir

from reallm.core.errors import UserError
from reallm.formats import get_codec, names
from reallm.formats.autoencoder import codec as ae_format
from reallm.formats.autoencoder import recipe as ae_recipe
from reallm.model.adaptive import AdaptiveConfig
from reallm.model.candidates import candidate_configs, check_budget, select, shared_group
from reallm.model.surgery import fit_shared_tensors
from reallm.phases import autoencoder as ae_phase
from reallm.phases.autoencoder_matrices import build_container, prepare_matrix
from reallm.run.cli import cli_main
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.layout import matrix_layout, predict_bits
from reallm.weight.pipeline import compress_weight, relative_error, shared_training_vectors

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (64, 96)
ODD = (37, 50)  # p·q = 1850: no block size below divides it, the last block is padded

AE = {"dim": 2, "patch": 16, "n_stages": 1, "latent_channels": 4, "encoder_width": 8, "encoder_blocks": 0,
      "decoder_width": 8, "kernels": [3], "weight_bits": 6, "share": "model"}
FAST_VQ = {"kmeans_iters": 3}
FAST_ADDITIVE = {"beam": 2, "refine_iters": 1, "kmeans_iters": 3}


def cfg(quantizer: str, **kw) -> CompressionConfig:
    return CompressionConfig(quantizer=quantizer, **kw)


# label → (config, shape, shared): `shared` passes tensors fitted once (model-wide codebooks) to the encoder
CASES: dict[str, tuple[CompressionConfig, tuple[int, int], bool]] = {
    "none": (cfg("none"), SHAPE, False),
    "none-rank4-dora": (cfg("none", rank=4, magnitude_dtype="float16"), ODD, False),
    "nf2": (cfg("nf", bits=2), SHAPE, False),
    "nf3-b40-perm-odd": (cfg("nf", bits=3, block_size=40, permute=True, permute_rows=24), ODD, False),
    "nf4-hadamard-int8-rank": (cfg("nf", bits=4, rotation="hadamard", rank=4, lowrank_dtype="int8"), SHAPE, False),
    "nf3-scales-6bit-group7": (cfg("nf", bits=3, scale_bits=6, scale_group=7, rank=0.05, dora=False), ODD, False),
    "rtn3": (cfg("rtn", bits=3), SHAPE, False),
    "rtn4-b48-perm-rot-bf16": (cfg("rtn", bits=4, block_size=48, permute=True, rotation="hadamard", rank=2,
                                   lowrank_dtype="bfloat16"), ODD, False),
    "vq3-d2-perm": (cfg("vq", bits=3, permute=True, options={"dim": 2, **FAST_VQ}), SHAPE, False),
    "vq2-d4-b40-rank-int8": (cfg("vq", bits=2, block_size=40, rank=3, lowrank_dtype="int8",
                                 options={"dim": 4, **FAST_VQ}), ODD, False),
    "vq1-d8-model-shared": (cfg("vq", bits=1, rank=2, options={"dim": 8, "codebook_scope": "model", **FAST_VQ}),
                            SHAPE, True),
    "vq2-d2-model-unshared": (cfg("vq", bits=2, options={"dim": 2, "codebook_scope": "model", **FAST_VQ}), ODD,
                              False),
    "additive-2x8": (cfg("additive", bits=2, options={"dim": 8, "codebooks": 2, **FAST_ADDITIVE}), SHAPE, False),
    "additive-4x4-perm-odd": (cfg("additive", bits=2, permute=True, options={"dim": 8, "codebooks": 4,
                                                                             **FAST_ADDITIVE}), ODD, False),
    "additive-3x2-d4-model-shared": (cfg("additive", bits=3, rank=2, options={
        "dim": 4, "codebooks": 2, "codebook_scope": "model", **FAST_ADDITIVE}), SHAPE, True),
    "e8p2-hadamard": (cfg("e8p", bits=2, rotation="hadamard"), SHAPE, False),
    "e8p3-odd": (cfg("e8p", bits=3), ODD, False),
    "e8p4-b32-perm-rank": (cfg("e8p", bits=4, block_size=32, permute=True, rank=2), SHAPE, False),
}
# the autoencoder (made by its phase): label → (config, the group's shapes)
AE_CASES: dict[str, tuple[CompressionConfig, tuple[tuple[int, int], ...]]] = {
    "ae-model-perm": (cfg("autoencoder", bits=3, permute=True, options=AE), (SHAPE, ODD)),
    "ae-matrix-int8-rank-hadamard": (cfg("autoencoder", bits=3, rank=2, lowrank_dtype="int8", rotation="hadamard",
                                         options={**AE, "share": "matrix"}), (ODD,)),
    "ae-fp16-decoder-uniform": (cfg("autoencoder", bits=2, options={**AE, "weight_bits": None, "levels": "uniform"}),
                                (SHAPE, SHAPE)),
    "ae-width-from-decoder-params": (cfg("autoencoder", bits=3, options={**AE, "decoder_width": None,
                                                                        "decoder_params": 3000}), (SHAPE,)),
    "ae-small-latent-two-stages": (cfg("autoencoder", bits=2, block_size=32, options={
        **AE, "n_stages": 2, "latent_channels": 2, "decoder_width": 12, "kernels": [1, 3], "weight_bits": 4}),
        (ODD, SHAPE)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # small matrices and networks: one thread is the fastest on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def weight_of(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]


def predicted(layout_specs) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, s.shape, s.dtype) for k, s in layout_specs.items()]


def assert_predicted(weight: ReALLMWeight, shared: bool, shared_numel: int | None = None) -> None:
    """The layout is the container's tensor by tensor, in order, and the bits are its bits, item by item."""
    layout = matrix_layout(weight.config, weight.shape, shared=shared)
    assert predicted(layout.frozen) == specs(weight.frozen)
    assert predicted(layout.shared) == specs(weight.shared)
    assert predicted(layout.lowrank) == specs(weight.lowrank)
    assert layout.rank == weight.rank
    assert predict_bits(weight.config, weight.shape, shared=shared, shared_numel=shared_numel) == weight.bits()
    assert layout.bits(shared_numel, include_magnitude=False) == weight.bits(include_magnitude=False)


def test_every_format_is_checked():
    """By the cases here or by its rows of the codec contract (a new format needs nothing more)."""
    covered = {c.quantizer for c, *_ in [*CASES.values(), *AE_CASES.values(), *CONTRACT_ROWS.values()]}
    assert covered == set(names())


@pytest.mark.parametrize("label", sorted(CASES))
def test_prediction_equals_the_encoded_bits(label):
    config, shape, shared = CASES[label]
    W = weight_of(shape)
    if shared:  # fitted once for three matrices of this size, as phase 1 does for a model-wide codebook
        tensors = get_codec(config.quantizer).fit_shared(shared_training_vectors(W, config), config)
        weight = compress_weight(W, config, shared=tensors, shared_numel=3 * W.numel())
        assert weight.shared and weight.meta["shared_numel"] == 3 * W.numel()
        assert_predicted(weight, True, 3 * W.numel())
    else:
        weight = compress_weight(W, config)
        assert not weight.shared
        assert_predicted(weight, False)


@pytest.mark.parametrize("row", sorted(r for r in CONTRACT_ROWS if CONTRACT_ROWS[r][0].quantizer != "e8p"))
def test_prediction_of_the_contract_configs(row):
    """Every configuration of the codec contract (a new format's rows included), on a small matrix (e8p's are
    among the cases above: its scale search makes it the slow one)."""
    config = CONTRACT_ROWS[row][0]
    if config.quantizer == "additive":
        config = config.with_options(refine_iters=1, kmeans_iters=3)
    assert_predicted(compress_weight(weight_of(ODD), config), False)


def test_error_feedback_keeps_the_predicted_bits():
    config = cfg("vq", bits=2, error_feedback="gptq", options={"dim": 2, **FAST_VQ})
    W = weight_of(SHAPE)
    X = torch.randn(256, SHAPE[1], generator=torch.Generator().manual_seed(1))
    weight = compress_weight(W, config, moments=X.T @ X / X.shape[0])
    assert weight.meta["error_feedback"] == "gptq"
    assert_predicted(weight, False)


def ae_group(config: CompressionConfig, shapes, seed: int = 0) -> list[ReALLMWeight]:
    """The containers of one autoencoder group (one decoder and latent codebook for all), untrained: the stored
    layout does not depend on training."""
    pms = [prepare_matrix(weight_of(s, seed + i), config, f"m{i}") for i, s in enumerate(shapes)]
    data = ae_recipe.GroupData([pms], ae_format.ae_spec(config))
    stack = ae_recipe.AEStack(ae_format.ae_spec(config), config.bits, config.options.dim, 1, [seed])
    result = ae_recipe.export_group(stack, data, 0)
    return [build_container(pm, config, result) for pm in pms]


@pytest.mark.parametrize("label", sorted(AE_CASES))
def test_autoencoder_prediction_equals_the_exported_bits(label):
    config, shapes = AE_CASES[label]
    group_numel = sum(p * q for p, q in shapes)
    for weight in ae_group(config, shapes):
        assert weight.meta["shared_numel"] == group_numel
        assert_predicted(weight, True, group_numel)
        assert_predicted(weight, False, group_numel)  # its decoder is shared whatever is asked


# ---------------------------------------------------------------------------------------------
# the budget, before and after encoding
# ---------------------------------------------------------------------------------------------
BASE = cfg("nf", bits=3, rank=2, lowrank_dtype="int8", magnitude_dtype="float16")
CANDIDATES = {
    "nf3": {},
    "nf2_perm": {"bits": 2, "permute": True},
    "vq2_model": {"quantizer": "vq", "bits": 2, "options": {"dim": 4, "codebook_scope": "model", **FAST_VQ}},
    "ae_model": {"quantizer": "autoencoder", "bits": 2, "options": {**AE, "n_stages": 2, "latent_channels": 2,
                                                                     "kernels": [1, 3]}},
    "ae_type": {"quantizer": "autoencoder", "bits": 3, "options": {**AE, "share": "type"}},
}
LAYERS = {"model.layers.0.q_proj": (64, 64), "model.layers.0.up_proj": (96, 64), "model.layers.1.q_proj": (64, 64),
          "model.layers.1.up_proj": (ODD[1], ODD[0])}


def encoded_candidates(adaptive: AdaptiveConfig):
    """Every candidate of every layer stored as the autoencoder phase stores it (a model-wide codebook per
    label, one decoder per autoencoder group), with the stats `select` reads."""
    layers = {n: torch.nn.Linear(q, p, bias=False) for n, (p, q) in LAYERS.items()}
    torch.manual_seed(0)
    cands = {n: candidate_configs(BASE, adaptive) for n in layers}
    out: dict[str, dict] = {n: {} for n in layers}
    for label in adaptive.candidates:
        plain = [(n, m, cands[n][label]) for n, m in layers.items() if cands[n][label].quantizer != "autoencoder"]
        shared = fit_shared_tensors(plain, progress=False)
        for n, m, c in plain:
            tensors, numel = shared.get(c.key(), (None, None))
            out[n][label] = compress_weight(m.weight.detach(), c, name=n, shared=tensors, shared_numel=numel)
        groups: dict[str, list[str]] = {}
        for n in layers:
            if cands[n][label].quantizer == "autoencoder":
                groups.setdefault(shared_group(cands[n][label], n, "model.layers"), []).append(n)
        for members in groups.values():
            c = cands[members[0]][label]
            pms = [prepare_matrix(layers[n].weight.detach(), c, n) for n in members]
            data = ae_recipe.GroupData([pms], ae_format.ae_spec(c))
            stack = ae_recipe.AEStack(ae_format.ae_spec(c), c.bits, c.options.dim, 1, [0])
            result = ae_recipe.export_group(stack, data, 0)
            for pm in pms:
                out[pm.name][label] = build_container(pm, c, result)
    matrices = []
    for n, layer in layers.items():
        W = layer.weight.detach()
        matrices.append((n, {lab: (w, {"rel_frobenius_error": relative_error(W, w.dequantize()),
                                        "w_norm2": float(W.square().sum())}) for lab, w in out[n].items()}))
    return [(n, LAYERS[n], cands[n]) for n in layers], matrices


def numbers(message: str) -> tuple[int, int]:
    """(budget, cheapest total) in bits, as a "no configuration fits" message gives them."""
    found = re.search(r"budget of (\d+) bits \(the cheapest choice needs about (\d+) bits", message)
    assert found, message
    return int(found[1]), int(found[2])


@pytest.fixture(scope="module")
def problem():
    adaptive = AdaptiveConfig(budget=3.0, candidates=CANDIDATES)
    shapes, matrices = encoded_candidates(adaptive)
    return adaptive, shapes, matrices


def test_budget_refused_before_encoding_exactly_when_refused_after(problem):
    adaptive, shapes, matrices = problem
    labels = sorted(CANDIDATES)
    total = sum(p * q for p, q in LAYERS.values())
    with pytest.raises(UserError) as late:
        select(matrices, labels, AdaptiveConfig(budget=0.01, candidates=CANDIDATES))
    cheapest = numbers(str(late.value))[1] / total
    refused = 0
    for beta in (0.01, cheapest * 0.9, cheapest * (1 - 1e-6), cheapest, cheapest * 1.01, 2.0, 8.0):
        ad = AdaptiveConfig(budget=beta, candidates=CANDIDATES)
        try:
            select(matrices, labels, ad)
        except UserError as e:
            refused += 1
            with pytest.raises(UserError) as early:
                check_budget(shapes, ad, "model.layers")
            assert numbers(str(early.value)) == numbers(str(e)), (str(early.value), str(e))
            assert "before any was encoded" in str(early.value) and "\n" not in str(early.value)
        else:
            check_budget(shapes, ad, "model.layers")  # a budget that fits passes
    assert refused >= 2


def test_no_check_without_a_choice(problem):
    _, shapes, _ = problem
    one = [(n, shape, {"nf3": c["nf3"]}) for n, shape, c in shapes]
    check_budget(one, AdaptiveConfig(budget=0.01, candidates={"nf3": {}}), "model.layers")
    check_budget(shapes, None, "model.layers")


# ---------------------------------------------------------------------------------------------
# the phase: refused in setup, before calibration, encoding or training
# ---------------------------------------------------------------------------------------------
TINY = """
trainer:
  max_epochs: 1
model:
  init_args:
    compression:
      options:
        {dim: 2, patch: 16, n_stages: 1, latent_channels: 4, encoder_width: 8, encoder_blocks: 0, decoder_width: 8,
         kernels: [3], share: model}
    schedule: {batch_size: 8, kmeans_iters: 3}
    adaptive:
      budget: 0.1
      candidates:
        ae_large_latent: {}
        ae_small_latent: {bits: 2, options: {n_stages: 2, latent_channels: 2, decoder_width: 12, kernels: [1, 3]}}
        vq3: {quantizer: vq, options: {dim: 2, codebook_scope: model, kmeans_iters: 3}}
"""


def phase_args(tmp_path: Path) -> list[str]:
    """The command line of a ReALLM phase 1 on a tiny Llama (14 matrices), on the CPU."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    model_dir = save_tiny_model_dir(tmp_path / "tiny_llama")
    configs = [ROOT / "configs/ae.yaml", ROOT / "configs/methods/reallm-3bit.yaml", tmp_path / "tiny.yaml"]
    return ["fit", *[a for c in configs for a in ("--config", str(c))],
            "--model.init_args.model_name_or_path", str(model_dir), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--run_dir", str(tmp_path / "run")]


def test_phase_refuses_an_impossible_budget_before_encoding(tmp_path, monkeypatch):
    """The early refusal writes nothing and encodes nothing; its numbers are those of the refusal after encoding
    and training (the same run with the early check switched off)."""
    args = phase_args(tmp_path)
    monkeypatch.setenv("REALLM_DEBUG", "1")  # the UserError itself, not the CLI's exit

    def never(*_, **__):
        raise AssertionError("encoding began before the budget was checked")

    with monkeypatch.context() as m:
        for name in ("compress_weight", "prepare_matrix", "fit_shared_tensors"):
            m.setattr(ae_phase, name, never)
        m.setattr(ae_phase.AutoencoderPhase, "input_moments", never)
        with pytest.raises(UserError) as early:
            cli_main(args)
    assert "before any was encoded" in str(early.value)
    assert not (tmp_path / "run" / "partial" / "cand").exists()
    assert not (tmp_path / "run" / "results.json").exists()

    monkeypatch.setattr(ae_phase, "check_budget", lambda *_, **__: None)
    with pytest.raises(UserError) as late:
        cli_main(args)
    assert (tmp_path / "run" / "partial" / "cand").is_dir()  # this time every candidate was encoded first
    assert numbers(str(early.value)) == numbers(str(late.value)), (str(early.value), str(late.value))
