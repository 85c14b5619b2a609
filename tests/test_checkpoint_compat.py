"""Checkpoints written by earlier versions of this project still load, and compute what they computed.

`tests/data/checkpoints_v1/` holds one tiny checkpoint per stored format, written by the code of commit
7e332a8 (before the codec registry; see `generate.py` there), with the logits that code computed.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reallm import load_compressed
from reallm.checkpoint.directory import read_meta
from reallm.layer.bits import bits_report
from tests.tiny_models import sample_ids

DATA = Path(__file__).parent / "data" / "checkpoints_v1"
NAMES = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def test_every_stored_format_has_an_old_checkpoint():
    quantizers = {rec["config"]["quantizer"] for n in NAMES for rec in read_meta(DATA / n)["layers"].values()}
    assert quantizers == {"none", "nf", "rtn", "vq", "autoencoder"}


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_loads_with_the_same_logits(name, single_thread):
    """One thread, as when they were written. They were written on another CPU (AVX-512), whose MKL / oneDNN
    kernels sum in another order than those of an AVX2 one: read on an AMD EPYC (AVX2) the logits are 2.4e-7 to
    3.6e-7 away (logits up to 1.5), as are those of commit 7e332a8 itself run there. So they are compared within
    1e-6, which a changed decode exceeds by orders of magnitude (tests/test_checkpoint_v2_compat.py compares
    bit for bit on the machine that wrote its fixtures)."""
    model = load_compressed(DATA / name)
    expected = load_file(DATA / f"{name}.expected_logits.safetensors")["logits"]
    with torch.no_grad():
        logits = model(sample_ids()).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_bits_are_the_recorded_ones(name):
    """The bit accounting of today's codecs equals what the old code wrote into reallm.json."""
    meta = read_meta(DATA / name)
    report = {m["name"]: m for m in bits_report(load_compressed(DATA / name))["matrices"]}
    for layer, rec in meta["layers"].items():
        assert report[layer]["bits"] == pytest.approx(rec["bits"]["per_weight"], rel=1e-12)
        assert report[layer]["items"] == pytest.approx(
            {k: v for k, v in rec["bits"].items() if k not in ("total", "per_weight")}, rel=1e-12)
