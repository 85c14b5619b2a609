"""Batch-1 latency of the frozen part of a Llama-2-7B-shaped block: dense weights against the
compressed formats read by `reallm.layer.kernels` (plain decode-then-matmul and each fused path).

    python benchmarks/decode_speed.py            # 4096×4096 q/k/v/o, 11008×4096 gate/up, 4096×11008 down
    python benchmarks/decode_speed.py --small    # every dimension / 8, a quick check
    python benchmarks/decode_speed.py --device cuda --tokens 4

One "token" is x (tokens, in) through the seven matrices in turn, as a generation step would:
the dense fp32 block (808 MB) does not fit in the caches, so the dense rows read memory as they
would in a model. All rows are timed round-robin in one process (median over --repeats rounds),
so a ratio against dense fp32 is measured under the same load; the load average and the thread
count are printed beside the table. Timed tables are meant to be run alone on the machine.

Stored tensors: by default the exact stored format (dtypes, packed sizes, double-quantised
scales, codebook, optional permutation) filled with random codes — the kernels' speed depends on
sizes only, and the real encoder takes minutes per 11008 × 4096 matrix for VQ; `--encode` runs
the real encoder instead (`compress_weight`, few k-means iterations).

Bytes read per token: dense = 4 (fp32) or 2 (bf16) per weight; fused paths = what they read
(packed codes, uint8 scale codes, group maxima, table, permutation); decode = the stored bytes
plus the fp32 matrix it writes and the matmul reads back (8 per weight).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reallm import CompressionConfig, compress_weight  # noqa: E402
from reallm.layer.kernels import (
    available_paths,
    frozen_matmul,
    prepare,  # noqa: E402
)
from reallm.ops.packing import pack_bits, packed_nbytes  # noqa: E402
from reallm.ops.permutation import index_bits  # noqa: E402
from reallm.weight.decode import decode_frozen  # noqa: E402

BLOCK = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
         ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]
FORMATS = {
    "NF3": dict(quantizer="nf", bits=3),
    "VQ b3 d2": dict(quantizer="vq", bits=3, options={"dim": 2}),
    "VQ b2 d4": dict(quantizer="vq", bits=2, options={"dim": 4}),
}


def synthetic_frozen(p: int, q: int, cfg: CompressionConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The stored tensors of `encode_frozen` for a (p, q) matrix, with random codes."""
    n_blocks = -(-p * q // cfg.block_size)
    n_codes = n_blocks * cfg.block_size // (cfg.options.dim if cfg.quantizer == "vq" else 1)
    stored = {
        "codes": torch.randint(0, 256, (packed_nbytes(n_codes, cfg.code_width),), generator=gen, dtype=torch.uint8),
        "scale_codes": torch.randint(0, 256, (n_blocks,), generator=gen, dtype=torch.uint8),
        "scale_group_max": torch.rand(-(-n_blocks // cfg.scale_group), generator=gen) * 0.02,
        "scale_offset": torch.tensor(0.01),
    }
    if cfg.quantizer == "vq":
        stored["codebook"] = (torch.randn(1 << cfg.code_width, cfg.options.dim, generator=gen) * 0.5).to(torch.float16)
    if cfg.permute:
        n_rb = -(-p // cfg.permute_rows)
        perm = torch.stack([torch.randperm(q, generator=gen) for _ in range(n_rb)])
        stored["perm"] = pack_bits(perm.reshape(-1), index_bits(q))
    return stored


def stored_bytes(stored: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="every matrix dimension divided by 8")
    ap.add_argument("--threads", type=int, default=None, help="torch (and CPU path) threads; default: torch's")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per call")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--permute", action="store_true", help="stored with a column permutation per 128 rows")
    ap.add_argument("--encode", action="store_true", help="real encoder instead of random codes (slow)")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), help=f"subset of {list(FORMATS)}")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shapes = [(n, p // 8, q // 8) if args.small else (n, p, q) for n, p, q in BLOCK]
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"device {dev}; torch threads {torch.get_num_threads()}; tokens per call {args.tokens}")
    n_weights = sum(p * q for _, p, q in shapes)
    print(f"block: {len(shapes)} matrices, {n_weights / 1e6:.1f}M weights")

    # the rows to time: name -> (callable running the whole block once, bytes read per token)
    xs = {q: torch.randn(args.tokens, q, generator=gen).to(dev) for _, _, q in shapes}
    dense32 = [(torch.randn(p, q, generator=gen) * 0.02).to(dev) for _, p, q in shapes]
    rows: dict[str, tuple] = {}

    def dense_row(weights, dtype):
        xd = {q: x.to(dtype) for q, x in xs.items()}
        return lambda: [xd[W.shape[1]] @ W.T for W in weights]

    rows["dense fp32"] = (dense_row(dense32, torch.float32), 4 * n_weights)
    dense16 = [W.to(torch.bfloat16) for W in dense32]
    rows["dense bf16"] = (dense_row(dense16, torch.bfloat16), 2 * n_weights)
    for fmt in args.formats:
        cfg = CompressionConfig(**FORMATS[fmt], permute=args.permute)
        if cfg.quantizer == "vq":
            cfg = cfg.with_options(kmeans_iters=3, kmeans_max_points=1 << 16)
        mats = []
        t0 = time.perf_counter()
        for (name, p, q), W in zip(shapes, dense32):
            if args.encode:
                w = compress_weight(W, cfg, name=name)
                stored, shared = w.frozen, w.shared
            else:
                stored, shared = {k: v.to(dev) for k, v in synthetic_frozen(p, q, cfg, gen).items()}, {}
            mats.append((stored, shared, (p, q), prepare(stored, cfg, (p, q), shared)))
        print(f"{fmt}: stored tensors built in {time.perf_counter() - t0:.1f} s "
              f"({'real encoder' if args.encode else 'random codes'}), "
              f"{8 * sum(stored_bytes(m[0]) for m in mats) / n_weights:.3f} stored bits per weight")

        def decode_row(mats=mats, cfg=cfg):
            return lambda: [xs[q] @ decode_frozen(s, {}, cfg, (p, q), shared=sh).T.to(dev)
                            for s, sh, (p, q), _ in mats]

        decode_bytes = sum(stored_bytes(m[0]) for m in mats) + 8 * n_weights
        rows[f"{fmt} decode"] = (decode_row(), decode_bytes)
        # every fused path that serves at least one matrix of the block; a matrix it cannot
        # serve (e.g. --small's 1376-wide down_proj for cpu_avx512) takes the auto choice
        per_matrix = [available_paths(cfg, dev, torch.float32, args.tokens, (p, q)) for _, p, q in shapes]
        paths = [path for path in ("triton", "cpu_avx512", "cpu") if any(path in ps for ps in per_matrix)]
        for path in paths:
            chosen = [path if path in ps else ps[0] for ps in per_matrix]

            def fused(mats=mats, cfg=cfg, chosen=chosen):
                return lambda: [frozen_matmul(xs[q], s, cfg, (p, q), sh, path=c, prepared=prep)
                                for (s, sh, (p, q), prep), c in zip(mats, chosen)]

            others = [f"{n}: {c}" for (n, _, _), c in zip(shapes, chosen) if c != path]
            label = f"{fmt} {path}" + (f" ({', '.join(others)})" if others else "")
            nbytes = sum(m[3].read_bytes() if c != "decode" else stored_bytes(m[0]) + 8 * m[2][0] * m[2][1]
                         for m, c in zip(mats, chosen))
            rows[label] = (fused(), nbytes)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn, _ in rows.values():  # warm-up: compilation, first touch
        fn()
    sync()
    for r in range(args.repeats):
        for name, (fn, _) in rows.items():
            if name.endswith("decode") and r >= 3:
                continue  # decode is slow and far behind: three rounds are enough to show it
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    ref = statistics.median(times["dense fp32"])
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)\n")
    print("| row | ms per token (median) | tokens/s | × dense fp32 | MB read per token | GB/s |")
    print("| --- | --: | --: | --: | --: | --: |")
    for name, (_, nbytes) in rows.items():
        t = statistics.median(times[name])
        print(f"| {name} | {1e3 * t:.2f} | {args.tokens / t:.1f} | {ref / t:.2f} | {nbytes / 1e6:.1f} | "
              f"{nbytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
