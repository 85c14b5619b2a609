"""Tiny Hugging Face causal LMs built from configs (no download), for tests.

Widths are multiples of 64 where the quantizers need whole blocks, and odd elsewhere (96, 40)
so that padding paths are exercised.
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def _seeded(build):
    def wrapper(seed: int = 0):
        torch.manual_seed(seed)
        model = build()
        model.eval()
        return model

    wrapper.__name__ = build.__name__
    return wrapper


@_seeded
def tiny_llama():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@_seeded
def tiny_mistral():
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        sliding_window=64)
    return MistralForCausalLM(cfg)


@_seeded
def tiny_qwen2():
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg)


@_seeded
def tiny_gpt2():
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


ALL = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def sample_ids(n: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def word_tokenizer(vocab_size: int = VOCAB):
    """A real, offline Hugging Face tokenizer: one token per whitespace-separated word w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": 3 + i for i in range(vocab_size - 3)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_text(path, n_words: int = 4000, seed: int = 0, vocab_size: int = VOCAB):
    """A text file of random words of the word tokenizer's vocabulary (with some repetition)."""
    import random

    rng = random.Random(seed)
    words = [f"w{min(vocab_size - 4, int(rng.expovariate(0.05)))}" for _ in range(n_words)]
    lines = [" ".join(words[i:i + 20]) for i in range(0, n_words, 20)]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_model_dir(path, arch: str = "llama", seed: int = 0):
    """A local Hugging Face model directory (tiny model + word tokenizer) for CLI tests."""
    model = ALL[arch](seed)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path
