"""Perplexity (torchmetrics) against a direct computation, and the stories260K reference figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reallm.data import TextDataModule
from reallm.data.windows import tokenize, wikitext_windows
from reallm.eval import WindowPerplexity, greedy_generate, perplexity

REFERENCE_PPL = 4.42  # ../shared/README.md: stories260K, fp32, L=512, first 200k tokens of TinyStories


def _direct_ppl(model, windows: torch.Tensor) -> float:
    """exp of the mean cross-entropy of all shifted logits of all windows, concatenated."""
    with torch.no_grad():
        logits = model(windows).logits  # (n, L, V)
    preds = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    return math.exp(F.cross_entropy(preds, windows[:, 1:].reshape(-1)).item())


def test_perplexity_matches_direct_computation(tiny_llama):
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 512, (5, 64), generator=g)
    ref = _direct_ppl(tiny_llama, windows)
    for batch_size in (1, 2, 5):
        out = perplexity(tiny_llama, windows, batch_size=batch_size, progress=False)
        assert out["value"] == pytest.approx(ref, rel=1e-5)
        assert out["nll"] == pytest.approx(math.log(ref), rel=1e-5)
        assert (out["tokens"], out["windows"], out["context"]) == (5 * 63, 5, 64)


@pytest.mark.parametrize("chunk_elements", [1, 7 * 11, 1 << 25])
def test_window_perplexity_matches_cross_entropy_in_any_chunking(chunk_elements):
    """The one accumulator: windows scored a few positions at a time (chunk_elements logits per update:
    one position, 7 positions, everything) give exp(mean cross-entropy) of the shifted tokens, in float64."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 12, 11, generator=g) * 3  # (B, L, V)
    ids = torch.randint(0, 11, (3, 12), generator=g)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11).double(), ids[:, 1:].reshape(-1))
    metric = WindowPerplexity(chunk_elements=chunk_elements)
    metric.add_windows(logits[:2], ids[:2])
    metric.add_windows(logits[2:], ids[2:])
    out = metric.result()
    assert metric.total_log_probs.dtype == torch.float64
    assert out["tokens"] == 3 * 11
    assert out["nll"] == pytest.approx(float(ref), rel=1e-12)
    assert out["value"] == pytest.approx(math.exp(float(ref)), rel=1e-12)


def test_perplexity_restores_mode_and_checks_shape(tiny_llama):
    windows = torch.randint(0, 512, (2, 16))
    tiny_llama.train()
    a = perplexity(tiny_llama, windows, progress=False)
    assert tiny_llama.training  # previous mode restored
    tiny_llama.eval()
    assert perplexity(tiny_llama, windows, progress=False) == a  # eval mode inside: no dropout effect
    assert not tiny_llama.training
    with pytest.raises(ValueError, match=r"\(n, L\)"):
        perplexity(tiny_llama, windows[0], progress=False)


@pytest.fixture(scope="module")
def stories(request):
    shared_dir = request.getfixturevalue("shared_dir")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_dir / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), shared_dir


def test_greedy_generate_stories260k(stories):
    model, tokenizer, _ = stories
    text = greedy_generate(model, tokenizer, "Once upon a time", max_new_tokens=20)
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 20
    assert greedy_generate(model, tokenizer, "Once upon a time", max_new_tokens=20) == text
    print(f"\ngreedy: {text!r}")


@pytest.mark.slow
def test_stories260k_reference_perplexity(stories):
    """The shared README's figure: 4.42 on the first 200k tokens of the TinyStories text (one BOS at
    the start, L=512, non-overlapping windows). The text: train file, then the valid file."""
    model, tokenizer, shared_dir = stories
    data = shared_dir / "data"
    text = "\n\n".join(
        (data / f).read_text(encoding="utf-8") for f in ("tinystories_train.txt", "tinystories_valid.txt")
    )
    ids = tokenize(tokenizer, text)[:200_000]
    windows = wikitext_windows(ids, 512)
    assert windows.shape == (390, 512)
    out = perplexity(model, windows, batch_size=16, progress=False)
    print(f"\nstories260K, first 200k TinyStories tokens, L=512: {out}")
    assert out["value"] == pytest.approx(REFERENCE_PPL, abs=0.05)


@pytest.mark.slow
def test_stories260k_protocol_perplexities(stories, tmp_path):
    """tinystories_valid.txt (all 151 windows) and the first 256 windows of wikitext2_raw_test.txt (of 1574; for
    time) are cut by TextDataModule at L=512; the perplexity of the first 48 windows of each is checked against an
    independent computation: the exp of the mean of Hugging Face's own causal-LM loss over the same windows (every
    window has L tokens, so the mean of the window means is the token mean). 48 windows: the comparison is the
    point, not the figure (the whole-file figures are the demo's and the benchmarks')."""
    model, _, shared_dir = stories
    data = shared_dir / "data"
    dm = TextDataModule(
        path=[str(data / "tinystories_valid.txt"), str(data / "wikitext2_raw_test.txt")],
        model_name_or_path=str(shared_dir / "models" / "stories260K"),
        seq_len=512,
        max_eval_windows=256,
        cache_dir=str(tmp_path),
    )
    dm.setup("validate")
    assert [len(w) for w in dm.val_windows] == [151, 256] and all(w.shape[1] == 512 for w in dm.val_windows)
    assert [info["windows"] for info in dm.eval_info] == [151, 256]
    results = {}
    for name, windows in zip(dm.dataset_names, dm.val_windows):
        results[name] = perplexity(model, windows[:48], batch_size=16, progress=False)
        print(f"\n{name}: first 48 windows, {results[name]}")
        assert results[name]["windows"] == 48
    with torch.no_grad():
        for name, windows in zip(dm.dataset_names, dm.val_windows):
            # Hugging Face's loss is the token mean of a batch; batches of 16 windows of L tokens
            losses = [(float(model(input_ids=w, labels=w).loss), len(w)) for w in windows[:48].split(16)]
            mean = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
            assert results[name]["value"] == pytest.approx(math.exp(mean), rel=1e-5), name
    assert results["wikitext2_raw_test"]["value"] > 10 * results["tinystories_valid"]["value"]  # not its domain
