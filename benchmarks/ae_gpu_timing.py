"""Seconds per autoencoder epoch for one 4096 × 4096 matrix at the paper's sizes, and the projection to a
7B model (224 linears × 2000 epochs), with several decoders batched in one vmapped stack.

    python benchmarks/ae_gpu_timing.py [--device cuda] [--precision bf16] [--groups 1 4] [--epochs 3]

Paper sizes (method.md §4): patch P = 512 (64 patches per matrix), latent 16 × 16 × 16 (5 stages),
ConvNeXt encoder of width 64, decoder budget c = 7.2e6 parameters (F solved from it), b_φ = 6 (QAT),
latent VQ b = 3, d = 2, batch 2 patches per decoder, Adam. The training step is the phase's own
(`reallm.nn.ae_recipe.training_step`, the latent VQ on, as in most of the schedule). With ``--groups G``, G
matrices (G decoders) are trained together in one stack; the time per matrix-epoch is then the stack's
epoch time / G. The projection is 224 × 2000 × (seconds per matrix-epoch) / N devices (the phase gives
each device its share of the matrices; they never communicate).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reallm.core import schedules  # noqa: E402
from reallm.formats.autoencoder import codec as ae_format  # noqa: E402
from reallm.formats.autoencoder import recipe as ae_recipe  # noqa: E402
from reallm.phases.autoencoder_matrices import prepare_matrix  # noqa: E402
from reallm.weight.config import CompressionConfig  # noqa: E402


def run_epoch(stack, data, sched, opt, lr, autocast, e: int, steps: int) -> None:
    """One epoch of the phase's training step (every patch of the stack's largest group once)."""
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = ae_recipe.training_step(stack, data, sched, e, s)
        loss.backward()
        opt.step()
        lr.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "tf32"], default="bf16",
                    help="bf16: autocast to bfloat16 (Lightning's bf16-mixed); tf32: fp32 with TF32 matmuls")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4], help="decoders per stack (matrices batched)")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--size", type=int, default=4096, help="matrix side")
    ap.add_argument("--patch", type=int, default=512)
    ap.add_argument("--n-stages", type=int, default=5)
    ap.add_argument("--decoder-params", type=float, default=7.2e6)
    ap.add_argument("--encoder-width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2, help="patches per decoder per step")
    ap.add_argument("--linears", type=int, default=224, help="linears of the model (LLaMA-2-7B: 32 × 7)")
    ap.add_argument("--paper-epochs", type=int, default=2000)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {name}; torch {torch.__version__}; precision {args.precision}; "
          f"command: python benchmarks/ae_gpu_timing.py {' '.join(sys.argv[1:])}".strip(), flush=True)

    ae = {"patch": args.patch, "n_stages": args.n_stages, "latent_channels": 16, "encoder_width": args.encoder_width,
          "encoder_blocks": 1, "decoder_params": args.decoder_params, "weight_bits": 6, "share": "matrix"}
    cfg = CompressionConfig(quantizer="autoencoder", bits=3, rank=0, options={"dim": 2, **ae})
    spec = ae_format.ae_spec(cfg)
    print(f"decoder: F = {spec.width()}, {spec.decoder_params_count():,} parameters (c = {args.decoder_params:.3g}); "
          f"latent per patch {spec.latent_hw[0]} × {spec.latent_hw[1]} × {spec.latent_channels}; "
          f"{(args.size // args.patch) ** 2} patches of {args.patch}² per matrix", flush=True)
    sched = ae_recipe.TrainSchedule(epochs=10**6, batch_size=args.batch, vq_start=0.0, finetune=0.0, kmeans_iters=10)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    rows = []
    for G in args.groups:
        g = torch.Generator(device="cpu").manual_seed(G)
        pms = [prepare_matrix((torch.randn(args.size, args.size, generator=g) * 0.02).to(dev), cfg, f"m{k}")
               for k in range(G)]
        data = ae_recipe.GroupData([[pm] for pm in pms], spec, device=dev)
        stack = ae_recipe.AEStack(spec, cfg.bits, cfg.options.dim, G, list(range(G))).to(dev)
        opt, lr = schedules.adam_with_cosine(stack.parameters(), 1e-3, 10**6, 0.0)
        ae_recipe.on_epoch_start(stack, data, sched, 0)  # the latent VQ codebook (k-means) is fitted here
        steps = data.steps_per_epoch(args.batch)

        try:
            run_epoch(stack, data, sched, opt, lr, autocast, 0, steps)  # warm-up (cudnn autotuning, allocator)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            for e in range(1, args.epochs + 1):
                run_epoch(stack, data, sched, opt, lr, autocast, e, steps)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = (time.perf_counter() - t0) / args.epochs
        except torch.OutOfMemoryError:
            print(f"G = {G}: out of memory", flush=True)
            break
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        per_matrix = dt / G
        hours = args.linears * args.paper_epochs * per_matrix / 3600
        rows.append((G, steps, dt, per_matrix, mem, hours))
        print(f"G = {G}: {dt:.3f} s per epoch ({steps} steps), {per_matrix:.3f} s per matrix-epoch, "
              f"peak memory {mem:.1f} GiB", flush=True)
        del stack, data, opt, lr, pms
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    print("\n| matrices per stack (G) | steps per epoch | s per epoch | s per matrix-epoch | peak GiB | "
          f"{args.linears} linears × {args.paper_epochs} epochs, 1 device (h) | 8 devices (h) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for G, steps, dt, pm, mem, h in rows:
        print(f"| {G} | {steps} | {dt:.3f} | {pm:.3f} | {mem:.1f} | {h:.1f} | {h / 8:.1f} |")
    print(f"\n(paper: about 90 GPU-hours on an A40 for the whole LLaMA-2-7B pipeline; "
          f"os.cpu_count() = {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
