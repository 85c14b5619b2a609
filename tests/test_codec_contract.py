"""The contract every stored format (a codec of `reallm.formats`) fulfils, one table row per format.

A new format adds its rows here (`ROWS`: a config and the relative-error bound it must meet on a Gaussian
matrix); `test_every_format_has_a_row` fails until it does. Formats that `compress_weight` cannot produce
(the autoencoder, made by its phase) are checked by their own tests and `test_checkpoint_compat.py`.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from reallm import CompressionConfig, CompressionError, ReALLMWeight, compress_weight
from reallm.formats import PIPELINE_BIT_ITEMS, get_codec, names


def gaussian(p, q, seed=0):
    return torch.randn(p, q, generator=torch.Generator().manual_seed(seed)) * 0.02


def _safetensors_payload_bytes(path) -> int:
    raw = open(path, "rb").read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


# (format, config, relative Frobenius error bound on a 256×192 Gaussian matrix, or on the (p, q) given as a
# third element for formats whose encoding is slow; the value measured on this machine is in each comment
# (NF2 is poor by construction: its asymmetric 4-level table, cf. shared/README))
ROWS = {
    "fp16": (CompressionConfig(quantizer="none", bits=16), 1e-3),  # 0.0002
    "nf4-qlora": (CompressionConfig(quantizer="nf", bits=4, rank=8, lowrank_init="zero"), 0.11),  # 0.092
    "nf3-lqlora": (CompressionConfig(quantizer="nf", bits=3, rank=8, lowrank_init="alternating",
                                     lowrank_iters=5), 0.20),  # 0.165
    "nf2": (CompressionConfig(quantizer="nf", bits=2), 0.62),  # 0.567
    "rtn3": (CompressionConfig(quantizer="rtn", bits=3), 0.23),  # 0.192
    "rtn3-perm-rot": (CompressionConfig(quantizer="rtn", bits=3, permute=True, rotation="hadamard"), 0.23),
    "vq-3bit-d2-perm": (CompressionConfig(quantizer="vq", bits=3, permute=True,
                                          options={"dim": 2, "kmeans_iters": 20}), 0.20),
    "vq-2bit-d4": (CompressionConfig(quantizer="vq", bits=2, options={"dim": 4, "kmeans_iters": 20}), 0.34),  # 0.296
    "vq-1bit-d8": (CompressionConfig(quantizer="vq", bits=1, options={"dim": 8, "kmeans_iters": 20}), 0.60),  # 0.531
    "quip-like": (CompressionConfig(quantizer="vq", bits=2, rotation="hadamard",
                                    options={"dim": 4, "kmeans_iters": 20}), 0.34),
    "int8-lowrank": (CompressionConfig(quantizer="nf", bits=3, rank=4, lowrank_dtype="int8"), 0.23),  # 0.191
    # AQLM-like 2x8 (per-matrix codebooks: 1.33 bits of codebook on this small matrix) and 4x4 after permutation
    "additive-2x8-d8": (CompressionConfig(quantizer="additive", bits=2, options={
        "dim": 8, "codebooks": 2, "beam": 4, "refine_iters": 3, "kmeans_iters": 10}), 0.30),  # 0.264
    "additive-4x4-d8-perm": (CompressionConfig(quantizer="additive", bits=2, permute=True, options={
        "dim": 8, "codebooks": 4, "beam": 2, "refine_iters": 2, "kmeans_iters": 10}), 0.36),  # 0.326
    # QuIP#-like: Hadamard + E8P (2 bits); E8P + the 1-bit lattice stage (3 bits)
    "e8p-2bit-hadamard": (CompressionConfig(quantizer="e8p", bits=2, rotation="hadamard"), 0.34),  # 0.306
    # (its scale search runs ~50 nearest-point passes: a smaller matrix keeps the test short)
    "e8p-3bit": (CompressionConfig(quantizer="e8p", bits=3), 0.20, (128, 96)),  # 0.177
}
MADE_ELSEWHERE = {"autoencoder"}  # produced by a training phase: tests/test_codec.py, test_ae_phase.py


def test_every_format_has_a_row():
    covered = {cfg.quantizer for cfg, *_ in ROWS.values()} | MADE_ELSEWHERE
    assert covered == set(names()), f"formats without a contract row: {sorted(set(names()) - covered)}"
    for name in MADE_ELSEWHERE:
        assert get_codec(name).produced_by


@pytest.mark.parametrize("row", sorted(ROWS))
def test_contract(row, tmp_path):
    """Shape preserved, any input dtype accepted, error below its bound, every stored tensor claimed by a
    bit item, bits == saved bytes, exact round trip through the flat dict, deterministic for a seed."""
    cfg, bound, *shape = ROWS[row]
    W = gaussian(*(shape[0] if shape else (256, 192)), seed=1)
    for dtype in (torch.bfloat16, torch.float32):  # ends with fp32: the error below is fp32's
        w = compress_weight(W.to(dtype), cfg, name="layer")
        W_hat = w.dequantize()
        assert W_hat.shape == W.shape and W_hat.dtype == torch.float32
        assert torch.isfinite(W_hat).all()
        err = float((W_hat - W.to(dtype).float()).norm() / W.norm())
        assert err < bound, f"{row} ({dtype}): relative error {err:.4f}"
    items = {**PIPELINE_BIT_ITEMS, **get_codec(cfg.quantizer).bit_items}
    assert all(k.split(".")[0] in items for k in w.frozen), sorted(w.frozen)
    # bits() agrees with the bytes of the container's tensors as saved by safetensors (≤ 1%)
    tensors, meta = w.to_dict()
    json.dumps(meta)  # JSON-able
    save_file(tensors, tmp_path / "w.safetensors")
    saved_bits = _safetensors_payload_bytes(tmp_path / "w.safetensors") * 8
    counted = w.bits(include_magnitude=False)["total"]
    assert abs(counted - saved_bits) <= 0.01 * saved_bits
    # round trip through the flat dict is exact; the same seed gives the same stored tensors
    back = ReALLMWeight.from_dict(tensors, json.loads(json.dumps(meta)))
    assert torch.equal(back.dequantize(), w.dequantize())
    again = compress_weight(W, cfg, name="layer")
    assert all(torch.equal(again.frozen[k], w.frozen[k]) for k in w.frozen)


@pytest.mark.parametrize("row", ["nf2", "rtn3-perm-rot", "vq-2bit-d4", "fp16", "int8-lowrank", "additive-2x8-d8",
                                 "e8p-2bit-hadamard"])
@pytest.mark.parametrize("shape", [(172, 64), (64, 172), (37, 100)])
def test_odd_shapes(row, shape):
    """Sides that are not multiples of the block size (blocks cross rows; the last one is padded)."""
    cfg, bound, *_ = ROWS[row]
    W = gaussian(*shape, seed=2)
    w = compress_weight(W, cfg.replace(permute_rows=16) if cfg.permute else cfg)
    err = float((w.dequantize() - W).norm() / W.norm())
    assert w.dequantize().shape == shape and err < bound + 0.05


def test_more_bits_less_error_within_a_format():
    """An independent sanity check of every quantising format: the error falls as b grows."""
    W = gaussian(128, 128, seed=3)
    for quantizer, options in (("nf", {}), ("rtn", {}), ("vq", {"dim": 2, "kmeans_iters": 20})):
        errs = [float((compress_weight(W, CompressionConfig(quantizer=quantizer, bits=b, options=options))
                       .dequantize() - W).norm() / W.norm()) for b in (2, 3, 4)]
        assert errs[0] > errs[1] > errs[2], (quantizer, errs)


@pytest.mark.parametrize("name", sorted(MADE_ELSEWHERE))
def test_formats_made_by_a_phase_are_refused_by_compress_weight(name):
    with pytest.raises(CompressionError, match="built by"):
        compress_weight(gaussian(64, 64), CompressionConfig(quantizer=name))


def test_unknown_format_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="quantizer must be one of.*'vq'"):
        CompressionConfig(quantizer="e9")
