"""Patch autoencoder (method.md §4): patches, encoder/decoder shapes, decoder width from its budget,
QAT at b_φ bits, export/rebuild of the decoder, and short training runs with numbers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from reallm.formats.autoencoder.networks import (
    ConvNeXtBlock,
    PatchAutoencoder,
    PatchEncoder,
    PixelShuffleDecoder,
    decoder_channels,
    decoder_from_state,
    decoder_param_count,
    decoder_storage_bits,
    export_decoder,
    quantize_decoder_,
    set_decoder_quantization_,
    solve_decoder_width,
)
from reallm.formats.autoencoder.ste import LatentVQ, QuantConv2d, quantize_weight_per_channel
from reallm.ops.patches import matrix_to_patches, patches_to_matrix


# -------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize("shape,patch", [((172, 64), 32), ((64, 64), 32), ((5, 7), 4), ((33, 70), (16, 8))])
def test_patches_round_trip_exact(shape, patch):
    torch.manual_seed(0)
    M = torch.randn(*shape)
    x, orig = matrix_to_patches(M, patch)
    p0, p1 = (patch, patch) if isinstance(patch, int) else patch
    nr, nc = math.ceil(shape[0] / p0), math.ceil(shape[1] / p1)
    assert orig == shape and x.shape == (nr * nc, 1, p0, p1)
    assert torch.equal(patches_to_matrix(x, orig, patch), M)
    # row-major patch order, zero padding
    assert torch.equal(x[0, 0], F.pad(M, (0, nc * p1 - shape[1], 0, nr * p0 - shape[0]))[:p0, :p1])
    if nc > 1:
        assert torch.equal(x[1, 0, : min(p0, shape[0]), : min(p1, shape[1] - p1)], M[:p0, p1 : 2 * p1])
    assert (x != 0).sum() == (M != 0).sum()  # padding is zeros


def test_patches_172x64():
    M = torch.arange(172 * 64, dtype=torch.float32).reshape(172, 64)
    x, shape = matrix_to_patches(M, 32)
    assert x.shape == (12, 1, 32, 32)  # 6 x 2 patches, last row of patches padded 172 -> 192
    assert torch.equal(x[11, 0, 12:], torch.zeros(20, 32))
    assert torch.equal(patches_to_matrix(x, shape, 32), M)


# ------------------------------------------------------------------------------------- encoder
def test_convnext_block_shape_and_near_identity():
    torch.manual_seed(0)
    blk = ConvNeXtBlock(8)
    x = torch.randn(2, 8, 9, 9)
    y = blk(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 1e-3  # layer scale 1e-6 at init


@pytest.mark.parametrize("P", [16, 32, 64])
@pytest.mark.parametrize("n_stages", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("e2", [1, 2, 16])
def test_encoder_decoder_shapes(P, n_stages, e2):
    torch.manual_seed(0)
    enc = PatchEncoder(n_stages=n_stages, width=8, latent_channels=e2)
    dec = PixelShuffleDecoder(latent_channels=e2, width=8, n_stages=n_stages, min_channels=4, weight_bits=4)
    ae = PatchAutoencoder(enc, dec)
    x = torch.randn(2, 1, P, P)
    z = ae.encode(x)
    e0 = P // 2**n_stages
    assert z.shape == (2, e2, e0, e0)
    assert ae.latent_shape(P) == (e0, e0, e2)
    assert ae(x).shape == x.shape


def test_shapes_five_stages_and_large_patch():
    torch.manual_seed(0)
    for P in (32, 64):
        ae = PatchAutoencoder(PatchEncoder(5, 4, 16), PixelShuffleDecoder(16, 8, 5, min_channels=4))
        assert ae(torch.randn(1, 1, P, P)).shape == (1, 1, P, P)
        assert ae.latent_shape(P) == (P // 32, P // 32, 16)
    # the paper's patch: 512 -> latent (16, 16, 16) with 5 stages (tiny widths to stay fast)
    enc = PatchEncoder(n_stages=5, width=4, latent_channels=16)
    dec = PixelShuffleDecoder(16, width=6, n_stages=5, min_channels=2, weight_bits=6)
    ae = PatchAutoencoder(enc, dec)
    with torch.no_grad():
        x = torch.randn(1, 1, 512, 512)
        z = ae.encode(x)
        assert z.shape == (1, 16, 16, 16)
        assert ae.decode(z).shape == (1, 1, 512, 512)
    # rectangular patch
    assert PatchEncoder(2, 4, 2)(torch.randn(1, 1, 16, 8)).shape == (1, 2, 4, 2)
    with pytest.raises(ValueError):
        PatchEncoder(3, 4, 2)(torch.randn(1, 1, 12, 12))  # 12 not divisible by 2**3


def test_decoder_structure():
    dec = PixelShuffleDecoder(16, width=40, n_stages=5, weight_bits=6)
    assert dec.channels == decoder_channels(40) == [40, 33, 28, 23, 19, 16]
    assert [c.kernel_size[0] for c in dec.stages] == [1, 3, 5, 5, 5]
    assert [c.out_channels for c in dec.stages] == [4 * c for c in dec.channels[1:]]
    assert all(isinstance(m, QuantConv2d) and m.weight_bits == 6 for _, m in dec.quant_convs())
    assert len(list(dec.quant_convs())) == 7  # stem + 5 stages + head
    # kernels beyond the list repeat the last one; min_channels floors the widths
    dec = PixelShuffleDecoder(2, width=10, n_stages=4, kernels=(1, 3), min_channels=9)
    assert [c.kernel_size[0] for c in dec.stages] == [1, 3, 3, 3]
    assert dec.channels == [10, 9, 9, 9, 9]


# ------------------------------------------------------------------------------- decoder budget
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"latent_channels": 2, "n_stages": 3, "kernels": (1, 3, 5), "min_channels": 4},
        {"latent_channels": 1, "n_stages": 0},
        {"latent_channels": 16, "n_stages": 6, "reduction": 1.5, "min_channels": 3},
    ],
)
def test_param_count_matches_module(kw):
    for width in (1, 7, 40):
        dec = PixelShuffleDecoder(width=width, **kw)
        n = sum(p.numel() for p in dec.parameters())
        assert decoder_param_count(width, **kw) == n


@pytest.mark.parametrize(
    "budget,kw",
    [
        (7.2e6, {}),  # the paper's setting: F = 253, 7,183,680 parameters (-0.23 %)
        (5e4, {}),  # F = 16: +0.55 %
        (3e5, {}),  # F = 52: +0.62 %
        (1e6, {}),  # F = 95: +1.16 %
        (2e4, {"n_stages": 3, "min_channels": 4}),  # F = 18: +0.53 %
        (1e5, {"n_stages": 2, "min_channels": 1}),  # F = 64: -0.61 %
    ],
)
def test_solve_decoder_width_within_two_percent(budget, kw):
    f = solve_decoder_width(budget, **kw)
    count = decoder_param_count(f, **kw)
    assert abs(count - budget) / budget < 0.02
    # and it is the best integer width
    best = min(range(1, 4 * f + 10), key=lambda g: abs(decoder_param_count(g, **kw) - budget))
    assert abs(decoder_param_count(best, **kw) - budget) == abs(count - budget)
    if budget == 7.2e6:
        assert f == 253


def test_solve_decoder_width_closest_even_when_not_reachable():
    # With the paper's defaults the smallest decoder (F = 1, all widths at the floor of 12) already
    # has 48,798 parameters, and the count jumps 95,614 -> 105,683 between F = 29 and F = 30, so
    # 2e4 and 1e5 cannot be met within 2 %; the solver still returns the closest width.
    assert solve_decoder_width(2e4) == 1
    assert solve_decoder_width(1e5) == 29
    for budget in (3e3, 6e4, 2.5e5, 2e6):
        f = solve_decoder_width(budget)
        errs = [abs(decoder_param_count(g) - budget) for g in range(1, 400)]
        assert abs(decoder_param_count(f) - budget) == min(errs)


def test_decoder_storage_bits():
    dec = PixelShuffleDecoder(16, width=253, n_stages=5, weight_bits=6)
    n_weights = sum(m.weight.numel() for _, m in dec.quant_convs())
    n_out = sum(m.out_channels for _, m in dec.quant_convs())
    assert decoder_storage_bits(dec) == 6 * n_weights + 16 * n_out + 16 * n_out  # codes, scales, biases
    # paper's worked example: (6·7.2e6 + 16·16³·64) / 4096² ≈ 2.82 bits per weight (+ scales/biases)
    bpw = (decoder_storage_bits(dec) + 16 * 16**3 * 64) / 4096**2
    assert 2.80 < bpw < 2.83
    dec.stem.weight_bits = None  # an unquantized conv counts 16 bits per weight
    assert (
        decoder_storage_bits(dec)
        == 6 * (n_weights - dec.stem.weight.numel())
        + 16 * (n_out - dec.stem.out_channels)
        + 16 * dec.stem.weight.numel()
        + 16 * n_out
    )


# ---------------------------------------------------------------------------------- training helpers
def _smooth_matrix(rows: int = 64, cols: int = 32) -> torch.Tensor:
    """A smooth synthetic "image": sums of low-frequency sinusoids and a Gaussian bump, in [-1, 1]."""
    i = torch.linspace(0, 1, rows).view(-1, 1)
    j = torch.linspace(0, 1, cols).view(1, -1)
    M = (
        0.5 * torch.sin(2 * math.pi * (1.5 * i + 0.5 * j))
        + 0.3 * torch.cos(2 * math.pi * (0.7 * i - 1.2 * j))
        + 0.4 * torch.exp(-((i - 0.3) ** 2 + (j - 0.6) ** 2) / 0.02)
    )
    return M / M.abs().max()


def _tiny_autoencoder(bits: int | None, vq: LatentVQ | None = None) -> PatchAutoencoder:
    enc = PatchEncoder(n_stages=3, width=16, latent_channels=4)
    dec = PixelShuffleDecoder(
        latent_channels=4, width=24, n_stages=3, kernels=(1, 3, 3), min_channels=8, weight_bits=bits
    )
    return PatchAutoencoder(enc, dec, vq)


def _train(ae: PatchAutoencoder, x: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(ae(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _mse(ae: PatchAutoencoder, x: torch.Tensor) -> float:
    return F.mse_loss(ae(x), x).item()


def _distinct_per_channel(w: torch.Tensor) -> int:
    return max(torch.unique(w[c]).numel() for c in range(w.shape[0]))


# ------------------------------------------------------------------------------- QAT / export
def test_qat_weights_have_at_most_2_pow_b_values_and_export_is_bit_identical():
    torch.manual_seed(0)
    x, _ = matrix_to_patches(_smooth_matrix(), 32)  # (2, 1, 32, 32)
    ae = _tiny_autoencoder(bits=3)
    _train(ae, x, steps=5)
    for _, conv in ae.decoder.quant_convs():
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        # float weights are not on the grid, the weights used in the forward pass are
        assert _distinct_per_channel(conv.effective_weight().detach()) <= 2**3
        assert _distinct_per_channel(conv.weight.detach()) > 2**3 or conv.weight[0].numel() <= 8

    meta, tensors = export_decoder(ae.decoder)
    meta = json.loads(json.dumps(meta))  # JSON-able
    assert all(t.dtype in (torch.uint8, torch.float16) for t in tensors.values())
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"codes", "scale", "bias"}
    rebuilt = decoder_from_state(meta, tensors)
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(rebuilt(z), ae.decoder(z))  # bit-identical decompression
    stored_bits = sum(t.numel() * (3 if k.endswith(".codes") else 16) for k, t in tensors.items())
    assert decoder_storage_bits(ae.decoder) == decoder_storage_bits(rebuilt) == stored_bits

    # PTQ rounds the stored float weights themselves onto the grid; output unchanged, idempotent
    with torch.no_grad():
        before = ae.decoder(z)
        quantize_decoder_(ae.decoder)
        assert torch.equal(ae.decoder(z), before)
    for _, conv in ae.decoder.quant_convs():
        assert _distinct_per_channel(conv.weight.detach()) <= 2**3
        assert torch.equal(conv.weight, quantize_weight_per_channel(conv.weight, 3)[0])


def test_autoencoder_with_latent_vq_trains_encoder_through_ste():
    torch.manual_seed(0)
    x, _ = matrix_to_patches(_smooth_matrix(), 32)
    vq = LatentVQ(bits=2, dim=2, iters=20)  # K = 16 codewords for 2 * 2 * 4 * 4 = 64 latent vectors
    ae = _tiny_autoencoder(bits=4, vq=vq)
    z_q = ae.encode(x)
    assert bool(vq.initialized)
    assert torch.equal(z_q, vq.decode(vq.encode(ae.encoder(x)), z_q.shape))
    assert ae.refresh_latent_codebook(x) > 0
    loss = F.mse_loss(ae(x), x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ae.encoder.head.parameters())
    assert ae.encoder.stem.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ training
def test_training_reduces_error_and_qat_beats_ptq():
    """A 64x32 smooth matrix -> two 32x32 patches, latent (4, 4, 4); encoder 12,404 and decoder
    23,179 parameters (decoder widths 24, 20, 17, 14); 300 Adam steps, one-cycle lr 1e-2, b_φ = 3 NF.

    Numbers seen (CPU, torch 2.13, seed 1 for the init): initial MSE 0.233; float training 8.7e-5;
    PTQ of that decoder at 3 bits 1.8e-3 (20x worse); QAT at 3 bits from the same init 2.3e-4
    (2.7e-4 with one thread). Over init seeds 0..3 QAT/PTQ was 0.08..0.18 (out-of-tree sweep).
    """
    torch.manual_seed(0)
    x, _ = matrix_to_patches(_smooth_matrix(), 32)
    bits, steps = 3, 300

    torch.manual_seed(1)
    ae_float = _tiny_autoencoder(bits=bits)
    init_state = copy.deepcopy(ae_float.state_dict())
    set_decoder_quantization_(ae_float.decoder, False)  # float training
    mse0 = _mse(ae_float, x)
    _train(ae_float, x, steps)
    mse_float = _mse(ae_float, x)
    quantize_decoder_(ae_float.decoder)  # PTQ: round once
    mse_ptq = _mse(ae_float, x)

    ae_qat = _tiny_autoencoder(bits=bits)
    ae_qat.load_state_dict(init_state)
    _train(ae_qat, x, steps)  # QAT from the same init
    mse_qat = _mse(ae_qat, x)

    print(f"mse0={mse0:.3g} float={mse_float:.3g} ptq={mse_ptq:.3g} qat={mse_qat:.3g}")
    assert mse_float < 0.01 * mse0
    assert mse_qat < 0.05 * mse0
    assert mse_qat < 0.5 * mse_ptq


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qat_export_and_latent_vq_on_cuda():
    torch.manual_seed(0)
    x, _ = matrix_to_patches(_smooth_matrix().cuda(), 32)
    ae = _tiny_autoencoder(bits=4, vq=LatentVQ(bits=2, dim=2, iters=10)).cuda()
    _train(ae, x, steps=3)
    meta, tensors = export_decoder(ae.decoder)
    assert all(t.is_cuda for t in tensors.values())
    rebuilt = decoder_from_state(meta, {k: t.cpu() for k, t in tensors.items()}, device="cuda")
    with torch.no_grad():
        z = ae.encode(x)
        assert z.is_cuda and torch.equal(rebuilt(z), ae.decoder(z))
