"""Shared set-up of the phase-2 / phase-3 tests: a tiny Llama with the stories260K tokenizer
(vocab 512), saved as a base model directory and compressed into a phase-1 ReALLM checkpoint."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

SHARED = (Path(__file__).parents[1] / ".." / "shared").resolve()
TOKENIZER = SHARED / "models" / "stories260K"
TRAIN_TEXT = SHARED / "data" / "tinystories_train.txt"
VALID_TEXT = SHARED / "data" / "tinystories_valid.txt"
SEQ_LEN = 32


@dataclass
class Phase1:
    root: Path
    base: Path  # Hugging Face directory of the original model (safetensors + tokenizer)
    checkpoint: Path  # phase-1 ReALLM checkpoint
    token_cache: Path  # shared token-window cache of the text datamodule


def tiny_llama_512(seed: int = 0, layers: int = 2, attn: str | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if attn:
        cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a larger embedding scale: block outputs well above float noise
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


def fast_config(**changes):
    from reallm import CompressionConfig

    base = dict(quantizer="vq", bits=2, block_size=64, rank=2, lowrank_dtype="float32", magnitude_dtype="float32",
                options={"dim": 2, "codebook_scope": "model", "kmeans_iters": 5})
    return CompressionConfig(**{**base, **changes})


def make_phase1(root: Path, **config_changes) -> Phase1:
    """Tiny base model directory + its phase-1 checkpoint (compressed, saved with the tokenizer)."""
    if not TOKENIZER.is_dir():
        pytest.skip(f"{TOKENIZER} is absent (the phase tests need ../shared)")
    from transformers import AutoTokenizer

    from reallm import compress_, save_compressed

    root.mkdir(parents=True, exist_ok=True)
    base, ck = root / "base", root / "phase1"
    model = tiny_llama_512()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    compress_(model, fast_config(**config_changes), progress=False)
    save_compressed(model, ck, base_model=str(base), tokenizer=tok)
    return Phase1(root, base, ck, root / "tokens")


def data_args(p: Phase1, sequences: int = 32, batch_size: int = 4, eval_windows: int = 8) -> list[str]:
    """CLI arguments of the text datamodule: TinyStories, context SEQ_LEN, few windows."""
    return [
        "--data.init_args.path", str(VALID_TEXT),
        "--data.init_args.train_path", str(TRAIN_TEXT),
        "--data.init_args.seq_len", str(SEQ_LEN),
        "--data.init_args.train_sequences", str(sequences),
        "--data.init_args.batch_size", str(batch_size),
        "--data.init_args.max_eval_windows", str(eval_windows),
        "--data.init_args.cache_dir", str(p.token_cache),
    ]


def text_datamodule(p: Phase1, source: Path | None = None, sequences: int = 32, batch_size: int = 4,
                    eval_windows: int = 8, seed: int = 0):
    from reallm.data import TextDataModule

    return TextDataModule(path=str(VALID_TEXT), model_name_or_path=str(source or p.checkpoint), seq_len=SEQ_LEN,
                          train_path=str(TRAIN_TEXT), train_sequences=sequences, batch_size=batch_size,
                          max_eval_windows=eval_windows, cache_dir=str(p.token_cache), seed=seed)


def trainer(root: Path, **kwargs):
    import lightning as L

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=str(root))
    return L.Trainer(**{**defaults, **kwargs})


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every tensor that must not change in fine-tuning: frozen buffers and non-adapter parameters."""
    from reallm import iter_reallm_layers

    adapters = {id(p) for _, layer in iter_reallm_layers(model) for p in layer.parameters()}
    out = {k: v.detach().clone() for k, v in model.named_buffers()}
    out.update({k: v.detach().clone() for k, v in model.named_parameters() if id(v) not in adapters})
    return out


def adapters_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The default adapter set of a checkpoint, in stored form."""
    from reallm.checkpoint.compressed import read_adapters

    return read_adapters(checkpoint)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster, and robust to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
