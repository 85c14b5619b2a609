"""Seconds and peak memory of GPTQ-style error feedback (`compression.error_feedback: gptq`) on 7B-shaped matrices.

    python benchmarks/gptq_scale.py --threads 2            # CPU
    python benchmarks/gptq_scale.py --device cuda          # GPU

For each shape (p, q) of a Llama-2-7B linear (q × q moments: 4096 for q/k/v/o and gate/up, 11008 for down) and
each table format (VQ b = 3, d = 2 and NF3), it compresses a random Gaussian matrix whose inputs have correlated
random second moments, once with plain (weighted) assignment and once with error feedback, and prints the
seconds of each, the relative output error of each, and the process's peak memory. The permutation is left off
(with it, every block of `permute_rows` rows has its own column order and its own factorisation: ⌈p / 128⌉ of
them). Timings are wall seconds of one call after an untimed warm-up on a small matrix.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reallm.ops.weighting import relative_output_error  # noqa: E402
from reallm.weight.config import CompressionConfig  # noqa: E402
from reallm.weight.pipeline import compress_weight  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (p, q): q_proj, up_proj, down_proj
FORMATS = {"vq b3 d2": dict(quantizer="vq", bits=3, options={"dim": 2, "kmeans_max_points": 1 << 18}),
           "nf3": dict(quantizer="nf", bits=3)}


def moments(q: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """E[x xᵀ] (q, q) of inputs x = z M diag(a), z Gaussian, M = I + a dense random mix: correlated, uneven."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix = torch.eye(q) + torch.randn(q, q, generator=g) / q ** 0.5
    amp = torch.rand(q, generator=g) * 2 + 0.1
    M = (mix * amp).to(device)
    return M.T @ M  # E[xᵀx] for z with identity covariance


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", nargs="*", default=None, help="p×q shapes (default: the three 7B shapes)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    print(f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    compress_weight(torch.randn(64, 64, device=device), CompressionConfig(quantizer="nf", error_feedback="gptq"),
                    moments=moments(64, device))  # warm-up
    print("| shape (p × q) | format | plain s | feedback s | rel. output error plain | with feedback | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p, q in shapes:
        W = torch.randn(p, q, device=device)
        H = moments(q, device)
        for label, kw in FORMATS.items():
            row = []
            for fb in ("none", "gptq"):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                w = compress_weight(W, CompressionConfig(**kw, error_feedback=fb), moments=H)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row.append((time.perf_counter() - t0, relative_output_error(W, w.dequantize(), H)))
                del w
            print(f"| {p} × {q} | {label} | {row[0][0]:.1f} | {row[1][0]:.1f} | {row[0][1]:.4f} | {row[1][1]:.4f} | "
                  f"{peak_mib(device):.0f} |", flush=True)


if __name__ == "__main__":
    main()
