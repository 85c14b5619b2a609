"""Paper Table 4 analogue: the patch autoencoder with QAT vs the same decoder quantized after training (PTQ)
vs NF3 vs VQ, relative Frobenius error and accounted bits per weight side by side, in one run.

    python benchmarks/ae_table4.py [--epochs-structured 400] [--epochs-real 150] [--threads 1] [--quick]

Part 1, a structured 256 × 256 matrix (a sum of smooth rank-one fields plus 2 % noise, the kind of spatial
structure the paper finds in first-block matrices): one decoder for the matrix, small latent, large
decoder. Part 2, the 35 linear matrices of ../shared/models/stories260K with one decoder shared by the
whole model (large latent, small decoder: these matrices look like noise). In both parts QAT and PTQ use
the same (c, b_φ), the same latent and the same training recipe; PTQ trains a float decoder and rounds it
once to b_φ bits (NF levels, fp16 absmax scale per output channel). Errors are ‖W − Ŵ‖_F / ‖W‖_F of
the stored container (decoded exactly as the model decodes it); bits count every stored piece
(protocol.md), shared decoders / codebooks divided among their matrices.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reallm.formats.autoencoder import codec as ae_format  # noqa: E402
from reallm.formats.autoencoder import recipe as ae_recipe  # noqa: E402
from reallm.phases.autoencoder_matrices import build_container, prepare_matrix  # noqa: E402
from reallm.weight.config import CompressionConfig  # noqa: E402
from reallm.weight.pipeline import compress_weight, relative_error  # noqa: E402

SHARED = ROOT.parent / "shared"


def structured_matrix(p: int = 256, q: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(p, dtype=torch.float32)[:, None] / p
    j = torch.arange(q, dtype=torch.float32)[None, :] / q
    W = torch.zeros(p, q)
    for k in range(6):  # smooth rank-one fields of decreasing energy
        fi, fj = torch.rand(2, generator=g) * 6 + 1
        ph = torch.rand(2, generator=g) * 6.28
        W += (0.7**k) * torch.sin(2 * math.pi * fi * i + ph[0]) * torch.cos(2 * math.pi * fj * j + ph[1])
    W += 0.3 * torch.exp(-((i - 0.3) ** 2 + (j - 0.6) ** 2) / 0.02)  # a localised bump
    W = W / W.std()
    return 0.02 * (W + 0.02 * torch.randn(p, q, generator=g))


def train_ae(Ws: dict[str, torch.Tensor], cfg: CompressionConfig, sched: ae_recipe.TrainSchedule) -> dict:
    """One decoder for all of Ws (share=model); returns errors and bits from the stored containers."""
    spec = ae_format.ae_spec(cfg)
    pms = [prepare_matrix(W, cfg, n) for n, W in Ws.items()]
    data = ae_recipe.GroupData([pms], spec)
    stack = ae_recipe.AEStack(spec, cfg.bits, cfg.options.dim, 1, [cfg.seed], qat=sched.qat)
    t0 = time.time()
    hist = ae_recipe.train_stacks([(stack, data)], sched)
    res = ae_recipe.export_group(stack, data, 0)
    errs, bits, n = [], 0.0, 0
    items: dict[str, float] = {}
    for pm in pms:
        w = build_container(pm, cfg, res)
        errs.append(relative_error(Ws[pm.name], w.dequantize()))
        b = w.bits()
        bits += b["total"]
        n += pm.numel
        for k in ("latent", "decoder"):
            items[k] = items.get(k, 0.0) + b.get(k, 0.0)
    return {"err": _rms(errs), "bits": bits / n, "latent": items["latent"] / n, "decoder": items["decoder"] / n,
            "train_loss": hist[-1], "time": time.time() - t0, "decoder_params": spec.decoder_params_count()}


def data_free(Ws: dict[str, torch.Tensor], cfg: CompressionConfig) -> dict:
    """NF / VQ without decoder (a VQ codebook shared by all of Ws when options.codebook_scope == "model")."""
    from torch import nn

    from reallm.model.surgery import fit_shared_tensors

    mods = []
    for n, W in Ws.items():
        lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data = W
        mods.append((n, lin, cfg))
    cb = fit_shared_tensors(mods, progress=False).get(cfg.key())  # a model-wide codebook, if the config shares one
    errs, bits, n = [], 0.0, 0
    for name, W in Ws.items():
        w = compress_weight(W, cfg, name=name, shared=cb[0] if cb else None, shared_numel=cb[1] if cb else None)
        errs.append(relative_error(W, w.dequantize()))
        bits += w.bits()["total"]
        n += W.numel()
    return {"err": _rms(errs), "bits": bits / n}


def _rms(errs: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def row(name: str, r: dict, b: str = "-", c: str = "-", bphi: str = "-") -> str:
    extra = (f"{r['latent']:.3f} | {r['decoder']:.3f}" if "latent" in r else "- | -")
    return f"| {name} | {b} | {c} | {bphi} | {r['err']:.4f} | {r['bits']:.3f} | {extra} |"


HEAD = ("| method | b (latent or codes) | c (decoder params) | b_φ | rel. Frobenius error (RMS over matrices) "
        "| accounted bits / weight | latent bits / w | decoder bits / w |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs-structured", type=int, default=300)
    ap.add_argument("--epochs-real", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny convolutions: 1 is fastest)")
    ap.add_argument("--quick", action="store_true", help="a few epochs only (smoke test)")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs_structured, args.epochs_real = 6, 3
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s); command: python benchmarks/ae_table4.py {' '.join(sys.argv[1:])}".strip())

    # ---- part 1: structured matrix, one decoder for the matrix -------------------------------------
    W = {"structured": structured_matrix()}
    ae = {"patch": 64, "n_stages": 4, "latent_channels": 8, "encoder_width": 16, "encoder_blocks": 1,
          "decoder_params": 1.0e4, "kernels": [1, 3, 3, 3], "share": "model"}
    sched = ae_recipe.TrainSchedule(epochs=args.epochs_structured, lr=3e-3, batch_size=4, vq_start=0.3, finetune=0.2,
                                kmeans_iters=25)
    print(f"\n### Structured 256 × 256 matrix (smooth fields + 2 % noise), {args.epochs_structured} epochs, "
          f"patch 64, latent 4 × 4 × 8 per patch\n")
    print(HEAD)
    for bphi in (6, 4):
        cfg = CompressionConfig(quantizer="autoencoder", bits=3, rank=0, permute=False,
                                options={"dim": 2, **ae, "weight_bits": bphi})
        for qat in (True, False):
            r = train_ae(W, cfg, sched.__class__(**{**sched.__dict__, "qat": qat}))
            label = f"autoencoder, {'QAT' if qat else 'PTQ'}"
            print(row(label, r, "3 (d = 2)", f"{r['decoder_params']}", str(bphi)), flush=True)
    for name, cfg in [("NF3", CompressionConfig(quantizer="nf", bits=3, rank=0)),
                      ("VQ b = 3, d = 2 (own codebook)",
                       CompressionConfig(quantizer="vq", bits=3, rank=0, options={"dim": 2})),
                      ("VQ b = 2, d = 4 (own codebook)",
                       CompressionConfig(quantizer="vq", bits=2, rank=0, options={"dim": 4}))]:
        print(row(name, data_free(W, cfg), "3" if name == "NF3" else name.split(" (")[0][3:]), flush=True)

    if args.skip_real:
        return 0
    # ---- part 2: stories260K, one decoder shared by the whole model ---------------------------------
    model_dir = SHARED / "models" / "stories260K"
    if not model_dir.is_dir():
        print(f"\n(skipping part 2: {model_dir} is absent)")
        return 0
    from transformers import AutoModelForCausalLM

    from reallm.core.hf_models import is_linear

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    Ws = {n: m.weight.detach().float() for n, m in model.named_modules() if is_linear(m) and ".layers." in n}
    ae = {"patch": 32, "n_stages": 1, "latent_channels": 4, "encoder_width": 16, "encoder_blocks": 0,
          "decoder_width": 12, "kernels": [3], "share": "model"}
    sched = ae_recipe.TrainSchedule(epochs=args.epochs_real, lr=3e-3, batch_size=32, vq_start=0.3, vq_refresh=10,
                                commitment=0.0, finetune=0.2, kmeans_iters=25)
    print(f"\n### stories260K: its {len(Ws)} linear matrices ({sum(w.numel() for w in Ws.values())} weights), "
          f"one decoder shared by all, {args.epochs_real} epochs\n")
    print(HEAD)
    for bphi in (6, 4):
        cfg = CompressionConfig(quantizer="autoencoder", bits=3, rank=0, permute=True,
                                options={"dim": 2, **ae, "weight_bits": bphi})
        for qat in (True, False):
            r = train_ae(Ws, cfg, sched.__class__(**{**sched.__dict__, "qat": qat}))
            label = f"autoencoder, {'QAT' if qat else 'PTQ'}"
            print(row(label, r, "3 (d = 2)", f"{r['decoder_params']}", str(bphi)), flush=True)
    for name, cfg in [("NF3", CompressionConfig(quantizer="nf", bits=3, rank=0)),
                      ("VQ b = 3, d = 2 (shared codebook, permuted)",
                       CompressionConfig(quantizer="vq", bits=3, rank=0, permute=True,
                                         options={"dim": 2, "codebook_scope": "model"})),
                      ("VQ b = 2, d = 4 (shared codebook, permuted)",
                       CompressionConfig(quantizer="vq", bits=2, rank=0, permute=True,
                                         options={"dim": 4, "codebook_scope": "model"}))]:
        print(row(name, data_free(Ws, cfg), "3" if name == "NF3" else name.split(" (")[0][3:]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
