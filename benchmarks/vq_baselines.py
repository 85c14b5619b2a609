"""Quality of the 2-bit vector-quantization baselines on a Gaussian matrix (issue 14), side by side.

    python benchmarks/vq_baselines.py [--size 4096] [--seeds 3] [--beam 8] [--iters 10]
        [--additive-max-points N] [--threads N] [--device cpu]

On one size x size standard Gaussian matrix W (torch seed ``--data-seed``), every method compresses
W and the table prints the relative Frobenius error ‖W − Ŵ‖_F / ‖W‖_F (mean and range over
``--seeds`` seeds of the methods' own random choices), the accounted bits per weight and the wall
time of the compression:

- ``k-means b2 d4, container``: ``reallm.weight.pipeline.compress_weight`` with
  ``CompressionConfig(quantizer="vq", bits=2, options={"dim": 4})`` (absmax block scales B0 = 64 with 8-bit
  double quantisation, one k-means codebook of 256 codewords fitted on at most 2^20 vectors,
  horizontal 4-vectors); bits from the container's own accounting;
- ``k-means b2 d4, raw``: ``reallm.ops.kmeans.kmeans`` / ``assign`` directly on W's values cut into
  horizontal 4-vectors (no scales: Gaussian values need none); codes + fp16 codebook;
- ``additive 2x8 d8``: ``reallm.formats.additive.search.additive_fit`` (M = 2, k = 8, d = 8, beam ``--beam``,
  ``--iters`` refinement iterations) on W's horizontal 8-vectors (no rotation, no scales);
  codes + two fp16 codebooks;
- ``E8P`` / ``E8P + 1-bit`` / ``E8P + E8P``: randomised Hadamard rotation on both sides
  (``reallm.ops.hadamard.rotate``, seeds from the method seed), then
  ``reallm.formats.e8p.lattice.e8_residual_quantize`` with stages ("e8p",), ("e8p", "e8_1bit"),
  ("e8p", "e8p") on the rotated matrix's horizontal 8-vectors, one searched scale per stage;
  codes + one fp32 scale per stage + two int64 rotation seeds (as the container stores them);
- ``NF3, container`` as a 3-bit reference: ``CompressionConfig(quantizer="nf", bits=3)``;
- the stored formats of the presets, through ``compress_weight`` with the compression settings of
  ``configs/methods/<preset>.yaml`` and the method seed (absmax block scales, bits from the container's
  own accounting, per-matrix codebooks: the option ``codebook_scope`` is a model-level choice):
  ``aqlm-2bit, container`` (additive 2x8, beam 8), ``quip-2bit, container`` (Hadamard + E8P),
  ``quip-3bit, container`` (Hadamard + E8P + 1-bit stage).

The goal (QuIP# and AQLM papers): at 2 bits, E8P and additive 2x8 each have a lower error than
k-means b2 d4 on Gaussian data. Times are printed for orientation only: on a shared machine they are
not evidence (docs/protocol.md "Benchmarks").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_core.py: oversubscribed OpenMP stalls

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from reallm.formats.additive.search import additive_bits, additive_decode, additive_fit  # noqa: E402
from reallm.formats.e8p.lattice import E8_STAGES, e8_residual_quantize  # noqa: E402
from reallm.ops.hadamard import rotate, unrotate  # noqa: E402
from reallm.ops.kmeans import assign, kmeans  # noqa: E402
from reallm.weight.config import CompressionConfig  # noqa: E402
from reallm.weight.pipeline import compress_weight, relative_error  # noqa: E402


def container_row(W: torch.Tensor, config: CompressionConfig) -> tuple[torch.Tensor, float]:
    w = compress_weight(W, config, name="gaussian")
    return w.dequantize(), w.bits()["per_weight"]


def preset_config(name: str, seed: int) -> CompressionConfig:
    """The compression settings of configs/methods/<name>.yaml for one matrix (per-matrix codebooks)."""
    import yaml

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "methods", f"{name}.yaml")
    with open(path) as f:
        comp = yaml.safe_load(f)["model"]["init_args"]["compression"]
    config = CompressionConfig(**{**comp, "seed": seed})
    return config.with_options(codebook_scope="matrix") if hasattr(config.options, "codebook_scope") else config


def kmeans_raw(W: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
    x = W.reshape(-1, 4)  # (N, 4) horizontal 4-vectors
    cb = kmeans(x, 256, seed=seed, max_points=1 << 20).codebook.half().float()  # stored in fp16
    W_hat = cb[assign(x, cb)].reshape(W.shape)
    return W_hat, (x.shape[0] * 8 + 256 * 4 * 16) / W.numel()


def additive_row(W: torch.Tensor, seed: int, args) -> tuple[torch.Tensor, float, list[float]]:
    x = W.reshape(-1, 8)  # (N, 8)
    res = additive_fit(x, 2, 8, beam=args.beam, iters=args.iters, tol=args.tol, seed=seed,
                       max_points=args.additive_max_points)
    bits = additive_bits(x.shape[0], 2, 8, 8)
    return additive_decode(res.codes, res.codebooks).reshape(W.shape), sum(bits.values()) / W.numel(), res.errors


def e8_row(W: torch.Tensor, seed: int, stages: tuple[str, ...]) -> tuple[torch.Tensor, float, list[float]]:
    s_left, s_right = 2 * seed + 1, 2 * seed + 2
    X = rotate(W, s_left, s_right)
    res = e8_residual_quantize(X.reshape(-1, 8), stages, seed=seed)
    W_hat = unrotate(res.reconstruction.reshape(W.shape), s_left, s_right)
    n8 = W.numel() // 8
    bits = sum(E8_STAGES[s] for s in stages) * n8 + 32 * len(stages) + 2 * 64
    return W_hat, bits / W.numel(), res.scales


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="matrix is size x size (a multiple of 8)")
    ap.add_argument("--seeds", type=int, default=3, help="method seeds 0..seeds-1")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--beam", type=int, default=8, help="beam width of additive 2x8")
    ap.add_argument("--iters", type=int, default=10, help="refinement iterations of additive 2x8")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative-improvement stop of additive 2x8")
    ap.add_argument("--additive-max-points", type=int, default=None,
                    help="fit additive codebooks on a subsample of this many 8-vectors (all are encoded)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="run only rows whose label contains one of these")
    args = ap.parse_args(argv)
    if args.size % 8:
        raise SystemExit(f"--size must be a multiple of 8, got {args.size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    W = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(args.data_seed)).to(device)

    print(f"- command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`")
    print(f"- platform: {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}")
    print(f"- device: {device}, CPU count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"- load average at start (1, 5, 15 min): {tuple(round(v, 2) for v in os.getloadavg())}")
    print(f"- W: {args.size} x {args.size} standard Gaussian (torch seed {args.data_seed}), fp32; "
          f"method seeds 0..{args.seeds - 1}; additive beam {args.beam}, iters {args.iters}, tol {args.tol}, "
          f"max_points {args.additive_max_points}")
    print("- times are wall-clock on a possibly shared machine: orientation only, not evidence\n")

    rows = [
        ("k-means b2 d4, container", 2,
         lambda s: container_row(W, CompressionConfig(quantizer="vq", bits=2, seed=s, options={"dim": 4}))),
        ("k-means b2 d4, raw", 2, lambda s: kmeans_raw(W, s)),
        (f"additive 2x8 d8, beam {args.beam}", 2, lambda s: additive_row(W, s, args)),
        ("E8P (Hadamard)", 2, lambda s: e8_row(W, s, ("e8p",))),
        ("E8P + 1-bit (Hadamard)", 3, lambda s: e8_row(W, s, ("e8p", "e8_1bit"))),
        ("NF3, container", 3, lambda s: container_row(W, CompressionConfig(quantizer="nf", bits=3, seed=s))),
        ("E8P + E8P (Hadamard)", 4, lambda s: e8_row(W, s, ("e8p", "e8p"))),
        ("aqlm-2bit, container", 2, lambda s: container_row(W, preset_config("aqlm-2bit", s))),
        ("quip-2bit, container", 2, lambda s: container_row(W, preset_config("quip-2bit", s))),
        ("quip-3bit, container", 3, lambda s: container_row(W, preset_config("quip-3bit", s))),
    ]
    print("| method | nominal bits | accounted bits/weight | rel. Frobenius error: mean [min, max] "
          "| time (s), mean | notes |")
    print("| --- | ---: | ---: | --- | ---: | --- |")
    for label, nominal, fn in rows:
        if args.only and not any(o in label for o in args.only):
            continue
        errs, times, bits, notes = [], [], None, ""
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            out = fn(seed)
            times.append(time.perf_counter() - t0)
            errs.append(relative_error(W, out[0]))
            bits = out[1]
            if label.startswith("additive"):
                notes = f"MSE/vector by iteration (seed {seed}): " + ", ".join(f"{e:.4f}" for e in out[2])
            elif label.startswith("E8P"):
                notes = "scales (last seed): " + ", ".join(f"{s:.4f}" for s in out[2])
        mean = sum(errs) / len(errs)
        print(f"| {label} | {nominal} | {bits:.4f} | {mean:.4f} [{min(errs):.4f}, {max(errs):.4f}] | "
              f"{sum(times) / len(times):.1f} | {notes} |", flush=True)
    print(f"\n- load average at end: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
