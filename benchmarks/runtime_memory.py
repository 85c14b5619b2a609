"""Memory and step time of a compressed decoder block while its adapters train: resident vs cache vs dense.

    python benchmarks/runtime_memory.py [--out runs/bench-runtime] [--threads 2] [--scale 1]

A Llama-2-7B-shaped decoder block (one layer: hidden 4096, FFN 11008, 32 heads, vocabulary 512; random
weights, seeded) is compressed once with each preset and saved (kept in --out for later runs). Then each
configuration runs in a fresh process: load, then two optimiser steps of the adapters (AdamW) on one
sequence of --tokens tokens. Reported per configuration: the stored bytes of the block's linears
(accounted bits / 8), process RSS after load and after the two steps and the peak RSS (all minus the RSS
of the process before loading), the bytes of every tensor the model holds after the steps, and the time
of the second step. Beside them: the same block dense in fp32 and bf16 with LoRA (peft, rank 64, every
linear), and the projection to the whole Llama-2-7B (32 such blocks + fp16 embedding and head of a
32000-token vocabulary). On a GPU (--device cuda) the memory columns are torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # name -> CompressionConfig kwargs (or a method preset file)
    "nf3 + r64": dict(quantizer="nf", bits=3, rank=64, lowrank_init="svd", lowrank_dtype="float16", dora=True),
    "vq-2bit-ft": "configs/methods/vq-2bit-ft.yaml",
}
MiB = 1 << 20


def block_config(scale: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=4096 // scale, intermediate_size=11008 // scale,
                       num_hidden_layers=1, num_attention_heads=32 // min(scale, 32),
                       num_key_value_heads=32 // min(scale, 32), max_position_embeddings=4096,
                       tie_word_embeddings=False)


def preset_config(spec):
    import yaml

    from reallm import CompressionConfig

    if isinstance(spec, dict):
        return CompressionConfig(**spec)
    data = yaml.safe_load((ROOT / spec).read_text())
    return CompressionConfig(**data["model"]["init_args"]["compression"])


def prepare(out: Path, scale: int) -> dict:
    """The base block (fp32, on disk) and one compressed checkpoint per preset; reused when present."""
    from transformers import LlamaForCausalLM

    from reallm import bits_report, compress_, save_compressed
    from reallm.checkpoint.directory import read_meta

    base = out / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(block_config(scale)).save_pretrained(base)
    info = {}
    for name in PRESETS:
        ck = out / name.replace(" ", "").replace("+", "-")
        try:
            meta = read_meta(ck)
            info[name] = meta["extra"]["bench"]
            continue
        except Exception:  # noqa: BLE001 - absent or stale: compress again
            pass
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        t = time.time()
        compress_(model, preset_config(PRESETS[name]), progress=True)
        rep = bits_report(model)
        bench = {"compress_s": round(time.time() - t, 1), "bits": rep["decoder_linears"],
                 "stored_bytes": rep["totals"]["decoder_linear_bits"] / 8,
                 "weights": rep["totals"]["decoder_linear_weights"]}
        save_compressed(model, ck, extra={"bench": bench})
        info[name] = bench
    return info


# ---------------------------------------------------------------------------------------------
# one configuration, in a child process
# ---------------------------------------------------------------------------------------------
def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: "5" to /proc/self/clear_refs), so that the peak
    measured later is the configuration's, not the imports' (which can exceed a small block's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS since the last reset_peak_rss(): VmHWM of /proc/self/status (ru_maxrss never resets)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> int:
    """Bytes of every tensor reachable from `model` (parameters, gradients, buffers, caches) and of the
    optimiser state of its parameters."""
    from reallm.layer.linear import ReALLMLinear

    seen = {}
    mine = {id(p) for p in model.parameters()}
    if opt is not None:
        for p, state in opt.state.items():
            if id(p) in mine:
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    for m in model.modules():
        ts = [*m._parameters.values(), *m._buffers.values()]
        ts += [p.grad for p in m._parameters.values() if p is not None and p.grad is not None]
        if isinstance(m, ReALLMLinear):
            ts += [m._cache] + ([m._norm_cache[1]] if m._norm_cache else [])
        for t in ts:
            if t is not None:
                seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    # everything a configuration imports is imported before the baseline RSS is taken
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from reallm import load_compressed
    from reallm.model.surgery import mark_only_adapters_trainable

    ids = torch.randint(0, 512, (1, spec["tokens"]), generator=torch.Generator().manual_seed(0)).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    peak_valid = cuda or reset_peak_rss()
    r0 = rss()
    if spec["kind"] == "compressed":
        model = load_compressed(spec["path"], mode=spec["mode"], device=device)
        mark_only_adapters_trainable(model)
    else:  # dense block + LoRA (peft) in fp32 / bf16
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(spec["path"], dtype=getattr(torch, spec["dtype"])).to(device)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, target_modules="all-linear"))
    model.train()
    mem_load = (torch.cuda.memory_allocated(device) - base_mem) if cuda else rss() - r0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    if cuda:
        mem_after = torch.cuda.memory_allocated(device) - base_mem
        peak = torch.cuda.max_memory_allocated(device) - base_mem
    else:
        mem_after, peak = rss() - r0, (peak_rss() - r0) if peak_valid else None
    from reallm.core.hf_models import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    return {"load": mem_load, "after": mem_after, "peak": peak, "held": held_bytes(model, opt),
            "held_blocks": sum(held_bytes(b, opt) for b in blocks), "step_s": times[-1], "first_step_s": times[0]}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"child failed: {spec}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-runtime", help="base block and checkpoints (reused)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--scale", type=int, default=1, help="divide the block's sizes by this (a quick check)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = prepare(out, args.scale)
    cfg = block_config(args.scale)
    h, f = cfg.hidden_size, cfg.intermediate_size
    block_weights = 4 * h * h + 3 * h * f
    fp16_block = 2 * block_weights
    common = {"threads": args.threads, "tokens": args.tokens, "device": args.device}
    rows = []
    for dtype in ("float32", "bfloat16"):
        r = run_child({**common, "kind": "dense", "path": str(out / "base"), "dtype": dtype})
        rows.append((f"dense {dtype.replace('float32', 'fp32').replace('bfloat16', 'bf16')} + LoRA r64 (peft)",
                     None, block_weights * (4 if dtype == "float32" else 2), r))
    for name, bench in info.items():
        ck = out / name.replace(" ", "").replace("+", "-")
        for mode in ("resident", "cache"):
            r = run_child({**common, "kind": "compressed", "path": str(ck), "mode": mode})
            rows.append((f"{name} ({bench['bits']:.2f} bits), {mode}", mode, bench["stored_bytes"], r))
    load = os.getloadavg()
    print(f"\n{block_weights / 1e6:.1f} M weights per block (dense fp16 {fp16_block / MiB:.0f} MiB); device "
          f"{args.device}; {args.threads} threads; {args.tokens} tokens per step; torch {torch.__version__}; "
          f"load average {load[0]:.2f} at the end")
    print("\n| configuration | stored (MiB) | after load (MiB, × fp16) | after 2 steps (MiB, × fp16) | "
          "peak (MiB, × fp16) | tensors held (MiB) | step time (s) |")
    print("| --- | --: | --: | --: | --: | --: | --: |")
    cache_time = {}
    for label, mode, _stored, r in rows:
        if mode == "cache":
            cache_time[label.split(",")[0]] = r["step_s"]
    for label, mode, stored, r in rows:
        x = lambda v: "-" if v is None else f"{v / MiB:.0f} ({v / fp16_block:.2f}×)"  # noqa: E731
        step = f"{r['step_s']:.2f}"
        if mode == "resident":
            step += f" ({r['step_s'] / cache_time[label.split(',')[0]]:.2f}× cache)"
        print(f"| {label} | {stored / MiB:.0f} | {x(r['load'])} | {x(r['after'])} | {x(r['peak'])} | "
              f"{r['held'] / MiB:.0f} | {step} |")
    # projection: 32 blocks + fp16 embedding and head (32000 × 4096 each) + final norm
    n_blocks, vocab = 32, 32000
    other = 2 * vocab * 4096 * 2 + 4096 * 2
    print(f"\nProjection to Llama-2-7B: {n_blocks} × (the block's tensors after two steps: weights, adapters, "
          f"gradients, optimiser state, caches) + {other / 2**30:.2f} GiB (fp16 embedding and head); activations "
          f"not included")
    print("| configuration | per block (MiB) | Llama-2-7B (GiB) |")
    print("| --- | --: | --: |")
    for label, _mode, _stored, r in rows:
        print(f"| {label} | {r['held_blocks'] / MiB:.0f} | {(r['held_blocks'] * n_blocks + other) / 2**30:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
