"""Benchmark of the core quantization primitives against their references, side by side in one run.

    python benchmarks/bench_core.py [--size 4096] [--iters 10] [--perm-cols 1024] [--threads N] [--repeats 3]

Prints a markdown report: the machine, then on one size x size Gaussian matrix (seed 0)

- k-means VQ, b = 2 bits per weight: d = 4 (K = 256) and d = 2 (K = 16), horizontal d-vectors.
  ``reallm.ops.kmeans.kmeans`` against ``scipy.cluster.vq.kmeans2`` at the same iteration count
  (tolerance disabled on our side; scipy has none). Two comparisons:
    * Lloyd only, both started from the *same* k-means++ codebook (``minit='matrix'`` for scipy);
    * end to end with each side's own k-means++ (scipy's ``minit='++'`` recomputes the distances to
      all previous centres at every step, O(N K^2 d) time and a (K, N) float64 matrix: it is only run
      where that fits, i.e. not for K = 256 on 4096^2 weights, where it would need 8.6 GB).
  MSE is the mean squared error per weight of the quantized matrix (codes from the exact
  ``reallm.ops.kmeans.assign`` for both codebooks).
- Column permutation (paper Algorithm 1, 128-row blocks): the vectorised version against the Python
  loop reference on a size x perm-cols slice (time, speed ratio, identical result), then the
  vectorised version alone on all columns.

The script sets OMP_WAIT_POLICY=PASSIVE unless it is already set (see below) and prints it.
Timings and quality goals live here, never in unit tests (docs/protocol.md "Benchmarks").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# Must precede the first torch import (the OpenMP runtime reads it once). With the default active
# spin-wait, torch's OpenMP threads stall at every parallel region when the cores are oversubscribed
# (measured on a shared 2-core VM at load ~8: 22.6 s per Lloyd iteration instead of 2.3 s); scipy is
# single-threaded and unaffected. Set OMP_WAIT_POLICY=ACTIVE explicitly to measure the other way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402
from scipy.cluster.vq import kmeans2  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from reallm.ops.kmeans import assign, kmeans, kmeanspp_init  # noqa: E402
from reallm.ops.permutation import (  # noqa: E402
    greedy_column_permutation,
    greedy_column_permutation_reference,
)

# scipy's '++' keeps a (K, N) float64 distance matrix; skip it above this many bytes.
SCIPY_PP_MAX_BYTES = 2 << 30


REPEATS = 1  # set from --repeats


def _timed(fn):
    """(result of the last run, minimum wall time over REPEATS runs): the least disturbed run on a
    shared machine."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _mse(x: torch.Tensor, codebook: torch.Tensor) -> float:
    codes = assign(x, codebook)
    return float((x - codebook[codes]).pow(2).mean())  # per weight (per coordinate)


def machine_report(args) -> None:
    print("## Machine\n")
    print(f"- command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`")
    print(f"- platform: {platform.platform()}, python {platform.python_version()}")
    print(f"- CPU count: {os.cpu_count()}, torch.get_num_threads(): {torch.get_num_threads()}")
    env = {v: os.environ.get(v, "unset") for v in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    print(f"- environment: {', '.join(f'{k}={v}' for k, v in env.items())}")
    print(f"- torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}")
    print(f"- load average at start (1, 5, 15 min): {tuple(round(v, 2) for v in os.getloadavg())}")
    print(f"- matrix: {args.size} x {args.size} standard Gaussian (torch seed 0), fp32")
    print(f"- times: minimum over {args.repeats} runs (the reference permutation loop: 1 run)\n")


def bench_kmeans(W: torch.Tensor, iters: int) -> None:
    print(f"## k-means VQ, b = 2, {iters} Lloyd iterations\n")
    print("| config | method | init | time (s) | MSE per weight | speed-up vs scipy |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for d, k in [(4, 256), (2, 16)]:
        x = W.reshape(-1, d).contiguous()  # (N, d) horizontal d-vectors
        n = x.shape[0]
        label = f"d={d}, K={k}, N={n}"
        # 1) ours end to end: k-means++ + Lloyd
        res, t_ours = _timed(lambda x=x, k=k: kmeans(x, k, iters=iters, tol=0, seed=0))
        mse_ours = _mse(x, res.codebook)
        # 2) same k-means++ codebook for both Lloyd-only runs (drawn as kmeans() draws its own)
        gen = torch.Generator().manual_seed(1)
        m = min(n, max(1 << 16, 256 * k))
        init = kmeanspp_init(x[torch.randperm(n, generator=gen)[:m]], k, gen)
        res_l, t_ours_l = _timed(lambda x=x, k=k, init=init: kmeans(x, k, iters=iters, tol=0, init_codebook=init))
        mse_ours_l = _mse(x, res_l.codebook)
        xn = x.numpy()
        (cb_s, _), t_scipy_l = _timed(
            lambda xn=xn, init=init: kmeans2(xn, init.numpy().copy(), iter=iters, minit="matrix")
        )
        mse_scipy_l = _mse(x, torch.from_numpy(np.ascontiguousarray(cb_s, dtype=np.float32)))
        print(f"| {label} | scipy kmeans2 | same k-means++ codebook | {t_scipy_l:.2f} | {mse_scipy_l:.5f} | 1.00 |")
        print(
            f"| {label} | reallm kmeans | same k-means++ codebook | {t_ours_l:.2f} | {mse_ours_l:.5f} "
            f"| **{t_scipy_l / t_ours_l:.2f}x** |"
        )
        if k * n * 8 <= SCIPY_PP_MAX_BYTES:
            (cb_pp, _), t_scipy = _timed(lambda xn=xn, k=k: kmeans2(xn, k, iter=iters, minit="++", seed=0))
            mse_scipy = _mse(x, torch.from_numpy(np.ascontiguousarray(cb_pp, dtype=np.float32)))
            print(f"| {label} | scipy kmeans2 | own '++' | {t_scipy:.2f} | {mse_scipy:.5f} | 1.00 |")
            print(
                f"| {label} | reallm kmeans | own k-means++ | {t_ours:.2f} | {mse_ours:.5f} "
                f"| **{t_scipy / t_ours:.2f}x** |"
            )
        else:
            need = k * n * 8 / 2**30
            print(f"| {label} | scipy kmeans2 | own '++' | n/a | n/a | not run: needs a {need:.1f} GB (K, N) matrix |")
            print(f"| {label} | reallm kmeans | own k-means++ | {t_ours:.2f} | {mse_ours:.5f} | |")
    print()


def bench_permutation(W: torch.Tensor, cols: int) -> None:
    print("## Column permutation (128-row blocks)\n")
    print("| input | method | time (s) | speed-up | identical to reference |")
    print("| --- | --- | ---: | ---: | --- |")
    sl = W[:, :cols].contiguous()
    ours, t_ours = _timed(lambda: greedy_column_permutation(sl, 128))
    t0 = time.perf_counter()
    ref = greedy_column_permutation_reference(sl, 128)
    t_ref = time.perf_counter() - t0
    same = "yes" if torch.equal(ours, ref) else f"no ({int((ours != ref).any(dim=1).sum())} blocks differ)"
    shape = f"{sl.shape[0]} x {cols}"
    print(f"| {shape} | reference (Python loop, numpy) | {t_ref:.2f} | 1.00 | |")
    print(f"| {shape} | vectorised | {t_ours:.3f} | **{t_ref / t_ours:.1f}x** | {same} |")
    full, t_full = _timed(lambda: greedy_column_permutation(W, 128))
    print(f"| {W.shape[0]} x {W.shape[1]} | vectorised | {t_full:.2f} | | (reference not run) |")
    print()


def bench_full_compression(W: torch.Tensor) -> None:
    """The whole data-free compression of one matrix (method.md §1–3): alternating low-rank r = 64
    (LQ-LoRA, randomised SVD, best iterate kept) + greedy column permutation + double-quantized
    absmax scales + k-means VQ (b = 2, d = 4), through reallm.compress_weight."""
    from reallm import CompressionConfig, compress_weight

    rows = [
        ("vq b=2 d=4 + perm + alternating r=64 (≤5 it.)",
         CompressionConfig(quantizer="vq", bits=2, permute=True, rank=64, lowrank_init="alternating",
                           lowrank_iters=5, options={"dim": 4, "kmeans_iters": 25})),
        ("vq b=3 d=2 + perm + svd r=64",
         CompressionConfig(quantizer="vq", bits=3, permute=True, rank=64, options={"dim": 2, "kmeans_iters": 25})),
    ]
    print(f"### Full data-free compression of the {W.shape[0]}×{W.shape[1]} matrix\n")
    print("| config | time (s) | accounted bits/weight | rel. Frobenius error |")
    print("|---|--:|--:|--:|")
    for label, cfg in rows:
        t = time.perf_counter()
        w = compress_weight(W, cfg, name="bench")
        dt = time.perf_counter() - t
        err = float((w.dequantize() - W).norm() / W.norm())
        print(f"| {label} | {dt:.1f} | {w.bits()['per_weight']:.3f} | {err:.4f} |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="side of the square Gaussian matrix")
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations (both implementations)")
    parser.add_argument("--perm-cols", type=int, default=1024, help="columns of the slice for the reference")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (minimum is reported)")
    parser.add_argument("--skip", choices=["kmeans", "permutation", "full"], action="append", default=[])
    args = parser.parse_args()
    global REPEATS
    REPEATS = max(1, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine_report(args)
    W = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    if "kmeans" not in args.skip:
        bench_kmeans(W, args.iters)
    if "permutation" not in args.skip:
        bench_permutation(W, min(args.perm_cols, args.size))
    if "full" not in args.skip:
        bench_full_compression(W)
    print(f"load average at end: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
