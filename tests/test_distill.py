"""Teacher distillation of phase 3: the KL loss against direct computations, its cache of the teacher's targets
(reused, keyed by the windows, size-limited), streaming, and a tiny run that lowers the KL."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from phase_helpers import TOKENIZER, Phase1, _one_thread, fast_config, text_datamodule, trainer  # noqa: F401

from reallm.core.errors import UserError
from reallm.phases import EndToEndPhase
from reallm.phases.distillation import TeacherLogitCache, TeacherTargets, kl_to_teacher, teacher_targets


def _logits(b=3, length=7, v=11, seed=0, scale=3.0):
    return torch.randn(b, length, v, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_equals_torch_kl_div_and_a_hand_formula(temperature):
    t, s = _logits(seed=1), _logits(seed=2)
    got = kl_to_teacher(s, teacher_targets(t, temperature), temperature)
    p = torch.softmax(t[:, :-1].double() / temperature, -1)  # (B, L − 1, V) positions with a next token
    logq = torch.log_softmax(s[:, :-1].double() / temperature, -1)
    hand = (p * (p.log() - logq)).sum(-1).mean() * temperature**2
    ref = F.kl_div(logq.reshape(-1, 11), p.reshape(-1, 11), reduction="batchmean") * temperature**2
    assert float(got) == pytest.approx(float(hand), rel=1e-5)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    assert float(kl_to_teacher(t, teacher_targets(t, temperature), temperature)) == pytest.approx(0.0, abs=1e-6)


def test_top_k_kl_is_the_kl_of_the_coarsened_distributions():
    """Top-k targets: the KL over the teacher's k tokens plus one bucket for the rest, by hand in float64; zero for
    teacher = student; the full KL for k = V; never above the full KL (coarsening loses information)."""
    t, s = _logits(seed=3), _logits(seed=4)
    k = 4
    tt = teacher_targets(t, 1.0, topk=k)
    assert tt.logprobs.shape == (3, 6, k) and tt.indices.shape == (3, 6, k)
    p = torch.softmax(t[:, :-1].double(), -1)
    q = torch.softmax(s[:, :-1].double(), -1)
    idx = p.topk(k, -1).indices
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    pr, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
    hand = ((pk * (pk / qk).log()).sum(-1) + pr * (pr / qr).log()).mean()
    got = kl_to_teacher(s, tt)
    assert float(got) == pytest.approx(float(hand), rel=1e-4)
    assert float(got) < float(kl_to_teacher(s, teacher_targets(t)))
    assert float(kl_to_teacher(t, tt)) == pytest.approx(0.0, abs=1e-5)
    assert float(kl_to_teacher(s, teacher_targets(t, topk=11))) == pytest.approx(
        float(kl_to_teacher(s, teacher_targets(t))), rel=1e-6)
    # gradients flow to the student only through its logits, and vanish at the teacher
    x = t.clone().requires_grad_(True)
    kl_to_teacher(x, tt).backward()
    assert float(x.grad.abs().max()) < 1e-5


# --------------------------------------------------------------------------------------------
# the phase
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    """stories260K (the real tiny Llama: a teacher whose next-token distributions are worth matching; a random
    tiny model's are nearly one-hot on the input token) compressed at 2 bits, with a rank-2 DoRA part."""
    if not TOKENIZER.is_dir():
        pytest.skip(f"{TOKENIZER} is absent (the distillation tests need ../shared)")
    from transformers import AutoTokenizer

    from reallm import compress_, save_compressed
    from reallm.core.hf_models import load_hf_model

    root = tmp_path_factory.mktemp("distill")
    model = load_hf_model(str(TOKENIZER), "float32")
    compress_(model, fast_config(), progress=False)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    save_compressed(model, root / "phase1", base_model=str(TOKENIZER), tokenizer=tok)
    return Phase1(root, TOKENIZER, root / "phase1", root / "tokens")


def _mean_kl(student, teacher, windows) -> float:
    with torch.no_grad():
        targets = teacher_targets(teacher(input_ids=windows).logits)
        return float(kl_to_teacher(student(input_ids=windows).logits, targets))


def _run(phase1, run_dir, cache_dir, seed=0, steps=6, **kwargs):
    module = EndToEndPhase(checkpoint=str(phase1.checkpoint), run_dir=str(run_dir), lr=3e-3, warmup_ratio=0.0,
                           teacher_cache_dir=str(cache_dir), **kwargs)
    dm = text_datamodule(phase1, sequences=16, batch_size=4, seed=seed)
    trainer(run_dir, max_steps=steps, limit_val_batches=0).fit(module, datamodule=dm)
    return module, dm, json.loads((run_dir / "results.json").read_text())


def test_kl_run_lowers_the_kl_and_the_cache_is_reused_and_keyed_by_the_windows(phase1, tmp_path, monkeypatch):
    from reallm.checkpoint.compressed import load_compressed
    from reallm.core.hf_models import load_hf_model

    cache_dir = tmp_path / "teacher"
    module, dm, res = _run(phase1, tmp_path / "a", cache_dir, loss="kl", teacher_topk=32)
    info = res["distillation"]
    assert res["loss"] == "kl" and info["teacher"] == "cache" and info["cache"]["reused"] is False
    assert info["cache"]["bytes"] == 16 * 31 * 32 * (2 + 2)  # windows × positions × k × (fp16 value + int16 id)
    # the KL to the original model, on the training windows, with the full vocabulary: lowered by the run
    teacher = load_hf_model(str(phase1.base), "float32").eval()
    windows = dm.train_windows.long()
    before = _mean_kl(load_compressed(phase1.checkpoint).eval(), teacher, windows)
    after = _mean_kl(load_compressed(tmp_path / "a" / "reallm").eval(), teacher, windows)
    assert after < 0.9 * before, (before, after)
    assert info["train_kl"]["last"] < info["train_kl"]["first"]
    # what the cache holds is the teacher's top-k log-probabilities of those windows, row by row
    cache = TeacherLogitCache(cache_dir, windows, str(phase1.base), 512, 1.0, 32)
    assert cache.exists() and len(list(cache_dir.iterdir())) == 1
    direct = teacher_targets(teacher(input_ids=windows[5:7]).logits.detach(), 1.0, 32)
    got = cache.lookup(windows[5:7])
    assert torch.equal(got.indices, direct.indices)
    torch.testing.assert_close(got.logprobs, direct.logprobs, atol=2e-2, rtol=1e-3)  # fp16 storage
    # the same windows again: the cache is reused, the teacher is never loaded
    monkeypatch.setattr(EndToEndPhase, "_load_teacher", lambda *a: pytest.fail("teacher loaded for a cached run"))
    _, _, again = _run(phase1, tmp_path / "b", cache_dir, loss="kl", teacher_topk=32, steps=1)
    assert again["distillation"]["cache"]["reused"] is True
    assert again["distillation"]["cache"]["dir"] == info["cache"]["dir"]
    monkeypatch.undo()
    # other windows (another sampling seed): another cache
    _, _, other = _run(phase1, tmp_path / "c", cache_dir, seed=7, loss="kl", teacher_topk=32, steps=1)
    assert other["distillation"]["cache"]["reused"] is False
    assert other["distillation"]["cache"]["dir"] != info["cache"]["dir"] and len(list(cache_dir.iterdir())) == 2
    # a window the cache was not built for is refused with one line
    with pytest.raises(UserError, match="not among the windows"):
        cache.lookup(torch.zeros(1, windows.shape[1], dtype=torch.long))


def test_stream_and_mix(phase1, tmp_path):
    """The streaming teacher (on the CPU) with the mixed loss trains, logs both terms, and keeps the teacher out of
    the student's parameters and checkpoint."""
    module, _, res = _run(phase1, tmp_path / "s", tmp_path / "unused", loss="mix", kl_weight=0.7, teacher="stream",
                          teacher_topk=None, temperature=2.0, steps=2)
    info = res["distillation"]
    assert info["teacher"] == "stream" and info["teacher_device"] == "cpu" and "cache" not in info
    assert info["kl_weight"] == 0.7 and info["temperature"] == 2.0 and info["train_kl"]["steps"] == 2
    assert not (tmp_path / "unused").exists()
    names = [n for n, _ in module.named_parameters()]
    assert not any("teacher" in n for n in names)


def test_cache_size_limit_and_bad_options(phase1, tmp_path):
    with pytest.raises(UserError, match="teacher logit cache would take"):
        _run(phase1, tmp_path / "big", tmp_path / "t", loss="kl", teacher_topk=None, teacher_cache_max_gb=1e-6)
    with pytest.raises(UserError, match="loss must be"):
        EndToEndPhase(checkpoint=str(phase1.checkpoint), loss="mse")
    with pytest.raises(UserError, match="kl_weight"):
        EndToEndPhase(checkpoint=str(phase1.checkpoint), loss="mix", kl_weight=1.5)


def test_targets_move_between_devices():
    t = TeacherTargets(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long)).to("cpu")
    assert t.indices.dtype == torch.long
