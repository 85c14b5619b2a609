"""Phase 2, block-wise distillation: block capture, teacher loading, per-block training, resume."""

from __future__ import annotations

import json

import pytest
import torch
from phase_helpers import (  # noqa: F401 (_one_thread is an autouse fixture)
    _one_thread,
    adapters_of,
    frozen_state,
    make_phase1,
    text_datamodule,
    tiny_llama_512,
    trainer,
)
from safetensors.torch import load_file

from reallm.checkpoint.compressed import frozen_digests, load_compressed
from reallm.checkpoint.directory import read_meta
from reallm.core.hf_models import find_decoder_blocks
from reallm.layer.bits import bits_report
from reallm.layer.linear import iter_reallm_layers
from reallm.phases import BlockwisePhase, UserError
from reallm.phases.block_io import (
    ActivationCache,
    call_block,
    capture_block_inputs,
    load_teacher_block,
)


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    return make_phase1(tmp_path_factory.mktemp("bw"))


def blockwise(p, run_dir, **kwargs) -> BlockwisePhase:
    defaults = dict(lr=3e-3, effective_batch=8, epochs_per_block=2)
    return BlockwisePhase(checkpoint=str(p.checkpoint), run_dir=str(run_dir), **{**defaults, **kwargs})


def run_blockwise(p, run_dir, callbacks=(), **kwargs) -> BlockwisePhase:
    module = blockwise(p, run_dir, **kwargs)
    trainer(run_dir, max_epochs=-1, limit_val_batches=0, callbacks=list(callbacks)).fit(
        module, datamodule=text_datamodule(p))
    return module


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_teacher_blocks_equal_original_block_outputs(tmp_path, attn):
    """Teacher blocks read from safetensors, fed the captured block-0 inputs with the captured
    kwargs, reproduce the original model's block outputs exactly."""
    model = tiny_llama_512(layers=3, attn=attn)
    model.save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 512, (5, 24), generator=torch.Generator().manual_seed(0))
    outputs: list[torch.Tensor] = []
    prefix, blocks = find_decoder_blocks(model)
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    # batches of different sizes: the captured kwargs (from one sequence) broadcast
    cache = ActivationCache(5, 24, 64)
    _, call = capture_block_inputs(model, blocks[0], [ids[:3], ids[3:]], cache)
    x = cache.read(slice(0, 5))
    for j in range(3):
        teacher = load_teacher_block(str(tmp_path / "base"), j, model.config, prefix, like=blocks[j])
        assert not any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            x = call_block(teacher, x, call)
        torch.testing.assert_close(x, outputs[j], rtol=0, atol=0)


def test_teacher_loading_reads_one_block(tmp_path):
    model = tiny_llama_512(layers=2)
    model.save_pretrained(tmp_path / "base")
    prefix, blocks = find_decoder_blocks(model)
    teacher = load_teacher_block(str(tmp_path / "base"), 1, model.config, prefix, like=blocks[1])
    for k, v in blocks[1].state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    with pytest.raises(UserError, match="no tensors for block 7"):
        load_teacher_block(str(tmp_path / "base"), 7, model.config, prefix, like=blocks[1])


class _ConfigOnlyBlock(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.width = config.hidden_size


class _PositionalIndexBlock(torch.nn.Module):
    def __init__(self, config, layer_number):
        super().__init__()
        self.layer_number = layer_number


class _KeywordIndexBlock(torch.nn.Module):
    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.layer_idx = layer_idx


class _BrokenBlock(torch.nn.Module):
    def __init__(self, config, layer_idx=None):
        super().__init__()
        torch.nn.Linear(config.hidden_size)  # a real bug inside the constructor: a missing argument


def test_build_block_picks_the_constructor_call_and_surfaces_constructor_errors():
    """The call is chosen from the constructor's signature; a TypeError raised inside the
    constructor is the block's own error, not "unsupported" (defect 11.10)."""
    from transformers import LlamaConfig

    from reallm.phases.block_io import build_block

    config = LlamaConfig(hidden_size=64)
    assert build_block(_KeywordIndexBlock(config), config, 3).layer_idx == 3
    assert build_block(_PositionalIndexBlock(config, 0), config, 4).layer_number == 4
    assert build_block(_ConfigOnlyBlock(config), config, 5).width == 64
    like = _KeywordIndexBlock(config)
    like.__class__ = _BrokenBlock  # an instance of the broken class, without running its constructor
    with pytest.raises(TypeError, match="in_features|out_features|argument"):
        build_block(like, config, 0)


def test_activation_cache_disk_roundtrip(tmp_path):
    cache = ActivationCache(3, 4, 8, torch.bfloat16, tmp_path / "c.bin")
    x = torch.randn(3, 4, 8)
    cache.write(0, x[:2])
    cache.write_rows(slice(2, 3), x[2:])
    torch.testing.assert_close(cache.read(slice(0, 3)), x.bfloat16().float(), rtol=0, atol=0)
    assert (tmp_path / "c.bin").stat().st_size == 3 * 4 * 8 * 2
    cache.close()
    assert not (tmp_path / "c.bin").exists()


def test_activation_cache_defaults_to_bf16_and_is_refused_when_the_host_cannot_hold_it(phase1, tmp_path,
                                                                                       monkeypatch):
    """The cache is estimated before the phase starts (N × L × H × bytes × 2) and a cache larger than
    the available memory (or the free disk of `cache: disk`) is one clear error (defect 11.5)."""
    import reallm.phases.block_io as blocks_mod

    # the 7B figure (1024 × 4096 × 4096 in fp32, inputs and targets), and what is really allocated
    assert blocks_mod.activation_cache_bytes(1024, 4096, 4096, torch.float32) == 137_438_953_472
    assert blocks_mod.activation_cache_bytes(3, 5, 8, torch.bfloat16) == 2 * ActivationCache(3, 5, 8,
                                                                                         torch.bfloat16).data.nbytes
    assert blockwise(phase1, tmp_path / "x").cache_dtype == torch.bfloat16  # the default

    need = blocks_mod.activation_cache_bytes(32, 32, 64, torch.bfloat16)  # text_datamodule: 32 windows of 32
    monkeypatch.setattr(blocks_mod, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(UserError) as e:
        run_blockwise(phase1, tmp_path / "mem")
    msg = str(e.value)
    assert "\n" not in msg and "needs 0.3 MB" in msg and "32 sequences × 32 tokens × 64 hidden × 2 bytes" in msg
    assert "cache disk" in msg and "cache_dtype" in msg and "train_sequences" in msg
    assert not (tmp_path / "mem" / "blocks").exists()  # refused before any block was tuned

    monkeypatch.setattr(blocks_mod, "free_disk_bytes", lambda d: need // 2)
    with pytest.raises(UserError, match=r"needs 0\.3 MB .* 0\.1 MB free: use --model.init_args.activation_dir"):
        run_blockwise(phase1, tmp_path / "disk", cache="disk")


# ---------------------------------------------------------------------------------------------
# the phase
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(phase1, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bw-full")
    module = run_blockwise(phase1, run_dir)
    return run_dir, module


def test_every_block_loss_decreases(uninterrupted):
    run_dir, _ = uninterrupted
    res = json.loads((run_dir / "results.json").read_text())
    assert res["phase"] == "blockwise" and res["complete"]
    assert [b["block"] for b in res["blocks"]] == [0, 1]
    for b in res["blocks"]:
        assert b["loss_after"] < 0.95 * b["loss_before"], b
        assert b["epochs"] == 2 and b["steps"] == 2 * 4  # 32 sequences / effective batch 8, per epoch
    assert res["calibration"] == {"sequences": 32, "seq_len": 32}
    assert res["bits"]["decoder_linears"] > 2


def test_frozen_part_bit_identical_and_checked(phase1, uninterrupted):
    run_dir, module = uninterrupted
    before = frozen_state(load_compressed(phase1.checkpoint))
    after = frozen_state(module.model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k].cpu()), k
    # the new checkpoint is complete on its own, its frozen part checked equal to phase 1's when it was
    # written, and only its adapters changed
    meta = read_meta(run_dir / "reallm")
    assert meta["extra"]["frozen_from"]["checkpoint"] == str(phase1.checkpoint.absolute())
    assert frozen_digests(run_dir / "reallm") == frozen_digests(phase1.checkpoint)
    old, new = adapters_of(phase1.checkpoint), adapters_of(run_dir / "reallm")
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    reloaded = frozen_state(load_compressed(run_dir / "reallm"))
    for k in before:
        assert torch.equal(before[k], reloaded[k]), k


class _Interrupt(Exception):
    pass


class _KillDuringBlock:
    """A callback that raises in the middle of block `block` (as a killed process would stop)."""

    def __new__(cls, block: int, step: int):
        import lightning as L

        class Kill(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if module._current == block and batch_idx == step and module._epochs_done == 1:
                    raise _Interrupt

        return Kill()


def test_resume_after_interruption_matches_uninterrupted(phase1, uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    run_dir = tmp_path / "bw"
    with pytest.raises(_Interrupt):
        run_blockwise(phase1, run_dir, callbacks=[_KillDuringBlock(block=1, step=2)])
    assert (run_dir / "blocks" / "0000.json").is_file() and not (run_dir / "blocks" / "0001.json").exists()
    assert not (run_dir / "results.json").exists()

    module = run_blockwise(phase1, run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["resumed_from_block"] == 1 and res["complete"]
    for j in (0, 1):
        a = load_file(full_dir / "blocks" / f"{j:04d}.safetensors")
        b = load_file(run_dir / "blocks" / f"{j:04d}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (j, k)
    a, b = adapters_of(full_dir / "reallm"), adapters_of(run_dir / "reallm")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert module._start == 1


def test_resume_refuses_other_settings(phase1, uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    run_dir = tmp_path / "bw"
    (run_dir / "blocks").mkdir(parents=True)
    for f in (full_dir / "blocks").iterdir():
        (run_dir / "blocks" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="other settings.*lr"):
        run_blockwise(phase1, run_dir, lr=1e-2)


def test_original_stream_relative_loss_disk_cache(phase1, tmp_path):
    run_dir = tmp_path / "bw"
    run_blockwise(phase1, run_dir, student_inputs="original", loss="relative_mse", cache="disk",
                  cache_dtype="bfloat16", epochs_per_block=2, effective_batch=12)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["student_inputs"] == "original" and res["loss"] == "relative_mse"
    for b in res["blocks"]:
        assert b["loss_after"] < b["loss_before"]
        assert b["loss_before"] == pytest.approx(b["relative_mse_before"])
        assert b["steps"] == 2 * 3  # 8 micro-batches of 4 in groups of 3, 3 and 2, per epoch
    assert not list((run_dir / "cache").glob("*.bin"))  # the disk cache is removed at the end


def test_bad_arguments_are_user_errors(phase1, tmp_path):
    with pytest.raises(UserError, match="needs --model.init_args.checkpoint"):
        BlockwisePhase(run_dir=str(tmp_path))
    with pytest.raises(UserError, match="loss must be"):
        blockwise(phase1, tmp_path, loss="l1")
    with pytest.raises(UserError, match="student_inputs"):
        blockwise(phase1, tmp_path, student_inputs="teacher")


def test_train_stored_scales_change_only_the_scales_and_keep_the_bits(phase1, uninterrupted, tmp_path):
    """train_stored: ["scales"] tunes each block's block-scale maxima beside its adapters; the codes, the
    model-wide codebook (shared by every block: frozen in phase 2) and the accounted bits stay the same."""
    _, plain = uninterrupted
    run_dir = tmp_path / "bw-stored"
    module = run_blockwise(phase1, run_dir, train_stored=["scales"])
    res = json.loads((run_dir / "results.json").read_text())
    assert res["complete"] and all(b["loss_after"] < b["loss_before"] for b in res["blocks"])
    before, after = load_compressed(phase1.checkpoint), load_compressed(run_dir / "reallm")
    assert bits_report(after)["decoder_linears"] == bits_report(before)["decoder_linears"]
    layers_before, layers_after = dict(iter_reallm_layers(before)), dict(iter_reallm_layers(after))
    changed = False
    for name, layer in layers_after.items():
        old, new = layers_before[name]._frozen_tensors(), layer._frozen_tensors()
        assert torch.equal(old["codes"], new["codes"]) and new["scale_group_max"].dtype == old["scale_group_max"].dtype
        changed |= not torch.equal(old["scale_group_max"], new["scale_group_max"])
        assert torch.equal(layers_before[name]._shared_tensors()["codebook"], layer._shared_tensors()["codebook"])
    assert changed
    assert not any(layer.stored_params for _, layer in iter_reallm_layers(module.model))  # written back
