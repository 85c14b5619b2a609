"""Phase 1 with the patch autoencoder and the adaptive choice, on a tiny model through the CLI: the model
really uses the decoded weights, the choice and its reasons are in results.json, bits equal the saved
bytes, save → load gives identical logits, two devices give the single-device checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ALL, sample_ids, save_tiny_model_dir

from reallm import load_compressed, save_compressed
from reallm.checkpoint.directory import read_meta
from reallm.core.hf_models import linear_weight
from reallm.formats.autoencoder import codec as ae_format
from reallm.formats.autoencoder import recipe as ae_recipe
from reallm.layer.linear import iter_reallm_layers
from reallm.model.surgery import select_layers, swap_in
from reallm.phases.autoencoder_matrices import build_container, prepare_matrix
from reallm.run.cli import cli_main
from reallm.weight.config import CompressionConfig

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]

# small networks and few epochs; the budget forces a mix of cheap autoencoder matrices and VQ ones. A mapping given
# by a later config file replaces the earlier one whole (jsonargparse): `options` is given in full (dim included)
TINY = """
trainer:
  max_epochs: 2
model:
  init_args:
    compression:
      options:
        {dim: 2, patch: 16, n_stages: 1, latent_channels: 4, encoder_width: 8, encoder_blocks: 0, decoder_width: 8,
         kernels: [3], share: model}
    schedule: {batch_size: 8, kmeans_iters: 5}
    adaptive:
      budget: 2.0
      candidates:
        ae_large_latent: {}
        ae_small_latent: {bits: 2, options: {n_stages: 2, latent_channels: 2, decoder_width: 12, kernels: [1, 3]}}
        vq3: {quantizer: vq, options: {dim: 2, codebook_scope: model, kmeans_iters: 5}}
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # tiny networks: thread synchronisation would dominate (see test_codec)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def ae_args(tiny_dir, run_dir, tiny_yaml, *extra, preset="reallm-3bit"):
    return ["fit", "--config", str(ROOT / "configs/ae.yaml"), "--config", str(ROOT / f"configs/methods/{preset}.yaml"),
            "--config", str(tiny_yaml), "--model.init_args.model_name_or_path", str(tiny_dir), *CPU,
            "--run_dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def adaptive_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae_run")
    (tmp / "tiny.yaml").write_text(TINY)
    cli_main(ae_args(tiny_dir, tmp / "run", tmp / "tiny.yaml"))
    return tmp / "run", tmp / "tiny.yaml"


def logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


def ae_layers(model):
    return [(n, m) for n, m in iter_reallm_layers(model) if m.config.quantizer == "autoencoder"]


def test_phase_results_choice_and_reasons(adaptive_run):
    run, _ = adaptive_run
    res = json.loads((run / "results.json").read_text())
    assert res["phase"] == "compress" and res["method"] == "reallm-3bit" and res["complete"]
    ad = res["adaptive"]
    assert ad["status"] == "optimal" and ad["bits_per_weight"] <= 2.0 + 1e-9
    assert res["bits"]["decoder_linears"] == pytest.approx(ad["bits_per_weight"], rel=1e-6)
    assert sum(ad["counts"].values()) == len(res["matrices"]) == 14
    assert ad["counts"]["ae_small_latent"] > 0 and ad["counts"]["vq3"] > 0  # a real mix under this budget
    best_single = min((s["objective"] for s in ad["single_config"].values() if s["fits_budget"]), default=None)
    assert best_single is None or ad["objective_value"] <= best_single * (1 + 1e-9)
    for m in res["matrices"]:
        assert m["config"] in ad["counts"] and m["reason"].startswith(m["config"])
        assert set(m["candidates"]) == {"ae_large_latent", "ae_small_latent", "vq3"}
        assert m["rel_frobenius_error"] == pytest.approx(m["candidates"][m["config"]]["rel_frobenius_error"])
    log = (run / "logs" / "metrics.csv").read_text()
    assert "recon_rel_error" in log


def test_model_uses_the_decoded_weights(adaptive_run):
    run, _ = adaptive_run
    model = load_compressed(run / "reallm")
    layers = ae_layers(model)
    assert layers
    name, layer = layers[0]
    ref = logits(model)
    before = layer.dequantize().clone()
    codes = layer.frozen__latent_codes
    codes.copy_(codes ^ 0b101)  # change latent codes in place
    layer.clear_cache()
    assert not torch.equal(layer.dequantize(), before)
    assert not torch.allclose(logits(model), ref)


def test_decoders_after_the_phase_take_at_most_2_pow_b_values(adaptive_run):
    model = load_compressed(adaptive_run[0] / "reallm")
    for _, layer in ae_layers(model):
        shared = layer._shared_tensors()
        dec = ae_format.unpack_decoder(layer.meta["decoder"],
                                       {k: v for k, v in shared.items() if k.startswith("decoder.")})
        for _, conv in dec.quant_convs():
            assert conv.weight_bits == 6
            for row in conv.weight.detach().reshape(conv.weight.shape[0], -1):
                assert row.unique().numel() <= 64


def test_accounted_bits_equal_saved_bytes(adaptive_run):
    run = adaptive_run[0]
    res = json.loads((run / "results.json").read_text())
    # the bytes each tensor occupies in the files, from the safetensors headers' data offsets
    def file_bytes(path, keep=lambda key: True) -> int:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                   if k != "__metadata__" and keep(k))

    dense = set(read_meta(run / "reallm")["dense"])  # embeddings, norms: not decoder linears
    nbytes = file_bytes(run / "reallm" / "model.safetensors",  # shared tensors are stored once
                        lambda k: k not in dense and not k.endswith(".bias"))
    accounted = res["bits"]["decoder_linears"] * sum(m["shape"][0] * m["shape"][1] for m in res["matrices"])
    assert accounted / 8 == pytest.approx(nbytes, rel=0.01)


def test_save_load_identical_logits(tmp_path):
    """A model with autoencoder layers built in memory, saved, loaded: identical logits."""
    model = ALL["llama"](0)
    network = {"patch": 16, "n_stages": 1, "latent_channels": 4, "encoder_width": 8, "encoder_blocks": 0,
               "decoder_width": 8, "kernels": [3], "share": "type"}
    cfg = CompressionConfig(quantizer="autoencoder", bits=3, permute=True, rank=2,
                            options={"dim": 2, **network})
    targets = select_layers(model, cfg)
    groups: dict[str, list] = {}
    for name, mod, c in targets:
        groups.setdefault(ae_recipe.group_key(c, name, "model.layers"), []).append(
            prepare_matrix(linear_weight(mod), c, name))
    spec = ae_format.ae_spec(cfg)
    keys = sorted(groups)
    data = ae_recipe.GroupData([groups[k] for k in keys], spec)
    stack = ae_recipe.AEStack(spec, 3, 2, len(keys), list(range(len(keys))))
    ae_recipe.train_stacks([(stack, data)], ae_recipe.TrainSchedule(epochs=2, batch_size=4, kmeans_iters=3))
    for g, k in enumerate(keys):
        res = ae_recipe.export_group(stack, data, g)
        for pm in groups[k]:
            swap_in(model, pm.name, build_container(pm, cfg, res))
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.lora_B.add_(0.01)  # adapters away from their initial values
    ref = logits(model)
    save_compressed(model, tmp_path / "ck")
    back = load_compressed(tmp_path / "ck")
    assert torch.equal(logits(back), ref)
    meta = read_meta(tmp_path / "ck")
    digests = {d for rec in meta["layers"].values() for d in rec["shared"].values()}
    n_shared = sum(1 for k in load_file(tmp_path / "ck" / "model.safetensors") if k.startswith("reallm.shared."))
    assert n_shared == len(digests) < sum(len(rec["shared"]) for rec in meta["layers"].values())  # stored once


def test_interrupted_run_resumes(adaptive_run, tiny_dir, tmp_path):
    """Candidates and groups already on disk are not recomputed; the result is identical."""
    run, tiny_yaml = adaptive_run
    import shutil

    again = tmp_path / "again"
    shutil.copytree(run / "partial", again / "partial")
    for p in (again / "partial").glob("0*.json"):  # only the candidates survive the "interruption"
        p.unlink()
    cli_main(ae_args(tiny_dir, again, tiny_yaml))
    a = load_file(run / "reallm" / "model.safetensors")
    b = load_file(again / "reallm" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_give_the_single_device_checkpoint(adaptive_run, tiny_dir, tmp_path):
    """Matrices and autoencoder groups are divided among 2 CPU processes (gloo, `ddp_matrices`): the data-free
    candidates (vq3, with a model-wide codebook fitted on every rank) by matrix, the groups by cost; each is encoded
    or trained exactly as on one device, so the checkpoint is byte-identical to the single-process one."""
    run, tiny_yaml = adaptive_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the single-device run used one thread too
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *ae_args(tiny_dir, tmp_path / "ddp", tiny_yaml, "--trainer.devices", "2",
                                    "--trainer.strategy", "ddp_matrices")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for name in ("model.safetensors", "config.json"):
        assert sha(tmp_path / "ddp" / "reallm" / name) == sha(run / "reallm" / name)
