"""Batch-1 generation speed (Hugging Face `generate`, greedy, KV cache) of compressed models, end to end:
every compressed linear with its DoRA part, dense against the compressed runtimes side by side.

    python benchmarks/generate_speed.py [--threads 2] [--tokens 64] [--block-dir runs/bench-runtime]

Rows, per model: the dense model (fp32), and the compressed one with the fused kernels ("fast": resident
form, small token counts through `reallm.layer.kernels`), without them ("plain resident": every token decodes
every matrix), and with the dense cache ("cache"). Models: stories260K compressed with VQ b3 d2 (one
codebook for the model) and NF3, and — when `benchmarks/runtime_memory.py` has written it — the
Llama-2-7B-shaped block (one layer: hidden 4096, FFN 11008; random weights) compressed with NF3 + rank 64.
The prompt is encoded once (prefill), then each timed token is one decode step; the rows of one model
run round-robin, so their ratios are measured under the same load (printed). Run alone on the machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads (tiny models)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reallm import CompressionConfig, compress_, load_compressed  # noqa: E402
from reallm.layer.linear import runtime_report, set_runtime_mode  # noqa: E402

SHARED = ROOT.parent / "shared"


def time_generation(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds per generated token after the prefill (greedy, KV cache), and the generated ids."""
    with torch.no_grad():
        # untimed: a mode switched just before builds its dense cache (or norm cache) on the first forward
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)  # prefill + 1 token
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)
        t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / new_tokens, out


def table(title: str, models: dict, ids: torch.Tensor, new_tokens: int, repeats: int) -> None:
    times = {name: [] for name in models}
    outputs, paths = {}, {}
    for model, prepare in models.values():  # warm-up (kernel compilation, first touch)
        prepare(model)
        time_generation(model, ids, 2)
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, (model, prepare) in models.items():
            prepare(model)
            t, out = time_generation(model, ids, new_tokens)
            times[name].append(t)
            outputs[name] = out
            paths[name] = ", ".join(runtime_report(model)["last_paths"]) if name != "dense fp32" else "dense"
    load_after = os.getloadavg()[0]
    ref = statistics.median(times["dense fp32"])
    print(f"\n{title} ({new_tokens} tokens after a {ids.shape[1]}-token prompt, median of {repeats}; "
          f"load average {load_before:.2f} → {load_after:.2f})\n")
    print("| model | ms per token | tokens/s | × dense fp32 | paths taken | same tokens as plain |")
    print("| --- | --: | --: | --: | --- | --- |")
    plain = next((k for k in outputs if k.endswith("plain resident")), None)
    for name in models:
        t = statistics.median(times[name])
        same = "-" if plain is None or name == "dense fp32" else str(torch.equal(outputs[name], outputs[plain]))
        print(f"| {name} | {1e3 * t:.2f} | {1 / t:.1f} | {ref / t:.2f} | {paths[name]} | {same} |")


def runtime(mode: str, fast: str):
    return lambda model: set_runtime_mode(model, mode, fast_path=fast)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per timed run (stories260K)")
    ap.add_argument("--block-tokens", type=int, default=8, help="generated tokens per timed run (7B block)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-dir", default="runs/bench-runtime", help="benchmarks/runtime_memory.py's --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = SHARED / "models" / "stories260K"
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Once upon a time, there was a little girl", return_tensors="pt").input_ids
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vq = CompressionConfig(quantizer="vq", bits=3, rank=1,
                           options={"dim": 2, "codebook_scope": "model", "kmeans_iters": 50})
    for label, cfg in (("VQ b3 d2", vq), ("NF3", CompressionConfig(quantizer="nf", bits=3, rank=1))):
        model = copy.deepcopy(dense)
        compress_(model, cfg, progress=False)
        model.eval()
        table(f"stories260K, {label} + rank 1 DoRA", {
            "dense fp32": (dense, lambda m: None),
            f"{label} fast": (model, runtime("resident", "auto")),
            f"{label} plain resident": (model, runtime("resident", "off")),
            f"{label} cache": (model, runtime("cache", "off")),
        }, ids, args.tokens, args.repeats)

    block = (ROOT / args.block_dir).resolve()
    ck = block / "nf3-r64"
    if (block / "base" / "config.json").is_file() and ck.is_dir():
        base = AutoModelForCausalLM.from_pretrained(block / "base", dtype=torch.float32).eval()
        comp = load_compressed(ck)
        bids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
        table("Llama-2-7B-shaped block (1 layer), NF3 + rank 64 DoRA", {
            "dense fp32": (base, lambda m: None),
            "NF3 fast": (comp, runtime("resident", "auto")),
            "NF3 plain resident": (comp, runtime("resident", "off")),
            "NF3 cache": (comp, runtime("cache", "off")),
        }, bids, args.block_tokens, args.repeats)
    else:
        print(f"\n(no 7B-shaped block in {block}: run benchmarks/runtime_memory.py first)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
