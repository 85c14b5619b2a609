"""The AQLM-like (`additive`) and QuIP#-like (`e8p`) stored formats inside the pipeline (issue 14): save /
load round trips with identical logits, range decoding that reads only its codes and agrees with the
quantizers' own decoders, shared codebooks counted once, honest bits of every method preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import sample_ids, tiny_llama

from reallm import (
    CompressionConfig,
    bits_report,
    compress_,
    compress_weight,
    iter_reallm_layers,
    load_compressed,
    save_compressed,
)
from reallm.formats import get_codec
from reallm.formats.additive.search import additive_decode, additive_unpack_codes
from reallm.formats.e8p.lattice import LEGACY_TABLE, e8_residual_dequantize, e8p_abs_table
from reallm.ops.packing import pack_bits, unpack_bits
from reallm.weight.container import ReALLMWeight
from reallm.weight.decode import decode_frozen
from reallm.weight.pipeline import normalize_residual
from reallm.weight.tiling import decode_frozen_rows, row_tiles

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")

ADDITIVE = CompressionConfig(quantizer="additive", bits=2,
                             options={"dim": 8, "codebooks": 2, "beam": 4, "refine_iters": 2, "kmeans_iters": 10})
E8P = CompressionConfig(quantizer="e8p", bits=2, rotation="hadamard")


def gaussian(p, q, seed=0):
    return torch.randn(p, q, generator=torch.Generator().manual_seed(seed)) * 0.02


def logits(model):
    with torch.no_grad():
        return model(sample_ids()).logits


@pytest.mark.parametrize("cfg", [
    ADDITIVE.with_options(codebook_scope="model"),  # one pair of codebooks for the model, stored once
    ADDITIVE.replace(bits=2, permute=True, permute_rows=16).with_options(codebooks=4, dim=4),  # 4x2 per matrix
    E8P.replace(rank=2),  # Hadamard + E8P + a low-rank part
    CompressionConfig(quantizer="e8p", bits=3, permute=True, permute_rows=16),  # residual stage, tiled decode
], ids=["additive-2x8-model", "additive-4x2-perm", "e8p-2bit-hadamard-rank2", "e8p-3bit-perm"])
def test_save_load_identical_logits(tmp_path, cfg):
    model = tiny_llama()
    compress_(model, cfg, progress=False)
    if cfg.rank:
        with torch.no_grad():  # adapters that are not their initial values
            for _, layer in iter_reallm_layers(model):
                layer.lora_B.add_(0.01)
    save_compressed(model, tmp_path / "ck")
    back = load_compressed(tmp_path / "ck")
    assert torch.equal(logits(model), logits(back))
    for (name, a), (_, b) in zip(iter_reallm_layers(model), iter_reallm_layers(back)):
        assert torch.equal(a.dequantize(), b.dequantize()), name
        assert a.container().bits() == b.container().bits(), name


def test_model_wide_additive_codebooks_are_one_tensor_counted_once():
    model = tiny_llama()
    compress_(model, ADDITIVE.with_options(codebook_scope="model"), progress=False)
    layers = [layer.container() for _, layer in iter_reallm_layers(model)]
    books = [w.shared["codebooks"] for w in layers]
    assert all(torch.equal(b, books[0]) for b in books) and books[0].shape == (2, 256, 8)
    assert books[0].dtype == torch.float16 and all("codebooks" not in w.frozen for w in layers)
    # the codebook bits of all matrices add up to the one stored pair: 2 · 256 · 8 · 16
    assert sum(w.bits()["codebook"] for w in layers) == pytest.approx(2 * 256 * 8 * 16)
    assert all(w.bits()["codes"] == 2 * w.shape[0] * w.shape[1] for w in layers)  # 64 | p·q here


def test_e8p_stores_no_codebook_and_exact_code_bits():
    W = gaussian(64, 128)
    for bits, stages in ((2, 1), (3, 2), (4, 2)):
        w = compress_weight(W, CompressionConfig(quantizer="e8p", bits=bits))
        items = w.bits()
        assert "codebook" not in items and items["codes"] == bits * W.numel()
        n_blocks = W.numel() // 64
        # absmax scales (8-bit codes, one fp32 group maximum, one fp32 offset) + one fp32 lattice scale per stage
        assert items["scales"] == 8 * n_blocks + 32 + 32 + 32 * stages
        assert w.frozen["lattice_scales"].dtype == torch.float32 and w.frozen["lattice_scales"].numel() == stages


def test_e8p_matrices_record_their_table_and_old_ones_decode_with_the_legacy_table():
    """New matrices say they index QuIP#'s table; a matrix without the entry (written before it) decodes with the
    earlier table. Check: re-index the codes of a new matrix into the legacy table (same pattern, same signs and
    shift) and drop the entry: every vector whose pattern both tables hold decodes to the same weights."""
    w = compress_weight(gaussian(64, 128), CompressionConfig(quantizer="e8p", bits=2))
    assert w.meta["e8p_table"] == "quip-sharp"
    tensors, meta = w.to_dict()
    meta = json.loads(json.dumps(meta))
    assert ReALLMWeight.from_dict(tensors, meta).meta["e8p_table"] == "quip-sharp"
    legacy_row = {tuple(r): i for i, r in enumerate(e8p_abs_table(table=LEGACY_TABLE).tolist())}
    to_legacy = torch.tensor([legacy_row.get(tuple(r), -1) for r in e8p_abs_table().tolist()])  # (256,)
    n = w.shape[0] * w.shape[1] // 8
    codes = unpack_bits(w.frozen["codes"], 16, n)  # (n,)
    mapped = to_legacy[codes & 255]
    shared_row = mapped >= 0
    assert bool(shared_row.any()) and not bool(shared_row.all())  # some codes use a padding row only QuIP# has
    old_codes = torch.where(shared_row, (codes & ~255) | mapped, codes)
    tensors["frozen.codes"] = pack_bits(old_codes, 16)
    del meta["meta"]["e8p_table"]
    old = ReALLMWeight.from_dict(tensors, meta)
    same = (old.decode_frozen() == w.decode_frozen()).view(-1, 8).all(dim=1)  # no rotation: vectors in code order
    assert torch.equal(same | ~shared_row, torch.ones_like(same))
    meta["meta"]["e8p_table"] = "quip-sharp"  # the re-indexed codes read with QuIP#'s table: other weights
    assert not torch.equal(ReALLMWeight.from_dict(tensors, meta).decode_frozen(), w.decode_frozen())


def _expected_blocks(w):
    """The codec's output for every block, from the quantizers' own decoders (not the codec's lookups)."""
    cfg, stored = w.config, w.frozen
    n = w.shape[0] * w.shape[1] // 8 if cfg.quantizer == "e8p" else w.shape[0] * w.shape[1] // cfg.options.dim
    if cfg.quantizer == "additive":
        k = cfg.bits * cfg.options.dim // cfg.options.codebooks
        codes = additive_unpack_codes(stored["codes"], n, cfg.options.codebooks, k)
        return additive_decode(codes, stored["codebooks"].float()).view(-1, cfg.block_size)
    stages = {2: ("e8p",), 3: ("e8p", "e8_1bit"), 4: ("e8p", "e8p")}[cfg.bits]
    keys = ("codes", "residual_codes")
    codes = [unpack_bits(stored[key], 16 if s == "e8p" else 8, n) for key, s in zip(keys, stages)]
    return e8_residual_dequantize(codes, stored["lattice_scales"].tolist(), stages).view(-1, cfg.block_size)


@pytest.mark.parametrize("cfg", [ADDITIVE, ADDITIVE.replace(bits=2).with_options(codebooks=4, dim=4),
                                 CompressionConfig(quantizer="e8p", bits=3)], ids=["2x8", "4x2-d4", "e8p-3bit"])
def test_decode_range_reads_only_its_codes(cfg):
    """Blocks [start, stop) decoded with every code byte outside their span overwritten equal the quantizers'
    own decoding of those blocks (so a row tile of the runtime reads only its codes)."""
    w = compress_weight(gaussian(48, 128, seed=3), cfg)
    codec = get_codec(cfg.quantizer)
    expected = _expected_blocks(w)  # (n_blocks, 64)
    n_blocks = expected.shape[0]
    assert torch.allclose(codec.decode(w.frozen, w.meta, cfg, w.shape, n_blocks, {}), expected, atol=1e-6)
    code_keys = [k for k in w.frozen if k in ("codes", "residual_codes")]
    for start, stop in ((0, 1), (5, 17), (n_blocks - 3, n_blocks)):
        corrupted = dict(w.frozen)
        for key in code_keys:
            per_block = w.frozen[key].numel() // n_blocks  # bytes per block: whole bytes for these widths
            t = torch.full_like(w.frozen[key], 0xA5)
            t[start * per_block: stop * per_block] = w.frozen[key][start * per_block: stop * per_block]
            corrupted[key] = t
        got = codec.decode_range(corrupted, w.meta, cfg, w.shape, {}, start, stop)
        assert torch.allclose(got, expected[start:stop], atol=1e-6), (start, stop)


@pytest.mark.parametrize("cfg", [ADDITIVE.replace(permute=True, permute_rows=16),
                                 CompressionConfig(quantizer="e8p", bits=2, permute=True, permute_rows=16)],
                         ids=["additive", "e8p"])
def test_row_tiles_equal_the_whole_decode(cfg):
    """The resident runtime's row tiles (blocks straddling rows: q = 80) equal the whole-matrix decode."""
    w = compress_weight(gaussian(96, 80, seed=4), cfg)
    whole = decode_frozen(w.frozen, w.meta, cfg, w.shape)
    tiles = [decode_frozen_rows(w.frozen, w.meta, cfg, w.shape, r0, r1) for r0, r1 in row_tiles(w.shape, cfg, 32 * 80)]
    assert len(tiles) > 1 and torch.equal(torch.cat(tiles), whole)


def test_additive_codec_codes_are_a_beam_search_of_the_stored_codebooks():
    """Per-matrix encode: re-encoding the normalised blocks against the stored codebooks (beam search from
    scratch) is never better than the stored codes (which the refinement kept as the best found)."""
    from reallm.formats.additive.search import additive_encode, additive_errors

    W = gaussian(64, 128, seed=5)
    w = compress_weight(W, ADDITIVE)
    X, _, _ = normalize_residual(W, ADDITIVE)
    v = X.reshape(-1, 8)
    books = w.frozen["codebooks"].float()
    stored = additive_unpack_codes(w.frozen["codes"], v.shape[0], 2, 8)
    fresh = additive_encode(v, books, beam=4)
    assert float(additive_errors(v, stored, books).sum()) <= float(additive_errors(v, fresh, books).sum()) + 1e-6


@pytest.mark.parametrize("changes, message", [
    (dict(quantizer="additive", bits=3, options={"dim": 2, "codebooks": 4}), "b·d / M must be an integer"),
    (dict(quantizer="additive", bits=2, options={"dim": 16, "codebooks": 1}), "b·d / M must be an integer in 1..16"),
    (dict(quantizer="additive", options={"dim": 3}), "additive: dim must be 1, 2, 4, 8 or 16"),
    (dict(quantizer="additive", options={"beam": 0}), "beam must be ≥ 1"),
    (dict(quantizer="additive", options={"refine_iters": -1}), "refine_iters must be ≥ 0"),
    (dict(quantizer="e8p", bits=5), "e8p supports bits 2"),
])
def test_bad_configs_are_one_clear_line(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        CompressionConfig(**changes)
    assert "\n" not in str(err.value)


# -- every method preset's accounted bits on stories260K ------------------------------------------------------
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
#: nominal b → accepted band of accounted bits per weight over the decoder linears (issue 14)
BANDS = {2: (2.0, 2.5), 3: (3.0, 3.5)}
#: presets outside their band on stories260K, and why (the test checks that they still are)
OUTSIDE_BAND = {
    "aqlm-1x16": "its 2^16-codeword fp16 codebook costs 37 bits per weight on 226,560 weights",
    "lqlora-3bit": "LQ-LoRA's bf16 low-rank part (rank 1 = 64 at 4096) costs 0.41 bit per weight at widths 64-172",
    "lqlora-3bit-ft": "a fine-tuning preset: its int8 rank-1 low-rank part (0.21) and fp16 DoRA magnitude (0.21) cost "
                      "0.42 bit per weight at widths 64-172",
    "vq-2bit-ft": "a fine-tuning preset: its int8 rank-2 low-rank part costs 0.42 bit per weight (budget 2.75)",
    "vq-3bit-ft": "a fine-tuning preset: its int8 rank-1 low-rank part and fp16 DoRA magnitude cost 0.42 bit per "
                  "weight",
}
# iteration counts change what is stored, never how much of it: the test runs them at their minimum (the shared
# field lowrank_iters, and the options of the formats that have them)
_FAST = {"kmeans_iters": 1, "refine_iters": 0, "lowrank_iters": 1, "beam": 1}


def _fast(cfg: CompressionConfig) -> CompressionConfig:
    """`cfg` with the iteration counts of _FAST that it (its shared fields or its format's options) has."""
    shared = {k: v for k, v in _FAST.items() if k in {f.name for f in dataclasses.fields(cfg)}}
    own = {k: v for k, v in _FAST.items() if k in {f.name for f in dataclasses.fields(cfg.options)}}
    return cfg.replace(**shared).with_options(**own)


def _preset_compression(name: str) -> dict:
    preset = yaml.safe_load((ROOT / "configs" / "methods" / f"{name}.yaml").read_text())
    return preset["model"]["init_args"]["compression"]


def _decoder_linear_bits(model_dir: Path, cfg: CompressionConfig) -> float:
    """Accounted bits per weight over the decoder linears of the model compressed with `cfg`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if get_codec(cfg.quantizer).can_share(cfg):  # shared tensors are divided among all matrices: compress all
        compress_(model, cfg, progress=False)
        return bits_report(model)["decoder_linears"]
    # otherwise a matrix's stored bits depend on its shape only: one matrix per shape, weighted by count
    by_shape: dict[tuple[int, int], list] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            by_shape.setdefault(tuple(mod.weight.shape), []).append((name, mod.weight.detach()))
    total = weights = 0.0
    for members in by_shape.values():
        name, W = members[0]
        total += compress_weight(W, cfg, name=name).bits()["total"] * len(members)
        weights += W.numel() * len(members)
    return total / weights


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_bits_within_its_band_on_stories260k(preset, shared_dir):
    comp = _preset_compression(preset)
    if comp["quantizer"] == "autoencoder":
        pytest.skip("autoencoder presets choose per matrix under their own budget (tests/test_adaptive.py)")
    cfg = _fast(CompressionConfig.from_dict(comp))  # the preset's form: nested options or the flat one of before
    if cfg.nominal_bits not in BANDS:
        pytest.skip(f"{cfg.nominal_bits:g}-bit presets have no band")
    lo, hi = BANDS[int(cfg.nominal_bits)]
    if preset == "aqlm-1x16":  # its codebook alone decides, and fitting 2^16 codewords is slow: arithmetic
        assert cfg.options.codebooks == 1 and cfg.options.codebook_scope == "model"
        assert (1 << cfg.bits * cfg.options.dim) * cfg.options.dim * 16 / 226_560 > hi
        return
    bits = _decoder_linear_bits(shared_dir / "models" / "stories260K", cfg)
    if preset in OUTSIDE_BAND:
        assert not lo <= bits <= hi, f"{preset} is now within its band ({bits:.3f}): remove it from OUTSIDE_BAND"
    else:
        assert lo <= bits <= hi, f"{preset}: {bits:.4f} accounted bits, outside {lo}-{hi}"


def test_comparison_bands_of_budgeted_presets_follow_their_budget():
    """A preset whose matrices choose their formats under a budget (reallm-*: nominal b a list) is in the
    class of its budget (3.25 → 3-bit band, 2.75 → 2-bit band), not of its smallest candidate."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    item = {"shape": [64, 64], "items": {"codes": 3.0 * 4096, "lowrank": 0.25 * 4096}}
    rows = [{"label": "reallm-3bit", "bits": {"nominal": [2.0, 3.0], "decoder_linears": 3.25}, "budget": 3.25,
             "matrices": [item]},
            {"label": "reallm-2bit", "bits": {"nominal": [2.0, 3.0], "decoder_linears": 2.748}, "budget": 2.75,
             "matrices": [item]},
            {"label": "quip-2bit", "bits": {"nominal": 2.0, "decoder_linears": 2.16}, "budget": None,
             "matrices": []}]
    assert compare.band_notes(rows) == [
        "- reallm-3bit: 3.250 bits, within 3.0–3.5",
        "- reallm-2bit: 2.748 bits, OUTSIDE 2.0–2.5; largest items beside the codes: lowrank 0.250",
        "- quip-2bit: 2.160 bits, within 2.0–2.5"]
