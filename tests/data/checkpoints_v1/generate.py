"""Writes the checkpoints of this folder with the code of commit 7e332a8 (format version 1, before the
codec registry): one directory per stored format and `<name>/expected_logits.safetensors`, the logits
that code computed for `tests.tiny_models.sample_ids()`. tests/test_checkpoint_compat.py loads them with
today's code and compares. Run from a checkout of that commit:

    git worktree add --detach /tmp/v1 7e332a8
    cd /tmp/v1 && PYTHONPATH=$PWD python <this file> <output dir>
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from reallm import CompressionConfig, compress_, load_compressed, save_compressed
from reallm.nn import codec
from reallm.nn.dora import ReALLMLinear
from reallm.surgery import _set_module, iter_reallm_layers, linear_weight, select_layers
from tests.tiny_models import ALL, sample_ids

CONFIGS = {
    "nf3_svd_int8": ("llama", CompressionConfig(quantizer="nf", bits=3, rank=2, lowrank_dtype="int8")),
    "rtn3": ("llama", CompressionConfig(quantizer="rtn", bits=3)),
    "fp16_lora": ("gpt2", CompressionConfig(quantizer="none", rank=2, lowrank_init="zero")),
    "vq2_perm_rot_shared_alt": ("llama", CompressionConfig(
        quantizer="vq", bits=2, vq_dim=4, permute=True, permute_rows=32, rotation="hadamard", rank=2,
        lowrank_init="alternating", lowrank_iters=3, codebook_scope="model", kmeans_iters=10,
        magnitude_dtype="float16")),
}
AE = CompressionConfig(quantizer="autoencoder", bits=3, vq_dim=2, permute=True, rank=2,
                       autoencoder={"patch": 16, "n_stages": 1, "latent_channels": 4, "encoder_width": 8,
                                    "encoder_blocks": 0, "decoder_width": 8, "kernels": [3], "share": "type"})


def autoencoder_model():
    model = ALL["llama"](0)
    groups = {}
    for name, mod, c in select_layers(model, AE):
        groups.setdefault(codec.group_key(c, name, "model.layers"), []).append(
            codec.prepare_matrix(linear_weight(mod), c, name))
    spec, keys = codec.ae_spec(AE), sorted(groups)
    data = codec.GroupData([groups[k] for k in keys], spec)
    stack = codec.AEStack(spec, 3, 2, len(keys), list(range(len(keys))))
    codec.train_stacks([(stack, data)], codec.TrainSchedule(epochs=2, batch_size=4, kmeans_iters=3))
    for g, k in enumerate(keys):
        res = codec.export_group(stack, data, g)
        for pm in groups[k]:
            mod = model.get_submodule(pm.name)
            _set_module(model, pm.name, ReALLMLinear(codec.build_container(pm, AE, res), mod.bias))
    return model


def main(out: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    models = {}
    for name, (arch, cfg) in CONFIGS.items():
        model = ALL[arch](0)
        compress_(model, cfg, progress=False)
        models[name] = model
    models["autoencoder"] = autoencoder_model()
    for name, model in models.items():
        with torch.no_grad():
            for _, layer in iter_reallm_layers(model):
                if layer.rank:
                    layer.lora_B.add_(0.01)  # adapters away from their initial values
        save_compressed(model, out / name)
        back = load_compressed(out / name)
        with torch.no_grad():
            logits = back(sample_ids()).logits
        save_file({"logits": logits.contiguous()}, str(out / f"{name}.expected_logits.safetensors"))
        print(name, "saved")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
