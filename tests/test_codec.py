"""The patch autoencoder (format: reallm.formats.autoencoder.codec; recipe: reallm.formats.autoencoder.recipe): stored
containers decode to what was trained, the decoder takes at most 2^b_φ values per scale group, bits equal
saved bytes, vmapped stacks equal the individual modules, edge patches store no latent for the padding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from reallm.formats.autoencoder import codec as ae_format
from reallm.formats.autoencoder import recipe as ae_recipe
from reallm.formats.autoencoder.ste import LatentVQ
from reallm.ops.patches import patches_to_matrix
from reallm.phases.autoencoder_matrices import build_container, prepare_matrix
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.pipeline import relative_error


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the networks here are tiny: with several threads on a busy machine, thread synchronisation costs
    # far more than the convolutions themselves (50x measured on a loaded 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


AE = {"patch": 16, "n_stages": 1, "latent_channels": 4, "encoder_width": 8, "encoder_blocks": 0,
      "decoder_width": 8, "kernels": [3], "weight_bits": 6, "share": "model"}


def config(dim: int = 2, network: dict | None = None, **kw) -> CompressionConfig:
    """An autoencoder config: options dim and the network AE, with `network`'s keys changed; `kw` the shared fields."""
    return CompressionConfig(**{"quantizer": "autoencoder", "bits": 3, "permute": True, "rank": 0,
                                "options": {"dim": dim, **AE, **(network or {})}, **kw})


def trained(cfg: CompressionConfig, shapes=((40, 24), (24, 33)), epochs: int = 4, qat: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Ws = {f"m{i}": torch.randn(*s, generator=g) * (0.1 + i) for i, s in enumerate(shapes)}
    spec = ae_format.ae_spec(cfg)
    pms = [prepare_matrix(W, cfg, n) for n, W in Ws.items()]
    data = ae_recipe.GroupData([pms], spec)
    stack = ae_recipe.AEStack(spec, cfg.bits, cfg.options.dim, 1, [seed], qat=qat)
    hist = ae_recipe.train_stacks([(stack, data)], ae_recipe.TrainSchedule(epochs=epochs, lr=3e-3, batch_size=4,
                                                                   kmeans_iters=5))
    return Ws, pms, data, stack, hist


@pytest.fixture(scope="module")
def group():
    cfg = config()
    Ws, pms, data, stack, hist = trained(cfg)
    res = ae_recipe.export_group(stack, data, 0)
    weights = {pm.name: build_container(pm, cfg, res) for pm in pms}
    return cfg, Ws, pms, data, stack, hist, res, weights


def test_container_decodes_to_the_trained_reconstruction(group):
    cfg, Ws, pms, data, stack, hist, res, weights = group
    assert stack.mode == "frozen"  # the recipe ends with frozen codes
    with torch.no_grad():  # the stack's own forward on every patch, with the stored codes
        idx = torch.arange(data.n_max)[None]
        x, w, m, idx = data.batch(idx, "cpu")
        recon = stack.decode(stack.latent(x, m, idx))[0]  # (n, 1, P, P)
    for name, shape, (a, b) in data.members[0]:
        Y = patches_to_matrix(recon[a:b], shape, ae_format.ae_spec(cfg).patch_hw)
        c = weights[name]
        Y_stored = ae_format.decode_autoencoder(c.frozen, c.meta, cfg, shape, c.shared)
        assert torch.allclose(Y, Y_stored, atol=1e-5), float((Y - Y_stored).abs().max())
    # the training loss *is* the relative squared Frobenius error of W: the stack's loss on every patch
    # equals the size-weighted mean of ‖W − Ŵ‖² / ‖W‖² measured on the stored containers
    with torch.no_grad():
        err_sum, count = stack.loss(x, w, m, idx)
    sizes = {n: W.numel() for n, W in Ws.items()}
    measured = sum(sizes[n] * relative_error(Ws[n], wt.dequantize()) ** 2 for n, wt in weights.items())
    measured /= sum(sizes.values())
    assert float(err_sum[0] / count[0]) == pytest.approx(measured, rel=1e-4)
    # and training lowered it below the all-zero reconstruction's (1.0 on these random matrices: 0.89)
    assert math.isfinite(hist[-1]) and hist[-1] < hist[0] and measured < 0.95


def test_training_reduces_the_error_on_a_structured_matrix():
    cfg = config(permute=False)
    i, j = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    W = torch.sin(i / 5) * torch.cos(j / 7) + 0.3 * torch.sin((i + j) / 9)  # smooth "image"
    spec = ae_format.ae_spec(cfg)
    pm = prepare_matrix(W, cfg, "w")
    data = ae_recipe.GroupData([[pm]], spec)
    stack = ae_recipe.AEStack(spec, 3, 2, 1, [0])
    sched = ae_recipe.TrainSchedule(epochs=40, lr=5e-3, batch_size=9, kmeans_iters=5)
    hist = ae_recipe.train_stacks([(stack, data)], sched)
    w = build_container(pm, cfg, ae_recipe.export_group(stack, data, 0))
    err = relative_error(W, w.dequantize())
    assert hist[-1] < 0.2 * hist[0] and err < 0.3, (hist[0], hist[-1], err)


def test_decoder_weights_take_at_most_2_pow_b_values_per_channel(group):
    cfg, *_, res, weights = group
    for w in weights.values():
        dec = ae_format.unpack_decoder(w.meta["decoder"],
                                       {k: v for k, v in w.shared.items() if k.startswith("decoder.")})
        for name, conv in dec.quant_convs():
            flat = conv.weight.detach().reshape(conv.weight.shape[0], -1)
            for row in flat:  # one fp16 scale per output channel: one scale group
                assert row.unique().numel() <= 2 ** 6, name


@pytest.mark.parametrize("share", ["matrix", "model"])
def test_bits_equal_saved_bytes(tmp_path, share):
    cfg = config(network={"share": share})
    Ws, pms, data, stack, _ = trained(cfg, shapes=((64, 48),), epochs=1)
    res = ae_recipe.export_group(stack, data, 0)
    w = build_container(pms[0], cfg, res)
    tensors, meta = w.to_dict()
    tensors.update({f"shared.{k}": v for k, v in w.shared.items()})
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    data_bytes = path.stat().st_size - 8 - header
    bits = w.bits()
    assert bits["total"] / 8 == pytest.approx(data_bytes, rel=0.01)
    assert {"latent", "decoder", "scales", "permutation"} <= set(bits)
    # the decoder is stored bit-packed at b_φ: its bits are those of decoder_storage_bits (byte padding aside)
    from reallm.formats.autoencoder.networks import decoder_storage_bits

    assert bits["decoder"] == pytest.approx(decoder_storage_bits(stack.decoder(0)), rel=0.01)
    json.dumps(meta)  # the container's metadata is JSON-able


def test_round_trip_through_dict(group):
    cfg, Ws, pms, data, stack, hist, res, weights = group
    w = weights["m0"]
    tensors, meta = w.to_dict()
    back = ReALLMWeight.from_dict(tensors, json.loads(json.dumps(meta)), dict(w.shared))
    assert torch.equal(back.dequantize(), w.dequantize())


def test_latent_mask_stores_no_padding():
    spec = ae_format.AESpec.from_dict({**AE, "patch": 32})
    m = ae_format.latent_mask((172, 64), spec)
    assert m.shape == (12, 1, 16, 16)  # 6 x 2 patches of 32²
    assert int(m.sum()) == 86 * 32  # ⌈172/2⌉ x ⌈64/2⌉ positions, not 96 x 32
    assert ae_format.latent_numel((172, 64), spec) == 86 * 32 * 4
    m = ae_format.latent_mask((33, 70), ae_format.AESpec.from_dict({**AE, "patch": [16, 32], "n_stages": 2}))
    assert int(m.sum()) == 9 * 18


def test_vector_layout_matches_latent_vq():
    z = torch.randn(3, 8, 5, 6)
    for d in (1, 2, 4):
        vq = LatentVQ(bits=2, dim=d)
        v = ae_format.to_vectors(z, d)  # (3, 8/d, 5, 6, d)
        assert torch.equal(v.reshape(-1, d), vq.to_vectors(z))
        assert torch.equal(ae_format.from_vectors(v), z)


def test_vmapped_stack_equals_individual_modules():
    spec = ae_format.AESpec.from_dict(AE)
    stack = ae_recipe.AEStack(spec, 3, 2, 3, [1, 2, 3])
    x = torch.randn(3, 2, 1, 16, 16)
    with torch.no_grad():
        z = stack.encode(x)
        y = stack.decode(z)
        for g in range(3):
            torch.manual_seed(0)
            dec = stack.decoder(g)
            assert torch.allclose(dec(z[g]), y[g], atol=1e-5)


def test_spec_validation():
    with pytest.raises(ValueError, match="not divisible"):
        ae_format.AESpec.from_dict({**AE, "patch": 18, "n_stages": 2})
    with pytest.raises(ValueError, match="'AESpec' has no option 'latent'"):
        ae_format.AESpec.from_dict({**AE, "latent": 3})
    with pytest.raises(ValueError, match=r"multiple of options\.dim d=4"):
        ae_format.ae_spec(config(dim=4, network={"latent_channels": 2}))
    with pytest.raises(ValueError, match="share"):
        ae_format.AESpec.from_dict({**AE, "share": "layer"})
    spec = ae_format.AESpec.from_dict({**AE, "decoder_width": None, "decoder_params": 20000})
    assert abs(spec.decoder_params_count() - 20000) / 20000 < 0.05


def test_group_keys():
    cfg = config(network={"share": "type_blocks:2"})
    k = lambda n: ae_recipe.group_key(cfg, n, "model.layers")  # noqa: E731
    assert k("model.layers.0.self_attn.q_proj") == k("model.layers.1.self_attn.q_proj")
    assert k("model.layers.0.self_attn.q_proj") != k("model.layers.2.self_attn.q_proj")
    assert k("model.layers.0.self_attn.q_proj") != k("model.layers.0.self_attn.k_proj")
    m = config(network={"share": "matrix"})
    assert ae_recipe.group_key(m, "a.0.q") != ae_recipe.group_key(m, "a.1.q")
    assert ae_recipe.stack_key(m) == ae_recipe.stack_key(config(network={"share": "model"}))


def test_lowrank_and_rotation_paths():
    cfg = config(rank=2, rotation="hadamard", permute=False)
    Ws, pms, data, stack, _ = trained(cfg, shapes=((32, 32),), epochs=1)
    w = build_container(pms[0], cfg, ae_recipe.export_group(stack, data, 0))
    assert w.rank == 2 and "rotation_seeds" in w.frozen and w.bits()["lowrank"] > 0
    assert w.dequantize().shape == (32, 32) and math.isfinite(relative_error(Ws["m0"], w.dequantize()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_codec_on_cuda():
    cfg = config()
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g).cuda()
    spec = ae_format.ae_spec(cfg)
    pm = prepare_matrix(W, cfg, "m")
    data = ae_recipe.GroupData([[pm]], spec)
    stack = ae_recipe.AEStack(spec, 3, 2, 1, [0]).cuda()
    ae_recipe.train_stacks([(stack, data)], ae_recipe.TrainSchedule(epochs=3, batch_size=4, kmeans_iters=3))
    w = build_container(pm, cfg, ae_recipe.export_group(stack, data, 0))
    assert w.frozen["latent_codes"].is_cuda and w.dequantize().is_cuda
    cpu = w.to("cpu").dequantize()
    assert torch.allclose(cpu, w.dequantize().cpu(), atol=1e-4)


def test_latent_codebook_learns_by_gradient_in_the_vq_and_frozen_stages_only():
    """The stack's latent codebook gets a gradient through z_q = codebook[codes] once the VQ stage has
    started (deliberately: see AEStack), none in the float stage."""
    cfg = config()
    spec = ae_format.ae_spec(cfg)
    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    data = ae_recipe.GroupData([[prepare_matrix(W, cfg, "w")]], spec)
    stack = ae_recipe.AEStack(spec, cfg.bits, cfg.options.dim, 1, [0])
    x, w, m, idx = data.batch(torch.arange(data.n_max)[None], "cpu")
    grads = {}
    for stage in ("float", "vq", "frozen"):
        if stage == "vq":
            stack.refresh_codebooks(data, iters=3)
        elif stage == "frozen":
            stack.freeze_codes(data)
        stack.zero_grad(set_to_none=True)
        err, _ = stack.loss(x, w, m, idx)
        err.sum().backward()
        grads[stage] = stack.codebook.grad
    assert grads["float"] is None
    assert float(grads["vq"].abs().sum()) > 0 and float(grads["frozen"].abs().sum()) > 0
