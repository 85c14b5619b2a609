"""Writes the checkpoints of this folder with the code of commit 7fcab89 (format version 2: Hugging Face
directories, written by `save_compressed` or `model.save_pretrained`, before the package's files moved,
issue 20): one directory per stored format of the codec registry, `<name>.expected_logits.safetensors`,
the logits that code computed for `tests.tiny_models.sample_ids()` after loading the directory back, and
`expected_bits.json`, that code's bit accounting (`reallm.bits_report`) of every loaded checkpoint, and
`environment.json`, the machine that computed the logits (torch version, CPU, its kernels: other CPUs give
logits a few float32 ulps away with the same code, see the test).
tests/test_checkpoint_v2_compat.py loads them with today's code and compares. Run from a checkout of that
commit (seeded, one thread: the same files every time):

    git worktree add --detach /tmp/v2 7fcab89
    cd /tmp/v2 && PYTHONPATH=$PWD python tests/data/checkpoints_v2/generate.py <output dir>

The fixtures (tiny models; the whole folder stays a few hundred KB):

    none_fp16_lora_gpt2   GPT-2 (Conv1D layers, biases, tied head): every block linear kept in
                          fp16 ("none") + LoRA rank 2 from zero (QLoRA-like), DoRA magnitude fp32
    nf3_svd_int8          Llama: NF3 + SVD low-rank rank 2 stored in int8 (fp16 scale per rank vector),
                          DoRA magnitude; written with a tokenizer, plus a named adapter set "task_b"
                          (`save_adapters`, its own file) whose logits are recorded too
    rtn3_qwen2_bf16       Qwen2 (q/k/v biases, untied head), all in bfloat16: RTN3 after
                          permutation + Hadamard rotation, plain LoRA (dora=False) rank 2 in bfloat16;
                          written with the plain `model.save_pretrained` (no loader module, no card)
    vq2_perm_rot_shared_alt   Llama: VQ 2 bits d=4, permuted (32-row blocks), Hadamard rotation, one
                          codebook for the whole model (stored once, `reallm.shared.*`), LQ-LoRA
                          alternating low-rank rank 2, DoRA magnitude in fp16
    additive_2x8_sharded  Llama: additive (AQLM-like 2x8, d=8) with model-wide codebooks, no low-rank
                          (rank 0: no adapters); saved in shards with an index (max_shard_size 10KB)
    e8p3_hadamard         Llama: E8P lattice + 1-bit residual stage (3 bits), Hadamard rotation,
                          low-rank rank 2 (fp16), DoRA magnitude
    autoencoder           Llama: the patch autoencoder (3 bits, d=2, permuted, 6-bit NF decoder weights,
                          one decoder + latent codebook for all 7 matrices, stored once),
                          low-rank rank 2, DoRA magnitude; built as its phase builds it (2 epochs)

Every model with low-rank adapters has them moved away from their initial values (lora_B + 0.01), as
after fine-tuning.
"""

import json
import os
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from reallm import (
    CompressionConfig,
    bits_report,
    compress_,
    iter_reallm_layers,
    load_compressed,
    save_adapters,
    save_compressed,
)
from reallm.codecs import autoencoder as ae_format
from reallm.codecs import names
from reallm.hf import linear_weight
from reallm.surgery import select_layers, swap_in
from reallm.training import autoencoder as ae_recipe
from tests.tiny_models import VOCAB, sample_ids, word_tokenizer


# Smaller than tests.tiny_models' models (hidden 32, one decoder block, 32 positions: `sample_ids()` has 32
# tokens of its 128-word vocabulary) so that the folder stays small; shared tensors (model-wide codebooks,
# the autoencoder's decoder) still serve the block's 7 matrices.
def small_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def small_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def small_qwen2_bf16():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return Qwen2ForCausalLM(cfg).eval().to(torch.bfloat16)


HERE = "tests/data/checkpoints_v2"


# name → (model builder, config, how it is written)
CONFIGS = {
    "none_fp16_lora_gpt2": (small_gpt2, CompressionConfig(quantizer="none", rank=2, lowrank_init="zero"),
                            "save_compressed"),
    "nf3_svd_int8": (small_llama, CompressionConfig(quantizer="nf", bits=3, rank=2, lowrank_dtype="int8"),
                     "save_compressed"),
    "rtn3_qwen2_bf16": (small_qwen2_bf16, CompressionConfig(
        quantizer="rtn", bits=3, permute=True, permute_rows=32, rotation="hadamard", rank=2, dora=False,
        lowrank_dtype="bfloat16"), "save_pretrained"),
    "vq2_perm_rot_shared_alt": (small_llama, CompressionConfig(
        quantizer="vq", bits=2, vq_dim=4, permute=True, permute_rows=32, rotation="hadamard", rank=2,
        lowrank_init="alternating", lowrank_iters=3, codebook_scope="model", kmeans_iters=10,
        magnitude_dtype="float16"), "save_compressed"),
    "additive_2x8_sharded": (small_llama, CompressionConfig(
        quantizer="additive", bits=2, vq_dim=8, codebooks=2, beam=4, refine_iters=3, kmeans_iters=10,
        codebook_scope="model"), "sharded"),
    "e8p3_hadamard": (small_llama, CompressionConfig(quantizer="e8p", bits=3, rotation="hadamard", rank=2),
                      "save_compressed"),
}
AE = CompressionConfig(quantizer="autoencoder", bits=3, vq_dim=2, permute=True, rank=2,
                       autoencoder={"patch": 16, "n_stages": 1, "latent_channels": 4, "encoder_width": 8,
                                    "encoder_blocks": 0, "decoder_width": 8, "kernels": [3], "weight_bits": 6,
                                    "share": "model"})


def autoencoder_model():
    """Llama whose block linears are autoencoder containers, built as tests/test_ae_phase.py builds them."""
    model = small_llama()
    groups: dict[str, list] = {}
    for name, mod, c in select_layers(model, AE):
        groups.setdefault(ae_recipe.group_key(c, name, "model.layers"), []).append(
            ae_recipe.prepare_matrix(linear_weight(mod), c, name))
    spec, keys = ae_format.ae_spec(AE), sorted(groups)
    data = ae_recipe.GroupData([groups[k] for k in keys], spec)
    stack = ae_recipe.AEStack(spec, 3, 2, len(keys), list(range(len(keys))))
    ae_recipe.train_stacks([(stack, data)], ae_recipe.TrainSchedule(epochs=2, batch_size=4, kmeans_iters=3))
    for g, k in enumerate(keys):
        res = ae_recipe.export_group(stack, data, g)
        for pm in groups[k]:
            swap_in(model, pm.name, ae_recipe.build_container(pm, AE, res))
    return model


def environment() -> dict:
    """What decides the float arithmetic besides the code (tests/test_checkpoint_v2_compat.py computes the same):
    torch's version and CPU kernels, MKL's instruction-set settings, and the CPU itself (MKL picks its code path
    per processor). The same code gives bit-identical logits only where all of this is the same."""
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line
                    and line.split(":", 1)[0].strip() in ("vendor_id", "model name"))
        cpu = " / ".join(v.strip() for _, v in sorted(info.items()))
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpu": cpu,
            "mkl": {k: os.environ.get(k) for k in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")}}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_ids()).logits.contiguous()


def bits_record(model) -> dict:
    report = bits_report(model)
    return {"decoder_linears": report["decoder_linears"], "whole_model": report["whole_model"],
            "matrices": {m["name"]: {"bits": m["bits"], "items": m["items"]} for m in report["matrices"]}}


def main(out: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, (build, cfg, _) in CONFIGS.items():
        model = build()
        compress_(model, cfg, progress=False)
        models[name] = model
    models["autoencoder"] = autoencoder_model()
    how = {name: spec[2] for name, spec in CONFIGS.items()} | {"autoencoder": "save_compressed"}
    covered = {layer.container().config.quantizer for m in models.values() for _, layer in iter_reallm_layers(m)}
    assert covered == set(names()), f"formats without a fixture: {sorted(set(names()) - covered)}"
    bits = {}
    for name, model in models.items():
        with torch.no_grad():
            for _, layer in iter_reallm_layers(model):
                if layer.rank:
                    layer.lora_B.add_(0.01)  # adapters away from their initial values
        in_memory = logits(model)
        if how[name] == "save_pretrained":
            model.save_pretrained(out / name)
        elif how[name] == "sharded":
            save_compressed(model, out / name, max_shard_size="10KB")
        elif name == "nf3_svd_int8":
            save_compressed(model, out / name, tokenizer=word_tokenizer())
        else:
            save_compressed(model, out / name)
        # the model card's examples name the directory it was written to: name this folder instead, so that
        # the bytes do not depend on <output dir> (the card is documentation, covered by no digest)
        card = out / name / "README.md"
        if card.is_file():
            card.write_text(card.read_text().replace(str((out / name).absolute()), f"{HERE}/{name}"))
        back = load_compressed(out / name)
        expected = logits(back)
        # the loaded model computes what the saved one did; except the bf16 model, whose in-memory copy is not
        # comparable: `.to(bfloat16)` also cast its rotary inv_freq buffer, which from_pretrained keeps in fp32
        if name != "rtn3_qwen2_bf16":
            assert torch.equal(expected, in_memory), name
        save_file({"logits": expected}, str(out / f"{name}.expected_logits.safetensors"))
        bits[name] = bits_record(back)
        print(name, "saved")
    # a named adapter set over the frozen part of nf3_svd_int8
    model = models["nf3_svd_int8"]
    with torch.no_grad():
        for _, layer in iter_reallm_layers(model):
            layer.lora_B.add_(0.02)
            layer.magnitude.mul_(1.1)
    save_adapters(model, out / "nf3_svd_int8", "task_b")
    expected = logits(load_compressed(out / "nf3_svd_int8", adapters="task_b"))
    assert torch.equal(expected, logits(model))
    save_file({"logits": expected}, str(out / "nf3_svd_int8.task_b.expected_logits.safetensors"))
    (out / "expected_bits.json").write_text(json.dumps(bits, indent=1, sort_keys=True) + "\n")
    (out / "environment.json").write_text(json.dumps(environment(), indent=1, sort_keys=True) + "\n")
    print("nf3_svd_int8 adapter set task_b saved")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
