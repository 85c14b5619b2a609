"""A Llama-2-7B-shaped rehearsal model: every tensor of the real shapes, drawn to be spread like a trained LLM's.

    python benchmarks/scale.py build                 # 32 layers, 6.74 B parameters, 13.5 GB of bf16 shards
    python benchmarks/scale.py build --layers 2      # the same shapes, 2 decoder blocks (1.3 GB)
    python benchmarks/scale.py build --tiny          # hidden 64, FFN 172, 2 layers, vocabulary 512 (CI, seconds)
    python benchmarks/scale.py stats runs/rehearsal/7b        # heavy-tail statistics, one tensor at a time
    python benchmarks/scale.py delete                # removes runs/rehearsal/7b (same flags as build pick the dir)

Why: the real Llama-2-7B cannot be downloaded here, and stories260K (hidden 64) says nothing about the memory, time
and file handling of a 7B run. This writes a Hugging Face directory that `AutoModelForCausalLM.from_pretrained`
and every phase of the project load like the real one (LlamaForCausalLM, 32 layers, hidden 4096, FFN 11008, 32
heads and 32 KV heads, vocabulary 32000, context 4096, RMSNorm eps 1e-5, embeddings and lm_head untied), without
ever holding the model whole: each tensor is generated in row chunks and streamed into its shard, so the peak is a
chunk (4 M values) plus the interpreter, whatever the layer count.

Layout: one shard per decoder block (405 MB at 7B) and a first shard with embed_tokens, the final norm and lm_head
(524 MB). A block is the unit the block-wise phase reads and the unit of atomic writing; 33 shards of 0.4-0.5 GB
keep every file far under the 5 GB that hubs and filesystems handle well.

Atomicity: the directory is built as a hidden sibling `.<name>.partial-<pid>-<random>` (each shard through a temporary
name and os.replace, config.json, the index and rehearsal.json written last) and renamed into place only when
complete; an error or Ctrl-C removes it, and a killed build leaves only the hidden partial directory, which has no
config.json and which `delete` removes.

Weights (docs/scale.md gives the reasons and the sources): per matrix W (p × q),
    W = rms · ( √(1 − ρ) · D_r T D_c / √m  +  √ρ · U diag(s) Vᵀ )  +  spikes
T: Student-t entries (ν = 4-6, unit variance); D_r, D_c: row and column scales (a lognormal spread on every
channel, 2.5-5 on a few outlier input columns (0.2 %) and 1.5-2.5 on a few rows (0.1 %)); m normalises their
mean square; U, V Gaussian with s_k ∝ 1/k (a decaying spectrum, rank 32) carrying a share ρ of the energy; rms per
matrix kind and layer from public 4-bit error logs of LLaMA-7B. The outlier columns of every matrix that reads
the hidden state sit at the same few hidden dimensions (as outlier features do in trained LLMs); o_proj and
down_proj carry one isolated large weight ("super weight") per 2^24 entries, in a row of those dimensions.

Reproducible: a seed gives byte-identical shards with the same library versions; every tensor has its own
generators (seeded by the seed and the tensor's name), so the 2-layer variant's tensors equal the first blocks of
the full model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reallm.core.io import atomic_write_json, atomic_write_text  # noqa: E402

TOKENIZER_TEXT = ROOT / ".." / "shared" / "data" / "tinystories_train.txt"
CHUNK_VALUES = 1 << 22  # values per generated chunk (16 MB in fp32); fixed, since the random streams depend on it
MARKER = "rehearsal.json"  # written last; `delete` removes only directories that carry it


# ---------------------------------------------------------------------------------------------------------------
# shapes and distributions
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """The architecture of a variant (Llama-2-7B's by default)."""

    hidden: int = 4096
    ffn: int = 11008
    heads: int = 32
    kv_heads: int = 32
    layers: int = 32
    vocab: int = 32000
    context: int = 4096


TINY = Shape(hidden=64, ffn=172, heads=4, kv_heads=4, layers=2, vocab=512, context=512)


@dataclass(frozen=True)
class Spread:
    """How one kind of matrix is drawn (the formula in the module docstring).

    rms: RMS at layer 0 and at layer 31 (linear in between, see layer_rms). nu: Student-t degrees of freedom.
    lowrank: share ρ of ‖W‖² in the rank-`rank` part. channel_sigma: σ of the lognormal scale of every row and
    column. cols: share of outlier input columns, (lo, hi) their log-uniform factor, and whether they sit at the
    model's outlier hidden dimensions (matrices that read the hidden state) or at random columns of their own.
    rows: the same for output rows. spike_every: one isolated weight of ±(spike) · rms per that many entries
    (0: none), in a row at an outlier hidden dimension.
    """

    rms: tuple[float, float]
    nu: float
    lowrank: float = 0.03
    rank: int = 32
    channel_sigma: float = 0.1
    col_frac: float = 0.002
    col_scale: tuple[float, float] = (2.5, 5.0)
    hidden_cols: bool = True
    row_frac: float = 0.001
    row_scale: tuple[float, float] = (1.5, 2.5)
    spike_every: int = 0
    spike: tuple[float, float] = (30.0, 90.0)


# Keyed by the last part of the tensor name before ".weight". RMS from per-tensor 4-bit error logs of LLaMA-7B
# (docs/scale.md): q/k larger in early layers, v/o smaller in early layers, the MLP about constant.
SPREADS = {
    "q_proj": Spread(rms=(0.030, 0.024), nu=5, lowrank=0.15),
    "k_proj": Spread(rms=(0.030, 0.024), nu=5, lowrank=0.15),
    "v_proj": Spread(rms=(0.016, 0.023), nu=6, lowrank=0.05, col_frac=0.0, row_frac=0.0),
    "o_proj": Spread(rms=(0.016, 0.023), nu=6, lowrank=0.05, hidden_cols=False, spike_every=1 << 24),
    "gate_proj": Spread(rms=(0.022, 0.022), nu=6),
    "up_proj": Spread(rms=(0.020, 0.020), nu=6),
    "down_proj": Spread(rms=(0.020, 0.020), nu=5, hidden_cols=False, spike_every=1 << 24),
    "embed_tokens": Spread(rms=(0.016, 0.016), nu=4, lowrank=0.05),
    "lm_head": Spread(rms=(0.020, 0.020), nu=5, lowrank=0.05),
}
NORM_SIGMA = 0.2  # RMSNorm weights: exp(N(0, 0.2²)), median 1


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its name, shape (out, in) or (n,), matrix kind and decoder layer (-1: outside)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    layer: int


def shard_plans(shape: Shape) -> list[list[TensorPlan]]:
    """The tensors of each shard, in order: [embed_tokens, norm, lm_head], then one list per decoder block."""
    h, f, v = shape.hidden, shape.ffn, shape.vocab
    head_dim = h // shape.heads
    first = [TensorPlan("model.embed_tokens.weight", (v, h), "embed_tokens", -1),
             TensorPlan("model.norm.weight", (h,), "norm", -1),
             TensorPlan("lm_head.weight", (v, h), "lm_head", -1)]
    shards = [first]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        shards.append([
            TensorPlan(p + "input_layernorm.weight", (h,), "norm", i),
            TensorPlan(p + "self_attn.q_proj.weight", (h, h), "q_proj", i),
            TensorPlan(p + "self_attn.k_proj.weight", (shape.kv_heads * head_dim, h), "k_proj", i),
            TensorPlan(p + "self_attn.v_proj.weight", (shape.kv_heads * head_dim, h), "v_proj", i),
            TensorPlan(p + "self_attn.o_proj.weight", (h, h), "o_proj", i),
            TensorPlan(p + "post_attention_layernorm.weight", (h,), "norm", i),
            TensorPlan(p + "mlp.gate_proj.weight", (f, h), "gate_proj", i),
            TensorPlan(p + "mlp.up_proj.weight", (f, h), "up_proj", i),
            TensorPlan(p + "mlp.down_proj.weight", (h, f), "down_proj", i),
        ])
    return shards


def shard_name(k: int, n: int) -> str:
    """Hugging Face's shard naming, k counted from 0: model-00001-of-00033.safetensors."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------
def generators(seed: int, name: str, n: int = 3) -> list[np.random.Generator]:
    """n independent generators for one tensor, seeded by (seed, SHA-256 of its name): the same tensor gets the
    same numbers whatever else the model holds (Python's hash() is salted per process, so it is not used)."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return [np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence([seed, key]).spawn(n)]


@cache
def mixing_table(nu: float, levels: int = 1 << 16) -> np.ndarray:
    """(levels,) float32 quantiles of S = √(ν / χ²_ν) at the midpoints (k + ½) / levels, scaled so E[S²] = 1.

    A Student-t variable is Z · S (Z standard normal): drawing Z and a random index into this table costs one
    normal and one 16-bit integer per weight, 3-5× faster here than a gamma draw, and the distribution differs from
    the exact t only by S's discretisation (its extreme 1/131072 quantile caps S; Z keeps its full tail).
    """
    from scipy.stats import chi2

    q = (np.arange(levels, dtype=np.float64) + 0.5) / levels
    s = np.sqrt(nu / chi2.ppf(q, nu))
    return (s / np.sqrt(np.mean(s * s))).astype(np.float32)


def hidden_outlier_dims(seed: int, hidden: int, frac: float = 0.002) -> np.ndarray:
    """The model's outlier hidden dimensions (sorted, max(1, round(frac · hidden)) of them; 8 of 4096)."""
    (g,) = generators(seed, "hidden-outlier-dims", 1)
    return np.sort(g.choice(hidden, size=max(1, round(frac * hidden)), replace=False))


def layer_rms(spread: Spread, layer: int) -> float:
    """The matrix's target RMS: spread.rms interpolated linearly from layer 0 to layer 31, Llama-2-7B's depth
    whatever the variant's, so that a variant's block i is the 7B model's block i (layer -1: outside the blocks)."""
    first, last = spread.rms
    t = min(1.0, max(0, layer) / (Shape().layers - 1))
    return first + (last - first) * t


def channel_scales(g: np.random.Generator, n: int, sigma: float, frac: float, span: tuple[float, float],
                   at: np.ndarray | None = None) -> np.ndarray:
    """(n,) float64 channel scales: exp(N(0, σ²)) each, replaced by a log-uniform factor in `span` on the outlier
    channels (`at`, or max(1, round(frac · n)) random ones; none when frac is 0). Replaced rather than multiplied,
    so that an outlier channel stands at least span[0] × the median channel, whatever the spread."""
    scales = np.exp(sigma * g.standard_normal(n))
    if frac == 0:
        return scales
    if at is None:
        at = g.choice(n, size=max(1, round(frac * n)), replace=False)
    scales[at] = np.exp(g.uniform(np.log(span[0]), np.log(span[1]), size=len(at)))
    return scales


@dataclass
class MatrixParts:
    """The per-matrix structure, drawn before the bulk: row scales (p,), column scales (q,), the low-rank factors
    U (p, r) and S Vᵀ (r, q) (fp32), the two mixing weights, and the spikes as (row, col, value) triples."""

    rows: np.ndarray
    cols: np.ndarray
    U: torch.Tensor
    SVt: torch.Tensor
    bulk_weight: float
    lowrank_weight: float
    spikes: list[tuple[int, int, float]]


def matrix_parts(g: np.random.Generator, plan: TensorPlan, spread: Spread, rms: float,
                 hidden_dims: np.ndarray) -> MatrixParts:
    """Draw the structure of one (p, q) matrix: O(p + q) scales and O((p + q) r) factors, never O(p q)."""
    p, q = plan.shape
    rows = channel_scales(g, p, spread.channel_sigma, spread.row_frac, spread.row_scale)
    cols = channel_scales(g, q, spread.channel_sigma, spread.col_frac, spread.col_scale,
                          at=hidden_dims if spread.hidden_cols else None)
    m = float(np.mean(rows ** 2) * np.mean(cols ** 2))  # E[(D_r T D_c)²] for unit-variance T
    r = max(1, min(spread.rank, min(p, q) // 4))
    s = 1.0 / np.arange(1, r + 1)
    s /= np.sqrt(np.sum(s * s))  # E[(U diag(s) Vᵀ)²] = Σ s² = 1 for standard normal U, V
    U = torch.from_numpy(g.standard_normal((p, r), dtype=np.float32))
    SVt = torch.from_numpy((g.standard_normal((r, q), dtype=np.float32) * s[:, None]).astype(np.float32))
    spikes = []
    n_spikes = p * q // spread.spike_every if spread.spike_every else 0
    for _ in range(n_spikes):
        row = int(g.choice(hidden_dims)) if int(hidden_dims.max()) < p else int(g.integers(p))
        col = int(g.integers(q))
        value = rms * math.exp(g.uniform(math.log(spread.spike[0]), math.log(spread.spike[1])))
        spikes.append((row, col, value if g.random() < 0.5 else -value))
    return MatrixParts(rows, cols, U, SVt, rms * math.sqrt((1 - spread.lowrank) / m),
                       rms * math.sqrt(spread.lowrank), spikes)


def matrix_chunks(plan: TensorPlan, spread: Spread, rms: float, seed: int,
                  hidden_dims: np.ndarray) -> Iterator[torch.Tensor]:
    """Yield the (p, q) matrix as bf16 row chunks of ≈ CHUNK_VALUES values, in order; peak memory is one chunk
    (a few fp32 temporaries of it) plus the O((p + q) r) structure."""
    g_parts, g_normal, g_mix = generators(seed, plan.name)
    parts = matrix_parts(g_parts, plan, spread, rms, hidden_dims)
    table = mixing_table(spread.nu)
    p, q = plan.shape
    step = max(1, CHUNK_VALUES // q)
    cols = torch.from_numpy(parts.cols.astype(np.float32))
    for i in range(0, p, step):
        j = min(p, i + step)
        t = g_normal.standard_normal((j - i, q), dtype=np.float32)
        t *= table[g_mix.integers(0, len(table), size=(j - i, q), dtype=np.uint16)]
        chunk = torch.from_numpy(t)
        chunk.mul_(cols).mul_(torch.from_numpy((parts.rows[i:j] * parts.bulk_weight).astype(np.float32))[:, None])
        chunk.addmm_(parts.U[i:j], parts.SVt, alpha=parts.lowrank_weight)
        for row, col, value in parts.spikes:
            if i <= row < j:
                chunk[row - i, col] = value
        yield chunk.to(torch.bfloat16)


def norm_chunks(plan: TensorPlan, seed: int) -> Iterator[torch.Tensor]:
    """Yield an RMSNorm weight (n,): exp(N(0, NORM_SIGMA²)), median 1, in bf16."""
    (g,) = generators(seed, plan.name, 1)
    yield torch.from_numpy(np.exp(NORM_SIGMA * g.standard_normal(plan.shape[0])).astype(np.float32)).bfloat16()


def tensor_chunks(plan: TensorPlan, seed: int, hidden_dims: np.ndarray) -> Iterator[torch.Tensor]:
    """The chunks of any planned tensor (dispatch on its kind)."""
    if plan.kind == "norm":
        return norm_chunks(plan, seed)
    spread = SPREADS[plan.kind]
    return matrix_chunks(plan, spread, layer_rms(spread, plan.layer), seed, hidden_dims)


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """The safetensors prefix for bf16 tensors written back to back in `entries` order: an 8-byte little-endian
    length, then the JSON header padded with spaces to a multiple of 8. Returns (prefix, data bytes)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], Callable[[], Iterator[torch.Tensor]]]]
                      ) -> int:
    """Stream bf16 tensors into one safetensors file, chunk by chunk, through a temporary name and os.replace.

    entries: (name, shape, chunks) with chunks() yielding bf16 tensors whose values, concatenated, are the tensor's
    in row-major order. Nothing but the current chunk is held. Returns the tensor bytes written.
    """
    prefix, total = safetensors_header([(n, s) for n, s, _ in entries])
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            for name, shape, chunks in entries:
                written = 0
                for chunk in chunks():
                    f.write(chunk.contiguous().view(torch.int16).numpy().data)  # bf16 bits, little-endian
                    written += chunk.numel()
                if written != math.prod(shape):
                    raise RuntimeError(f"{name}: generated {written} values for shape {shape}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and configuration
# ---------------------------------------------------------------------------------------------------------------
SPECIALS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(vocab: int, text: Path):
    """A Llama-2-style tokenizer with exactly `vocab` ids, built offline and deterministically.

    ids 0-2: <unk>, <s>, </s>; 3-258: the byte-fallback pieces <0x00>-<0xFF> (any text encodes, as with
    Llama-2's SentencePiece model); then the pieces of a BPE trained on `text` (with ▁ for spaces, Llama's
    convention); the ids left over (TinyStories' 638 KB yields ≈ 12,350 pieces, so ≈ 19,400 of 32,000) are
    `<unused_k>` placeholders: real rows of the embedding and lm_head that encoding never produces.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not text.is_file():
        raise SystemExit(f"error: tokenizer text {text} not found (pass --tokenizer-text)")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=vocab - 256, special_tokens=SPECIALS, show_progress=False)
    trainer_tok.train([str(text)], trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in SPECIALS]
    names = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces
    names += [f"<unused_{k}>" for k in range(vocab - len(names))]
    tok = Tokenizer(models.BPE(vocab={n: i for i, n in enumerate(names)}, merges=[tuple(m) for m in trained["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # Llama-2's tokenizer.json decoder
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if tok.get_vocab_size() != vocab:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids, expected {vocab}")
    return tok


def write_tokenizer(directory: Path, shape: Shape, text: Path) -> None:
    """tokenizer.json and tokenizer_config.json (PreTrainedTokenizerFast, like ../shared's stories260K)."""
    tok = build_tokenizer(shape.vocab, text)
    atomic_write_text(directory / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    atomic_write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": shape.context})


def llama_config(shape: Shape):
    """The transformers LlamaConfig of the variant: Llama-2-7B's settings with the variant's sizes."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.context,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=None, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def write_configs(directory: Path, shape: Shape, weight_map: dict[str, str], total_bytes: int,
                  provenance: dict) -> None:
    """The files that make the directory a model, written after every shard: generation_config.json,
    model.safetensors.index.json, config.json, and the marker rehearsal.json last."""
    from transformers import GenerationConfig

    config = llama_config(shape)
    atomic_write_text(directory / "generation_config.json", GenerationConfig.from_model_config(config).to_json_string())
    atomic_write_json(directory / "model.safetensors.index.json",
                      {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    atomic_write_text(directory / "config.json", config.to_json_string())
    atomic_write_json(directory / MARKER, provenance)


# ---------------------------------------------------------------------------------------------------------------
# build / delete
# ---------------------------------------------------------------------------------------------------------------
def variant_shape(tiny: bool, layers: int | None) -> Shape:
    """The variant's shape: Llama-2-7B's or TINY, with `layers` decoder blocks when given."""
    base = TINY if tiny else Shape()
    return dataclasses.replace(base, layers=layers) if layers is not None else base


def default_dir(tiny: bool, layers: int | None) -> Path:
    """runs/rehearsal/7b, 7b-2l, tiny, ... (runs/ is git-ignored: the weights are never committed)."""
    name = "tiny" if tiny else "7b"
    if layers is not None and layers != (TINY if tiny else Shape()).layers:
        name += f"-{layers}l"
    return ROOT / "runs" / "rehearsal" / name


def parameter_count(shape: Shape) -> int:
    """Parameters of the variant (6,738,415,616 for Llama-2-7B)."""
    return sum(math.prod(t.shape) for shard in shard_plans(shape) for t in shard)


def make_partial_dir(out: Path) -> Path:
    """Create the directory a build of `out` is written in before the rename: a hidden sibling named after the
    process, .<name>.partial-<pid>-<random>, so that `delete` finds it and a later build can tell if its process
    is gone."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def open_modes(directory: Path) -> None:
    """Give the directory and its files the modes a plain mkdir / open would (0755 / 0644 under umask 022):
    mkdtemp and the atomic writers' temporary files start at 0700 / 0600, readable by their owner only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partial_builds(out: Path, dead_only: bool = False) -> list[Path]:
    """The partial builds of `out` (hidden siblings .<name>.partial-<pid>-<random>); with dead_only, only those
    whose process is gone: a killed 7B build leaves up to 13.5 GB there."""
    if not out.parent.is_dir():
        return []
    prefix = f".{out.name}.partial-"
    found = sorted(p for p in out.parent.glob(prefix + "*") if p.name[len(prefix):].split("-")[0].isdigit())
    return [p for p in found if not dead_only or not process_alive(int(p.name[len(prefix):].split("-")[0]))]


def remove(out: Path) -> list[Path]:
    """Remove a rehearsal directory (only one that carries rehearsal.json) and every partial build of it.
    Returns what was removed."""
    gone = []
    if out.exists():
        if not (out / MARKER).is_file():
            raise SystemExit(f"error: {out} has no {MARKER}: not a rehearsal model, not removing it")
        shutil.rmtree(out)
        gone.append(out)
    for stale in partial_builds(out):
        shutil.rmtree(stale, ignore_errors=True)
        gone.append(stale)
    return gone


def build(out: Path, shape: Shape, seed: int = 0, force: bool = False, text: Path = TOKENIZER_TEXT,
          log: Callable[[str], None] = lambda s: None) -> dict:
    """Write the rehearsal model to `out` (see the module docstring). Returns its provenance (rehearsal.json)."""
    out = Path(out)
    if out.exists():
        if not force:
            raise SystemExit(f"error: {out} exists (--force replaces it; `delete` removes it)")
        remove(out)
    for stale in partial_builds(out, dead_only=True):
        shutil.rmtree(stale, ignore_errors=True)
        log(f"removed {stale}, left by a killed build")
    plans = shard_plans(shape)
    total = 2 * parameter_count(shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total + (1 << 30):
        raise SystemExit(f"error: {total / 1e9:.1f} GB needed under {out.parent}, {free / 1e9:.1f} GB free")
    tmp = make_partial_dir(out)
    try:
        write_tokenizer(tmp, shape, Path(text))
        hidden_dims = hidden_outlier_dims(seed, shape.hidden)
        weight_map = {}
        t0 = time.perf_counter()
        for k, shard in enumerate(plans):
            name = shard_name(k, len(plans))
            write_safetensors(tmp / name, [(t.name, t.shape, lambda t=t: tensor_chunks(t, seed, hidden_dims))
                                           for t in shard])
            weight_map.update({t.name: name for t in shard})
            log(f"{name}: {len(shard)} tensors, {time.perf_counter() - t0:.1f} s")
        provenance = {"generator": "benchmarks/scale.py", "seed": seed, "shape": dataclasses.asdict(shape),
                      "parameters": total // 2, "bytes": total, "hidden_outlier_dims": hidden_dims.tolist(),
                      "spreads": {k: dataclasses.asdict(v) for k, v in SPREADS.items()}, "norm_sigma": NORM_SIGMA,
                      "tokenizer_text": Path(text).name, "chunk_values": CHUNK_VALUES,
                      "versions": {"numpy": np.__version__, "torch": torch.__version__}}
        write_configs(tmp, shape, weight_map, total, provenance)
        open_modes(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return provenance


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------
def top_singular_value(W: torch.Tensor, k: int = 8, iters: int = 8) -> float:
    """σ₁ of a (p, q) matrix by subspace iteration on k vectors (seeded): each step is two products of W with a
    thin matrix, W (p, q) @ (q, k) and (k, p) @ W, both reading W in its row-major order; a full SVD of a 7B
    matrix, or torch.svd_lowrank's transposed products, take 5-10× longer here."""
    k = min(k, *W.shape)
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(W @ torch.randn(W.shape[1], k, generator=g)).Q  # (p, k)
    for _ in range(iters):
        Z = torch.linalg.qr((Q.T @ W).T).Q  # (q, k)
        Q = torch.linalg.qr(W @ Z).Q
    return float(torch.linalg.svdvals(Q.T @ W)[0])


def matrix_stats(W: torch.Tensor, outlier_ratio: float = 2.0) -> dict:
    """Heavy-tail statistics of one (p, q) matrix (fp32): std, Pearson kurtosis E[(w − μ)⁴] / σ⁴ (3 for a
    Gaussian), max|w| / std, top singular value share σ₁² / ‖W‖²_F (≈ 4 / min(p, q) for i.i.d. entries), and the
    number of columns whose norm exceeds `outlier_ratio` × the median column norm. The moments are summed over
    row chunks of ≈ CHUNK_VALUES values, so the only full-size array is W itself."""
    rows = W.split(max(1, CHUNK_VALUES // W.shape[1]))
    n = W.numel()
    mean = sum(float(c.sum()) for c in rows) / n
    m2 = m4 = 0.0
    col_sq = torch.zeros(W.shape[1])
    absmax = 0.0
    for c in rows:
        d = c - mean
        d2 = d * d
        m2 += float(d2.sum())
        m4 += float((d2 * d2).sum())
        col_sq += (c * c).sum(dim=0)
        absmax = max(absmax, float(c.abs().max()))
    var, total_sq = m2 / n, float(col_sq.sum())
    col = col_sq.sqrt()
    return {"std": var ** 0.5, "kurtosis": (m4 / n) / var ** 2, "max_over_std": absmax / var ** 0.5,
            "top_sv_share": top_singular_value(W) ** 2 / total_sq,
            "outlier_cols": int((col > outlier_ratio * col.median()).sum())}


def tensor_kind(name: str) -> str:
    """q_proj, ..., embed_tokens, lm_head, or norm (any RMSNorm weight)."""
    return "norm" if "norm" in name else re.sub(r"\.weight$", "", name).rsplit(".", 1)[-1]


def stream_stats(directory: Path) -> list[dict]:
    """Statistics of every tensor of a model directory, reading one tensor at a time (shard by shard, in the
    index's order): peak memory is the largest tensor in fp32 plus its temporaries."""
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    rows = []
    for shard in dict.fromkeys(index.values()):
        with safe_open(str(directory / shard), framework="pt") as f:
            for name in f.keys():
                W = f.get_tensor(name).float()
                row = {"name": name, "kind": tensor_kind(name), "shape": list(W.shape)}
                if W.dim() == 2:
                    row.update(matrix_stats(W))
                else:
                    row.update({"mean": float(W.mean()), "std": float(W.std()), "min": float(W.min()),
                                "max": float(W.max())})
                rows.append(row)
                del W
    return rows


def summary_table(rows: list[dict]) -> str:
    """A markdown table per kind: median [min, max] over the tensors of that kind."""
    def span(values: list[float], fmt: str) -> str:
        v = sorted(values)
        mid = statistics.median(v)
        return f"{mid:{fmt}} [{v[0]:{fmt}}, {v[-1]:{fmt}}]" if len(v) > 1 else f"{v[0]:{fmt}}"

    lines = ["| kind | tensors | std | kurtosis | max\\|w\\|/std | top σ² share | outlier cols |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds:
        rs = [r for r in rows if r["kind"] == kind]
        if "kurtosis" not in rs[0]:
            lines.append(f"| {kind} (mean {span([r['mean'] for r in rs], '.3f')}) | {len(rs)} | "
                         f"{span([r['std'] for r in rs], '.3f')} | | | | |")
            continue
        cells = [span([r[k] for r in rs], fmt) for k, fmt in
                 (("std", ".4f"), ("kurtosis", ".1f"), ("max_over_std", ".0f"), ("top_sv_share", ".3f"),
                  ("outlier_cols", "g"))]
        lines.append(f"| {kind} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def directory_bytes(directory: Path) -> int:
    """Bytes of the files of a directory (what the build put on disk)."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for command in ("build", "delete"):
        p = sub.add_parser(command)
        p.add_argument("--out", type=Path, default=None, help="directory (default runs/rehearsal/<variant>)")
        p.add_argument("--tiny", action="store_true", help="hidden 64, FFN 172, 4 heads, vocabulary 512")
        p.add_argument("--layers", type=int, default=None, help="decoder blocks (default 32; 2 for --tiny)")
        if command == "build":
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--force", action="store_true", help="replace an existing rehearsal directory")
            p.add_argument("--tokenizer-text", type=Path, default=TOKENIZER_TEXT, help="BPE training text")
    p = sub.add_parser("stats")
    p.add_argument("directory", type=Path)
    p.add_argument("--json", type=Path, default=None, help="also write the per-tensor statistics here")
    args = ap.parse_args(argv)

    if args.command == "stats":
        t0 = time.perf_counter()
        rows = stream_stats(args.directory)
        print(summary_table(rows))
        if args.json:
            atomic_write_json(args.json, {"directory": str(args.directory), "tensors": rows})
        print(f"{len(rows)} tensors, {time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_mib():.0f} MiB")
        return
    out = args.out or default_dir(args.tiny, args.layers)
    if args.command == "delete":
        gone = remove(out)
        print("\n".join(f"removed {p}" for p in gone) or f"nothing to remove at {out}")
        return
    shape = variant_shape(args.tiny, args.layers)
    print(f"building {out}: {shape}, {parameter_count(shape):,} parameters, seed {args.seed}")
    t0 = time.perf_counter()
    build(out, shape, args.seed, args.force, args.tokenizer_text, log=print)
    print(f"done in {time.perf_counter() - t0:.1f} s: {directory_bytes(out):,} bytes on disk, "
          f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
