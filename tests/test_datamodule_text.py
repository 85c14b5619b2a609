"""Text data: protocol windows (WikiText and C4 rules), calibration sampling, the cache, TextDataModule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from reallm.data import BaseDataModule, TextDataModule
from reallm.data import sources as sources_mod
from reallm.data import windows as windows_mod
from reallm.data.sources import load_texts, resolve_source
from reallm.data.windows import c4_windows, stream_windows, tokenize, wikitext_windows

N_WORDS = 200  # word-level test vocabulary: "w0".."w199" -> ids 3..202; <unk>=0, <s>=1, </s>=2


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory):
    """A real, local Hugging Face tokenizer (one token per whitespace-separated word), so that token
    counts are known exactly and AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": 3 + i for i in range(N_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("word_tokenizer")
    fast.save_pretrained(path)
    return str(path)


def _doc(n_words: int, rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(n_words))


def _reference_c4(docs, seq_len, n=256, seed=0):
    """The protocol text, transcribed (GPTQ datautils.get_c4): random.seed(0); 256 times pick a random
    document until it has >= L tokens, then i = randint(0, len - L - 1), window [i, i + L)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        while True:
            doc = docs[rng.randint(0, len(docs) - 1)]
            if len(doc) >= seq_len:
                break
        i = rng.randint(0, len(doc) - seq_len - 1) if len(doc) > seq_len else 0
        out.append(list(doc[i : i + seq_len]))
    return torch.tensor(out)


# ------------------------------------------------------------------------------------------------
# pure window functions
# ------------------------------------------------------------------------------------------------
def test_wikitext_windows_are_consecutive_non_overlapping():
    ids = torch.arange(1037)
    w = wikitext_windows(ids, 100)
    assert w.shape == (10, 100) and w.dtype == torch.long  # floor(1037 / 100)
    assert torch.equal(w.flatten(), ids[:1000])  # consecutive slices, the tail dropped
    assert torch.equal(wikitext_windows(list(range(1037)), 100), w)
    with pytest.raises(ValueError, match="fewer than one window"):
        wikitext_windows(torch.arange(99), 100)


def test_c4_windows_follow_the_protocol():
    rng = random.Random(123)
    seq_len = 64
    lengths = [rng.randint(5, 200) for _ in range(40)] + [seq_len, seq_len - 1]
    # token value encodes (document, position), so that every window can be traced back
    docs = [[1000 * d + j for j in range(n)] for d, n in enumerate(lengths)]
    w = c4_windows(docs, seq_len, n=256, seed=0)
    assert w.shape == (256, seq_len)
    assert torch.equal(w, c4_windows(docs, seq_len, n=256, seed=0))  # deterministic
    assert not torch.equal(w, c4_windows(docs, seq_len, n=256, seed=1))
    assert torch.equal(w, _reference_c4(docs, seq_len))
    for row in w.tolist():
        d, start = divmod(row[0], 1000)
        assert len(docs[d]) >= seq_len  # only documents with at least L tokens
        assert row == docs[d][start : start + seq_len]  # a contiguous slice of it
    # the first k windows do not depend on n (max_eval_windows truncation == sampling fewer)
    assert torch.equal(c4_windows(docs, seq_len, n=10), w[:10])


def test_c4_windows_edge_cases():
    exact = list(range(100, 116))
    w = c4_windows([[1, 2, 3], exact], 16, n=5)
    assert all(row == exact for row in w.tolist())  # a document of exactly L tokens: its one window
    with pytest.raises(ValueError, match="no document"):
        c4_windows([[1, 2, 3], [4, 5]], 16, n=1)
    with pytest.raises(ValueError, match="no documents"):
        c4_windows([], 16, n=1)


def test_stream_windows_seeded():
    ids = torch.arange(5000)
    a = stream_windows(ids, 128, n=20, seed=0)
    assert a.shape == (20, 128)
    assert torch.equal(a, stream_windows(ids, 128, n=20, seed=0))
    assert not torch.equal(a, stream_windows(ids, 128, n=20, seed=1))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous slices of the stream
    assert int(a[:, -1].max()) < 5000


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
def test_resolve_source(tmp_path):
    f = tmp_path / "my_docs.jsonl"
    f.write_text('{"text": "w1"}\n')
    src = resolve_source(str(f))
    assert (src.kind, src.name, src.file_format, src.rule) == ("file", "my_docs", "json", "wikitext")
    wt = resolve_source("wikitext2")
    assert (wt.path, wt.config, wt.split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert wt.rule == "wikitext"
    assert resolve_source("wikitext2", "train").split == "train"
    c4 = resolve_source("c4")
    assert c4.rule == "c4" and c4.data_files == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert resolve_source("c4", "train").data_files == {"train": "en/c4-train.00000-of-01024.json.gz"}
    hub = resolve_source("Salesforce/wikitext:wikitext-103-raw-v1@validation")
    assert (hub.kind, hub.name, hub.path, hub.config, hub.split) == (
        "hub", "wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1", "validation")
    for missing in (str(tmp_path / "nope.txt"), "relative/missing.parquet", str(tmp_path / "no_ext")):
        with pytest.raises(FileNotFoundError, match=missing.split("/")[-1]):
            resolve_source(missing)


def test_missing_file_fails_in_init(tmp_path):
    missing = tmp_path / "does_not_exist.txt"
    with pytest.raises(FileNotFoundError, match="does_not_exist.txt"):
        TextDataModule(path=str(missing), model_name_or_path="unused")
    with pytest.raises(FileNotFoundError, match="train_missing.jsonl"):
        TextDataModule(path="wikitext2", train_path=str(tmp_path / "train_missing.jsonl"))


def test_missing_model_is_a_clear_error(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("w1 w2 w3")
    dm = TextDataModule(path=str(f), seq_len=2, cache_dir=str(tmp_path / "cache"))
    assert isinstance(dm, BaseDataModule)
    with pytest.raises(ValueError, match="model_name_or_path"):
        dm.setup("validate")


def test_hub_presets_offline(monkeypatch, tmp_path, word_tokenizer_dir):
    """The preset code paths call datasets.load_dataset with the protocol's ids / shards (faked here,
    no network) and build the WikiText and C4 windows from what it returns."""
    import datasets

    rng = random.Random(0)
    rows = {"wikitext": [_doc(rng.randint(0, 30), rng) for _ in range(50)],
            "c4": [_doc(rng.randint(1, 60), rng) for _ in range(50)]}
    calls = []

    def fake_load_dataset(path, name=None, data_files=None, split=None, **kwargs):
        calls.append((path, name, data_files, split))
        key = "c4" if path == "allenai/c4" else "wikitext"
        return datasets.Dataset.from_dict({"text": rows[key]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = TextDataModule(path=["wikitext2", "c4"], model_name_or_path=word_tokenizer_dir, seq_len=16,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", None, "test"),
        ("allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation"),
    ]
    assert dm.dataset_names == ["wikitext2", "c4"]
    assert [i["rule"] for i in dm.eval_info] == ["wikitext", "c4"]
    tok = dm.tokenizer
    ids = tokenize(tok, "\n\n".join(rows["wikitext"]))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert torch.equal(dm.val_windows[0], wikitext_windows(ids, 16))
    docs = [tokenize(tok, t) for t in rows["c4"]]
    assert torch.equal(dm.val_windows[1], _reference_c4(docs, 16))
    assert [len(dl) for dl in dm.val_dataloader()] == [len(ids) // 16, 256]


# ------------------------------------------------------------------------------------------------
# TextDataModule on local files
# ------------------------------------------------------------------------------------------------
def test_local_jsonl_c4_rule(tmp_path, word_tokenizer_dir):
    rng = random.Random(1)
    seq_len = 24
    lengths = [rng.randint(1, 60) for _ in range(30)]  # many shorter than L (with BOS: n + 1 tokens)
    texts = [_doc(n, rng) for n in lengths]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))

    dm = TextDataModule(path=str(path), model_name_or_path=word_tokenizer_dir, seq_len=seq_len,
                        eval_rule="c4", cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    (w,) = dm.val_windows
    assert dm.dataset_names == ["docs"] and w.shape == (256, seq_len)
    docs = [[1] + [3 + int(word[1:]) for word in t.split()] for t in texts]  # BOS + one id per word
    assert torch.equal(w, _reference_c4(docs, seq_len))
    for row in w.tolist():
        assert any(
            len(d) >= seq_len and any(d[i : i + seq_len] == row for i in range(len(d) - seq_len + 1))
            for d in docs
        )
    assert list(load_texts(str(path))) == texts


def _write_c4_shard(path, texts):
    """A gzipped JSON-lines file in C4's real format: one {"text", "timestamp", "url"} per line."""
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z",
                                "url": f"https://example.org/{i}"}) + "\n")
    return path


def test_c4_shard_file_gets_the_c4_rule_and_each_source_its_own(tmp_path, word_tokenizer_dir):
    """A local C4 shard (named like C4's files) is evaluated with the C4 rule, next to a plain text
    evaluated with the WikiText rule in the same run; an explicit rule can be given per source
    (defect 11.4)."""
    rng = random.Random(4)
    seq_len = 16
    c4_texts = [_doc(rng.randint(1, 50), rng) for _ in range(40)]
    shard = _write_c4_shard(tmp_path / "c4-validation.00000-of-00008.json.gz", c4_texts)
    plain_texts = [_doc(rng.randint(0, 20), rng) for _ in range(30)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in plain_texts))
    assert resolve_source(str(shard)).rule == "c4" and resolve_source(str(plain)).rule == "wikitext"

    c4_docs = [[1] + [3 + int(word[1:]) for word in t.split()] for t in c4_texts]  # BOS + one id per word
    plain_ids = [1] + [3 + int(word[1:]) for word in "\n\n".join(plain_texts).split()]
    dm = TextDataModule(path=[str(shard), str(plain)], model_name_or_path=word_tokenizer_dir, seq_len=seq_len,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    assert [i["rule"] for i in dm.eval_info] == ["c4", "wikitext"]
    assert dm.dataset_names == ["c4-validation.00000-of-00008", "plain"]
    assert torch.equal(dm.val_windows[0], _reference_c4(c4_docs, seq_len))
    assert torch.equal(dm.val_windows[1], wikitext_windows(plain_ids, seq_len))

    # one explicit rule per source: the C4 rule on the plain file only, "auto" for the shard
    dm = TextDataModule(path=[str(shard), str(plain)], model_name_or_path=word_tokenizer_dir, seq_len=seq_len,
                        eval_rule=["auto", "c4"], cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    assert [i["rule"] for i in dm.eval_info] == ["c4", "c4"]
    plain_docs = [[1] + [3 + int(word[1:]) for word in t.split()] for t in plain_texts]
    assert torch.equal(dm.val_windows[1], _reference_c4(plain_docs, seq_len))
    with pytest.raises(ValueError, match="one rule per source"):
        TextDataModule(path=[str(shard), str(plain)], eval_rule=["c4"])


def test_local_parquet_wikitext_rule(tmp_path, word_tokenizer_dir):
    import datasets

    rng = random.Random(2)
    texts = [_doc(rng.randint(0, 20), rng) for _ in range(40)]
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))
    dm = TextDataModule(path=str(path), model_name_or_path=word_tokenizer_dir, seq_len=8, max_eval_windows=5,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    ids = [1] + [3 + int(word[1:]) for word in "\n\n".join(texts).split()]
    assert torch.equal(dm.val_windows[0], wikitext_windows(ids, 8)[:5])
    assert dm.eval_info[0]["windows"] == 5 and dm.eval_info[0]["windows_total"] == len(ids) // 8
    assert dm.eval_info[0]["max_eval_windows"] == 5


def test_tinystories_datamodule(shared_dir, tmp_path, monkeypatch):
    model = str(shared_dir / "models" / "stories260K")
    valid = shared_dir / "data" / "tinystories_valid.txt"
    train = shared_dir / "data" / "tinystories_train.txt"
    cache = tmp_path / "cache"
    kwargs = dict(path=str(valid), model_name_or_path=model, seq_len=512, train_path=str(train),
                  train_sequences=32, batch_size=4, cache_dir=str(cache))

    dm = TextDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.dataset_names == ["tinystories_valid"]

    # independent count: the tokenizer's own encoding (which adds one BOS) of the whole file
    text = valid.read_text(encoding="utf-8")
    ref_ids = dm.tokenizer(text, verbose=False)["input_ids"]
    n_tokens = len(ref_ids)
    print(f"\ntinystories_valid.txt: N = {n_tokens} tokens -> {n_tokens // 512} windows of 512")
    (w,) = dm.val_windows
    assert w.shape == (n_tokens // 512, 512)
    assert dm.eval_info[0]["tokens"] == n_tokens
    assert torch.equal(w.flatten(), torch.tensor(ref_ids[: w.numel()]))
    bos = dm.tokenizer.bos_token_id
    assert w[0, 0] == bos and int((w == bos).sum()) == 1  # BOS only at position 0 of window 0

    (val_loader,) = dm.val_dataloader()
    batch = next(iter(val_loader))
    assert batch.shape == (4, 512) and batch.dtype == torch.long
    assert dm.train_windows.shape == (32, 512)
    train_batches = [b for b in dm.train_dataloader()]
    assert train_batches[0].shape == (4, 512)

    # cache: the files exist, and a second datamodule neither reads nor tokenizes the text again
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]

    def forbidden(*args, **kwargs):
        raise AssertionError("cache miss: text re-read or re-tokenized")

    with monkeypatch.context() as m:
        m.setattr(windows_mod, "tokenize", forbidden)
        m.setattr(windows_mod, "load_texts", forbidden)
        m.setattr(sources_mod, "load_texts", forbidden)
        dm2 = TextDataModule(**kwargs)
        dm2.setup("fit")
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.pt"))] == mtimes
    assert torch.equal(dm2.val_windows[0], w)
    assert torch.equal(dm2.train_windows, dm.train_windows)  # deterministic under the seed
    assert all(torch.equal(a, b) for a, b in zip(train_batches, dm2.train_dataloader()))  # shuffle too

    other = TextDataModule(**(kwargs | {"seed": 1}))
    other.setup("fit")
    assert not torch.equal(other.train_windows, dm.train_windows)  # different across seeds
    assert len(sorted(cache.glob("*.pt"))) == 3  # a new training cache entry, the eval one reused


def test_fine_tuning_reads_another_c4_shard_than_calibration():
    """method.md §7: phase 3 trains on a C4 shard other than phase 2's calibration shard; both configs
    resolve their training data through the c4 preset (defect 11.6)."""
    import yaml

    root = Path(__file__).resolve().parents[1]

    def train_files(config: str) -> dict:
        args = yaml.safe_load((root / "configs" / config).read_text())["data"]["init_args"]
        dm = TextDataModule(**args)
        (src,) = dm.train_sources
        assert (src.kind, src.path, src.rule) == ("preset", "allenai/c4", "c4")
        return src.data_files

    calibration, fine_tuning = train_files("blockwise.yaml"), train_files("e2e.yaml")
    assert calibration == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert fine_tuning == {"train": "en/c4-train.00001-of-01024.json.gz"}
    assert resolve_source("c4", "train", c4_train_shard=1023).data_files == {
        "train": "en/c4-train.01023-of-01024.json.gz"}
    assert resolve_source("c4", "eval", c4_train_shard=5).data_files == {
        "validation": "en/c4-validation.00000-of-00008.json.gz"}  # evaluation: always the protocol's shard
    with pytest.raises(ValueError, match="c4_train_shard"):
        TextDataModule(path="wikitext2", train_path="c4", c4_train_shard=1024)


def test_default_context_is_the_models_capped(tmp_path, word_tokenizer_dir):
    """seq_len None: the model's context (max_position_embeddings / n_positions), capped at 2048 by
    default (protocol.md) or at seq_len_cap; an explicit longer window is refused unless forced
    (defect 11.2)."""
    import shutil

    from transformers import GPT2Config, LlamaConfig

    from reallm.core.errors import UserError

    def model_dir(name, config):
        d = tmp_path / name
        shutil.copytree(word_tokenizer_dir, d)
        config.save_pretrained(d)
        return str(d)

    llama_4k = model_dir("llama4k", LlamaConfig(max_position_embeddings=4096))
    gpt2_64 = model_dir("gpt2", GPT2Config(n_positions=64))
    f = tmp_path / "a.txt"
    f.write_text("w1 w2 w3")
    assert TextDataModule(path=str(f), model_name_or_path=llama_4k).seq_len == 2048
    assert TextDataModule(path=str(f), model_name_or_path=llama_4k, seq_len_cap=4096).seq_len == 4096
    assert TextDataModule(path=str(f), model_name_or_path=gpt2_64).seq_len == 64
    assert TextDataModule(path=str(f), model_name_or_path=gpt2_64, seq_len=32).seq_len == 32
    with pytest.raises(UserError, match="exceeds the context 64"):
        _ = TextDataModule(path=str(f), model_name_or_path=gpt2_64, seq_len=65).seq_len
    assert TextDataModule(path=str(f), model_name_or_path=gpt2_64, seq_len=65, allow_beyond_context=True).seq_len == 65
    with pytest.raises(UserError, match="seq_len"):  # a tokenizer without a model config: no context to default to
        _ = TextDataModule(path=str(f), model_name_or_path=word_tokenizer_dir).seq_len
