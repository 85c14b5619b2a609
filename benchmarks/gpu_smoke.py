"""CUDA paths and 7B-shaped timings (run on a GPU machine; prints a markdown table).

    python benchmarks/gpu_smoke.py [--device cuda]

1. data-free compression of 7B-shaped matrices on the GPU (4096×4096 and 11008×4096 and
   4096×11008): time, peak GPU memory, relative error, accounted bits;
2. a ReALLMLinear (DoRA over the frozen part) forward + backward under bf16 autocast at
   4096×11008: only A, B, m get gradients; time per step; the frozen part decoded once (cached);
3. CPU vs GPU agreement: the same matrix compressed on both devices decodes to the same weights
   within fp32 noise.
"""

from __future__ import annotations

import argparse
import time

import torch

from reallm import CompressionConfig, ReALLMLinear, compress_weight


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this (a quick CPU check)")
    args = ap.parse_args()
    k = args.scale
    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    g = torch.Generator(device="cpu").manual_seed(0)
    configs = {
        "vq-2bit d4 + perm + alternating r64 (5 it)": CompressionConfig(
            quantizer="vq", bits=2, permute=True, rank=64, lowrank_init="alternating",
            lowrank_iters=5, options={"dim": 4, "kmeans_iters": 25}),
        "vq-3bit d2 + perm": CompressionConfig(quantizer="vq", bits=3, permute=True,
                                                 options={"dim": 2, "kmeans_iters": 25}),
        "nf3 + svd r64": CompressionConfig(quantizer="nf", bits=3, rank=64),
        "quip-like (hadamard, b2 d8, 10 it)": CompressionConfig(
            quantizer="vq", bits=2, rotation="hadamard",
            options={"dim": 8, "kmeans_iters": 10, "kmeans_max_points": 1 << 19}),
    }
    print("\n| matrix | config | time (s) | peak GPU mem (GiB) | rel. error | bits/weight |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in [(4096 // k, 4096 // k), (11008 // k, 4096 // k), (4096 // k, 11008 // k)]:
        W = (torch.randn(*shape, generator=g) * 0.02).to(dev)
        for label, cfg in configs.items():
            if shape[0] != shape[1] and "alternating" in label:
                continue
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            w, t = timed(lambda: compress_weight(W, cfg, name="m"), dev)  # noqa: B023
            err = float((w.dequantize() - W).norm() / W.norm())
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else float("nan")
            print(f"| {shape[0]}×{shape[1]} | {label} | {t:.2f} | {mem:.2f} | {err:.4f} | "
                  f"{w.bits()['per_weight']:.3f} |", flush=True)
    # DoRA layer training step at 4096 × 11008 (down_proj shape: out 4096, in 11008)
    W = (torch.randn(4096 // k, 11008 // k, generator=g) * 0.02).to(dev)
    weight = compress_weight(W, CompressionConfig(quantizer="nf", bits=3, rank=64), name="down_proj")
    layer = ReALLMLinear(weight.to(dev)).to(dev)
    x = torch.randn(8, 2048 // k, 11008 // k, device=dev)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    times = []
    for _ in range(6):
        def step():
            opt.zero_grad()
            with torch.autocast(device_type="cuda" if dev.startswith("cuda") else "cpu", dtype=torch.bfloat16):
                loss = layer(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            return loss
        _, t = timed(step, dev)
        times.append(t)
    grads = {n for n, p in layer.named_parameters() if p.grad is not None}
    shape = f"{4096 // k}×{11008 // k}, x (8, {2048 // k}, {11008 // k})"
    print(f"\nDoRA ReALLMLinear {shape}, bf16 autocast: {1e3 * min(times[1:]):.1f} ms/step "
          f"(first step incl. decode {1e3 * times[0]:.1f} ms); grads: {sorted(grads)}; "
          f"frozen buffers require grad: {any(b.requires_grad for b in layer.buffers())}")
    # CPU vs device agreement
    W = torch.randn(512, 768, generator=g) * 0.02
    cfg = CompressionConfig(quantizer="vq", bits=2, permute=True, rank=8, options={"dim": 4, "kmeans_iters": 20})
    a = compress_weight(W, cfg).dequantize()
    b = compress_weight(W.to(dev), cfg).dequantize().cpu()
    print(f"CPU vs {dev}: rel. error CPU {float((a - W).norm() / W.norm()):.4f}, {dev} "
          f"{float((b - W).norm() / W.norm()):.4f}, max |diff| of reconstructions {float((a - b).abs().max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
