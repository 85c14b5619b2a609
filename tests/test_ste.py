"""Straight-through quantizers: reallm.formats.autoencoder.ste (QAT convs of the decoder, latent VQ)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reallm.formats.autoencoder.ste import (
    LatentVQ,
    QuantConv2d,
    dequantize_weight_per_channel,
    level_table,
    load_quantized,
    quantize_weight_per_channel,
    ste_round,
    straight_through,
)


def test_straight_through_value_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(100, requires_grad=True)
    x_q = torch.round(x * 3) / 3
    y = straight_through(x, x_q)
    assert torch.equal(y, x_q)  # bit-exact forward value
    g = torch.randn(100)
    y.backward(g)
    assert torch.equal(x.grad, g)  # identity backward

    x.grad = None
    r = ste_round(x * 4)
    assert torch.equal(r, torch.round(x.detach() * 4))
    r.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 4.0))


@pytest.mark.parametrize("levels", ["nf", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_level_table(bits, levels):
    t = level_table(bits, levels)
    assert t.dtype == torch.float32 and t.numel() == 2**bits
    assert torch.all(t[1:] > t[:-1])
    assert t[0] == -1 and t[-1] == 1  # absmax maps exactly to an extreme level


@pytest.mark.parametrize("levels", ["nf", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantize_weight_per_channel(bits, levels):
    torch.manual_seed(0)
    w = torch.randn(12, 5, 3, 3) * torch.logspace(-3, 1, 12).view(12, 1, 1, 1)
    w[3] = 0.0  # an all-zero channel
    w_q, codes, scale = quantize_weight_per_channel(w, bits, levels)
    assert w_q.shape == w.shape and w_q.dtype == torch.float32
    assert codes.shape == w.shape and codes.dtype == torch.uint8
    assert scale.shape == (12,) and scale.dtype == torch.float16
    assert torch.equal(scale.float(), w.abs().amax(dim=(1, 2, 3)).half().float())
    assert torch.all(w_q[3] == 0)
    # at most 2**bits values per output channel (one scale group)
    for c in range(12):
        assert torch.unique(w_q[c]).numel() <= 2**bits
    # nearest level: error within half of the largest gap (plus fp16 scale rounding slack)
    t = level_table(bits, levels)
    max_gap = (t[1:] - t[:-1]).max()
    err = (w_q - w).abs().amax(dim=(1, 2, 3))
    assert torch.all(err <= (0.5 * max_gap + 2e-3) * scale.float() + 1e-12)
    # dequantization from the stored (codes, scale) is exact
    assert torch.equal(dequantize_weight_per_channel(codes, scale, bits, levels), w_q)
    # quantizing a quantized weight gives it back (so rebuilt convs reproduce the trained forward)
    w_q2, codes2, scale2 = quantize_weight_per_channel(w_q, bits, levels)
    assert torch.equal(w_q2, w_q) and torch.equal(codes2, codes) and torch.equal(scale2, scale)


def test_quant_conv_gradient_equals_gradient_at_quantized_weight():
    torch.manual_seed(0)
    conv = QuantConv2d(4, 6, 3, padding=1, weight_bits=3, levels="nf")
    x = torch.randn(2, 4, 8, 8)
    target = torch.randn(2, 6, 8, 8)
    loss = F.mse_loss(conv(x), target)
    loss.backward()

    w_q, _, _ = quantize_weight_per_channel(conv.weight, 3, "nf")
    w_leaf = w_q.clone().requires_grad_(True)
    b_leaf = conv.bias.detach().half().float().requires_grad_(True)
    ref = F.mse_loss(F.conv2d(x, w_leaf, b_leaf, padding=1), target)
    ref.backward()
    assert torch.allclose(loss, ref, atol=0, rtol=0)  # same forward value
    assert conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0
    assert torch.equal(conv.weight.grad, w_leaf.grad)  # STE: gradient w.r.t. float weight = at w_q
    assert torch.equal(conv.bias.grad, b_leaf.grad)
    # the quantized forward really differs from the float one at 3 bits
    assert not torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_quant_conv_float_modes_equal_plain_conv():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 7, 7)
    for bits, flag in [(None, True), (4, False)]:
        conv = QuantConv2d(3, 5, 3, padding=1, weight_bits=bits)
        conv.load_state_dict(ref.state_dict())
        conv.quantize_weights = flag
        assert torch.equal(conv(x), ref(x))


@pytest.mark.parametrize("bits,levels", [(3, "nf"), (6, "nf"), (4, "uniform")])
def test_quant_conv_export_and_load_bit_identical(bits, levels):
    torch.manual_seed(0)
    conv = QuantConv2d(5, 7, (3, 5), padding=(1, 2), weight_bits=bits, levels=levels)
    state = conv.export_quantized()
    assert state["codes"].dtype == torch.uint8 and state["codes"].shape == conv.weight.shape
    assert state["scale"].dtype == torch.float16 and state["scale"].shape == (7,)
    assert state["bias"].dtype == torch.float16
    assert state["bits"] == bits and state["levels"] == levels and state["shape"] == [7, 5, 3, 5]
    rebuilt = load_quantized(state)
    x = torch.randn(3, 5, 9, 11)
    assert torch.equal(rebuilt(x), conv(x))
    # the rebuilt conv exports the same state again
    again = rebuilt.export_quantized()
    assert torch.equal(again["codes"], state["codes"]) and torch.equal(again["scale"], state["scale"])

    # an unquantized conv stores an fp16 weight
    conv.weight_bits = None
    st = conv.export_quantized()
    assert st["bits"] is None and st["weight"].dtype == torch.float16 and "codes" not in st
    assert torch.equal(QuantConv2d.load_quantized(st).weight, conv.weight.half().float())


# ------------------------------------------------------------------------------------ latent VQ
def test_latent_vq_layout_round_trip():
    vq = LatentVQ(bits=2, dim=4)
    z = torch.randn(2, 8, 3, 5)
    v = vq.to_vectors(z)
    assert v.shape == (2 * 2 * 3 * 5, 4)
    # a vector is d consecutive channels at one position
    assert torch.equal(v[0], z[0, 0:4, 0, 0])
    assert torch.equal(v[3 * 5], z[0, 4:8, 0, 0])
    assert torch.equal(vq.from_vectors(v, z.shape), z)
    with pytest.raises(ValueError):
        vq.to_vectors(torch.randn(1, 6, 2, 2))  # e2 % d != 0


@pytest.mark.parametrize("bits,dim,e2", [(3, 2, 16), (2, 4, 16), (4, 1, 1), (3, 2, 2)])
def test_latent_vq_forward_codes_and_straight_through(bits, dim, e2):
    torch.manual_seed(0)
    vq = LatentVQ(bits=bits, dim=dim, iters=30)
    assert vq.codebook.shape == (2 ** (bits * dim), dim)
    z = torch.randn(2, e2, 8, 8, requires_grad=True)
    assert not bool(vq.initialized)
    z_q = vq(z)  # first forward fits the codebook on its input
    assert bool(vq.initialized)
    assert z_q.shape == z.shape
    # values are codewords; codes/decode agree with the forward pass
    codes = vq.encode(z)
    assert codes.dtype == torch.int64 and codes.shape == (2, e2 // dim, 8, 8)
    assert int(codes.max()) < vq.num_codes
    assert torch.equal(vq.decode(codes, z.shape), z_q.detach())
    assert torch.equal(vq.codebook, vq.codebook.half().float())  # fp16-representable codebook
    # quantization error is much smaller than the signal
    assert F.mse_loss(z_q, z).item() < 0.5 * z.detach().pow(2).mean().item()
    # gradient copied straight through, unchanged
    g = torch.randn_like(z)
    z_q.backward(g)
    assert torch.equal(z.grad, g)
    assert vq.codebook.grad is None


def test_latent_vq_fewer_vectors_than_codes_and_disable():
    torch.manual_seed(0)
    vq = LatentVQ(bits=4, dim=2)  # K = 256 codewords
    z = torch.randn(1, 4, 2, 2)  # only 8 vectors
    z_q = vq(z)
    assert torch.allclose(z_q, z, atol=1e-2)  # every vector gets its own codeword (up to fp16)
    vq.enabled = False
    assert vq(z) is z
    assert vq.storage_bits((16, 16, 16)) == 16**3 * 4 + 16 * 2 * 256


def test_latent_vq_refresh_and_state_dict():
    torch.manual_seed(0)
    vq = LatentVQ(bits=2, dim=2, max_points=256)
    z = torch.randn(4, 4, 16, 16)
    inertia = vq.refresh(z)
    assert inertia > 0
    vq2 = LatentVQ(bits=2, dim=2)
    vq2.load_state_dict(vq.state_dict())
    assert bool(vq2.initialized) and torch.equal(vq2(z), vq(z))
