"""ReALLM with the patch autoencoder and the adaptive choice (reallm-3bit, reallm-2bit) against the
data-free presets, and against every single configuration of its own candidates at the same budget:
accounted bits and TinyStories perplexity side by side, in one run.

    python benchmarks/ae_methods.py [--presets nf3 rtn3 vq-3bit vq-2bit quip-2bit] \
        [--reallm reallm-3bit reallm-2bit] [--out runs/ae_methods] [--threads 1]

Each preset runs phase 1 through the CLI (`train.py fit --config configs/ae.yaml --config <preset>`) on
../shared/models/stories260K (a run directory that already holds results.json is reused). Perplexity:
protocol.md's rule for any other text on the whole of tinystories_valid.txt, context 512, computed with
`reallm.eval.perplexity.perplexity` on the checkpoint loaded by `load_compressed`.
"Single configuration" rows rebuild the model from one candidate's containers for every matrix (the
phase keeps them in run_dir/partial/cand/<label>/), their shared pieces charged to all matrices: what
that configuration alone would give, evaluated exactly like the adaptive choice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "data" / "tinystories_valid.txt"


def windows(seq_len: int = 512) -> torch.Tensor:
    from reallm.core.hf_models import load_tokenizer
    from reallm.data.sources import load_texts
    from reallm.data.windows import tokenize, wikitext_windows

    return wikitext_windows(tokenize(load_tokenizer(str(MODEL)), load_texts(str(TEXT))[0]), seq_len)


def ppl(model, win) -> float:
    from reallm.eval.perplexity import perplexity

    return perplexity(model, win, batch_size=8, progress=False)["value"]


def compress(preset: str, out: Path, threads: int) -> tuple[Path, float]:
    run_dir = out / preset
    if (run_dir / "results.json").is_file() and any((run_dir / "reallm" / f).is_file()
                                                    for f in ("config.json", "reallm.json")):  # format 2 or 1
        return run_dir, float("nan")
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out / f"{preset}.log", "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", "configs/ae.yaml",
                               "--config", f"configs/methods/{preset}.yaml", "--model.init_args.model_name_or_path",
                               str(MODEL), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                               "--run_dir", str(run_dir)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"{preset} failed, see {out / f'{preset}.log'}")
    return run_dir, time.time() - t0


def single_config_model(run_dir: Path, label: str):
    """The base model with every matrix compressed by candidate `label` (shared pieces charged to all)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from reallm.model.surgery import swap_in
    from reallm.weight.container import ReALLMWeight

    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    found = []
    for meta_path in sorted((run_dir / "partial" / "cand" / label).glob("*.json")):
        meta = json.loads(meta_path.read_text())
        tensors = load_file(meta_path.with_suffix(".safetensors"))
        shared = {k[len("shared."):]: v for k, v in tensors.items() if k.startswith("shared.")}
        found.append((meta["name"], ReALLMWeight.from_dict(tensors, meta["container"], shared), meta["stats"]))
    total = sum(w.shape[0] * w.shape[1] for _, w, _ in found)
    for name, w, stats in found:
        if w.shared:
            w.meta["shared_numel"] = total  # every matrix uses this candidate's shared pieces
        swap_in(model, name, w, stats={"rel_frobenius_error": stats["rel_frobenius_error"]})
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["nf3", "rtn3", "vq-3bit", "vq-2bit", "quip-2bit"],
                    help="data-free presets to compare with")
    ap.add_argument("--reallm", nargs="*", default=["reallm-3bit", "reallm-2bit"])
    ap.add_argument("--out", default="runs/ae_methods")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    args = ap.parse_args()
    if not MODEL.is_dir() or not TEXT.is_file():
        print(f"error: {MODEL} or {TEXT} is absent (this benchmark needs ../shared)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from reallm import bits_report, load_compressed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s); command: python benchmarks/ae_methods.py {' '.join(sys.argv[1:])}".strip(),
          flush=True)
    win = windows()
    base = ppl(AutoModelForCausalLM.from_pretrained(MODEL).eval(), win)
    rows = [("uncompressed (fp32)", "-", "-", "-", "-", base, "-")]
    for preset in args.presets + args.reallm:
        run_dir, wall = compress(preset, out, args.threads)
        res = json.loads((run_dir / "results.json").read_text())
        value = ppl(load_compressed(run_dir / "reallm"), win)
        extra = ""
        if "adaptive" in res:
            extra = ", ".join(f"{k}: {v}" for k, v in res["adaptive"]["counts"].items() if v)
        rows.append((preset, str(res["bits"]["nominal"]), f"{res['bits']['decoder_linears']:.3f}",
                     f"{res['bits']['whole_model']:.3f}", f"{res['mean_rel_frobenius_error']:.4f}", value,
                     extra or "-"))
        print(f"done {preset}: ppl {value:.4f}", file=sys.stderr, flush=True)
        if "adaptive" in res:
            budget = res["adaptive"]["budget_bits_per_weight"]
            for label in sorted(res["adaptive"]["single_config"]):
                model = single_config_model(run_dir, label)
                rep = bits_report(model)
                value = ppl(model, win)
                fits = "fits" if rep["decoder_linears"] <= budget + 1e-9 else "over"
                rows.append((f"  {preset}, single config {label}", "-", f"{rep['decoder_linears']:.3f}",
                             f"{rep['whole_model']:.3f}", f"{rep['mean_rel_frobenius_error']:.4f}", value,
                             f"{fits} the {budget} budget"))
                print(f"done {preset}/{label}: ppl {value:.4f}", file=sys.stderr, flush=True)
    print("\n| method | nominal b | bits (decoder linears) | bits (whole model) | mean rel. error | "
          "ppl TinyStories | × uncompressed | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, nom, bd, bw, err, value, note in rows:
        print(f"| {name} | {nom} | {bd} | {bw} | {err} | {value:.4f} | {value / base:.3f} | {note} |")
    print(f"\ncontext 512, {win.shape[0]} windows ({win.shape[0] * 511} predicted tokens) of tinystories_valid.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
