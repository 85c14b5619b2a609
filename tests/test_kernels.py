"""Fused dequantize-matmul kernels (reallm.layer.kernels) against the plain decode.

Every case builds the stored tensors with the real encoder (`compress_weight`), then compares a
fused path with `decode_frozen` followed by `x @ Q̂ᵀ` (an independent reading of the packed
stream: `unpack_bits` plus table look-ups plus `unpermute_columns` / `unrotate`).

Tolerances, per input dtype, on |y − ref| element-wise (ref = x.float() @ Q̂ᵀ in fp32):
- fp32: 1e-5·|ref| + 2e-6·max|ref| (accumulation order only);
- bf16: 2^-7·|ref| + 1e-5·max|ref| (one bf16 unit in the last place: the output is rounded to
  bf16, and Triton's interpreter rounds towards zero).

The Triton kernel runs in Triton's interpreter on CPU tensors, in one child process started with
TRITON_INTERPRET=1 (Triton fixes the interpreter mode at import, so setting it in this process
would reach every later test); the parametrised tests here compare its outputs case by case.
On a machine with CUDA, `test_triton_cuda_matches_decode` runs the compiled kernel in-process.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import platform
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from reallm import CompressionConfig, compress_weight
from reallm.layer.kernels import (
    UnsupportedPath,
    available_paths,
    cpu_avx512,
    cpu_lut,
    frozen_matmul,
    prepare,
    unsupported_reason,
)

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]

# The dev extras (what CI installs) bring numba everywhere and triton on Linux x86-64: there a missing one is an
# error, not a silently skipped file (the CPU path and the Triton interpreter must run in CI).
TRITON_WHEELS = platform.system() == "Linux" and platform.machine() == "x86_64"
numba = importlib.import_module("numba")
triton = importlib.import_module("triton") if TRITON_WHEELS else pytest.importorskip("triton")

FORMATS = {
    "nf2": dict(quantizer="nf", bits=2),
    "nf3": dict(quantizer="nf", bits=3),
    "nf4": dict(quantizer="nf", bits=4),
    "vq2x4": dict(quantizer="vq", bits=2, options={"dim": 4}),
    "vq3x2": dict(quantizer="vq", bits=3, options={"dim": 2}),
    "vq2x2": dict(quantizer="vq", bits=2, options={"dim": 2}),
    "vq4x2": dict(quantizer="vq", bits=4, options={"dim": 2}),
    "vq2x8": dict(quantizer="vq", bits=2, options={"dim": 8}),
}
SHAPES = [(172, 64), (64, 172), (100, 37), (64, 128)]
VARIANTS = {
    "plain": {},
    "perm": dict(permute=True, permute_rows=32),  # several row blocks, the last one partial
    "block32": dict(block_size=32),
    "shared": dict(options={"codebook_scope": "model"}),  # VQ codebook passed separately
    "rot": dict(rotation="hadamard", permute=True, permute_rows=100),  # 100: not a power of two
}
CASES = (
    [(f, s, "plain") for f in FORMATS for s in SHAPES]
    + [(f, s, "perm") for f in FORMATS for s in SHAPES[:3]]
    + [(f, s, "block32") for f in ("nf3", "vq2x4", "vq3x2") for s in SHAPES[:3]]
    + [(f, s, "shared") for f in ("vq2x4", "vq3x2") for s in SHAPES[:3]]
    + [(f, s, "rot") for f in ("nf3", "vq2x4") for s in ((172, 64), (64, 172))]
)


def case_id(case) -> str:
    f, (p, q), v = case
    return f"{f}-{p}x{q}-{v}"


@cache
def compressed(fmt: str, shape: tuple[int, int], variant: str):
    """(config, stored, shared, Q̂) of a Gaussian matrix compressed by the real encoder."""
    fmt_fields, variant_fields = dict(FORMATS[fmt]), dict(VARIANTS[variant])
    options = {**fmt_fields.pop("options", {}), **variant_fields.pop("options", {})}
    if fmt_fields["quantizer"] == "vq":
        options.update(kmeans_iters=4, kmeans_max_points=4096)
    cfg = CompressionConfig(**fmt_fields, **variant_fields, options=options)
    seed = sum(map(ord, fmt)) + 7 * shape[0] + shape[1]
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    codebook = None
    if variant == "shared":  # a codebook fitted on another matrix, as a model-wide one would be
        other = compress_weight(torch.randn(64, 64) * 0.02, cfg.with_options(codebook_scope="matrix"))
        codebook = other.frozen["codebook"]
    w = compress_weight(W, cfg, codebook=codebook)
    if variant == "shared":
        assert "codebook" not in w.frozen and "codebook" in w.shared
    return cfg, w.frozen, w.shared, w.decode_frozen()


def inputs(T: int, q: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, q, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_close(y: torch.Tensor, x: torch.Tensor, Q: torch.Tensor) -> None:
    """y against x.float() @ Q̂ᵀ with the per-dtype tolerance of the module docstring."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], Q.shape[0])
    ref = x.float() @ Q.T
    rtol, atol = (1e-5, 2e-6) if x.dtype == torch.float32 else (2.0**-7, 1e-5)
    err = (y.float() - ref).abs()
    bound = rtol * ref.abs() + atol * ref.abs().max()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g}, max |ref| {float(ref.abs().max()):.3g}"


# ---------------------------------------------------------------------------------------------
# CPU lookup-table paths: "cpu" (Numba, scalar) and "cpu_avx512" (C, LUT in registers)
# ---------------------------------------------------------------------------------------------
def skip_without_avx512(path: str) -> None:
    if path == "cpu_avx512" and cpu_avx512.machine_reason() is not None:
        pytest.skip(f"cpu_avx512 unavailable here: {cpu_avx512.machine_reason()}")


def expected_cpu_limit(path: str, cfg: CompressionConfig, q: int) -> bool:
    """The shape / format limits each CPU path states (see their module docstrings)."""
    if path == "cpu":
        return cfg.quantizer == "vq" and q % cfg.options.dim != 0  # a VQ vector must not cross a row
    g = cpu_avx512.group_size(cfg, q)
    return g * cfg.bits > 8 or q % cfg.block_size != 0 or cfg.block_size % (8 * g) != 0


@pytest.mark.parametrize("path", ["cpu", "cpu_avx512"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_paths_match_decode(case, path):
    skip_without_avx512(path)
    cfg, stored, shared, Q = compressed(*case)
    p, q = Q.shape
    runs = [(1, torch.float32), (3, torch.bfloat16)]
    if case[2] == "plain":
        runs += [(1, torch.bfloat16), (3, torch.float32)]
    served = path in available_paths(cfg, "cpu", torch.float32, 1, (p, q))
    assert served == (not expected_cpu_limit(path, cfg, q))
    for T, dtype in runs:
        if not served:
            with pytest.raises(UnsupportedPath, match=f"path '{path}' cannot serve"):
                frozen_matmul(inputs(T, q, dtype), stored, cfg, (p, q), shared, path=path)
            continue
        x = inputs(T, q, dtype, seed=T)
        check_close(frozen_matmul(x, stored, cfg, (p, q), shared, path=path), x, Q)


@pytest.mark.parametrize("path", ["cpu", "cpu_avx512"])
def test_cpu_paths_four_tokens(path):
    skip_without_avx512(path)
    for fmt in ("nf3", "vq3x2"):
        cfg, stored, shared, Q = compressed(fmt, (172, 64), "perm")
        x = inputs(4, 64, torch.float32, seed=4)
        check_close(frozen_matmul(x, stored, cfg, (172, 64), shared, path=path), x, Q)


@pytest.mark.parametrize("path", ["cpu", "cpu_avx512"])
def test_cpu_paths_small_column_chunks(path, monkeypatch):
    """With a tiny LUT chunk the rows are walked in several column chunks (and the AVX-512 path
    switches permuted 256-entry tables to gathering codeword values): same results."""
    skip_without_avx512(path)
    module = cpu_avx512 if path == "cpu_avx512" else cpu_lut
    monkeypatch.setattr(module, "_LUT_CHUNK_BYTES", 4096)
    for fmt, variant in (("nf3", "perm"), ("vq2x4", "perm"), ("vq2x4", "plain"), ("vq3x2", "plain")):
        cfg, stored, shared, Q = compressed(fmt, (64, 128), variant)
        for T in (1, 3):
            x = inputs(T, 128, torch.float32, seed=T)
            check_close(frozen_matmul(x, stored, cfg, (64, 128), shared, path=path), x, Q)


@pytest.mark.parametrize("path", ["cpu", "cpu_avx512"])
def test_cpu_paths_two_threads_and_prepared_reuse(path):
    """The threads' share of row blocks / row tasks gives the same result with 2 threads, and a
    prepared object serves repeated calls (what the layer keeps)."""
    skip_without_avx512(path)
    for variant in ("plain", "perm"):
        cfg, stored, shared, Q = compressed("vq3x2", (172, 64), variant)
        prep = prepare(stored, cfg, (172, 64), shared)
        x = inputs(3, 64, torch.float32)
        n = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            y2 = frozen_matmul(x, stored, cfg, (172, 64), shared, path=path, prepared=prep)
        finally:
            torch.set_num_threads(n)
        y1 = frozen_matmul(x, stored, cfg, (172, 64), shared, path=path, prepared=prep)
        check_close(y2, x, Q)
        assert torch.equal(y1, y2)  # rows are independent: the thread count changes nothing


def test_leading_dimensions_and_auto_path():
    cfg, stored, shared, Q = compressed("nf3", (64, 172), "plain")
    x = inputs(3, 172, torch.float32).view(1, 3, 172)  # (batch, seq, q)
    assert available_paths(cfg, "cpu", torch.float32, 3, (64, 172))[0] == "cpu"  # 172 % 64: not AVX-512
    y = frozen_matmul(x, stored, cfg, (64, 172), shared)
    assert y.shape == (1, 3, 64)
    check_close(y, x, Q)


# ---------------------------------------------------------------------------------------------
# Triton path: Triton's interpreter on CPU tensors, in a child process (see kernels_triton_child.py)
# ---------------------------------------------------------------------------------------------
def triton_runs(case) -> list[tuple[int, torch.dtype]]:
    """Token counts and dtypes of a case in the interpreter (each run costs ~0.1 s there): 3 (a partial token tile)
    and 16 (a full one) everywhere, 1 token in the plain cases, and the other dtypes on the 172-wide ones."""
    runs = [(3, torch.bfloat16), (16, torch.float32)]
    if case[2] == "plain":
        runs.insert(0, (1, torch.float32))
        if case[1][1] == 172:
            runs += [(1, torch.bfloat16), (5, torch.float16)]
    return runs


@pytest.fixture(scope="module")
def triton_child(tmp_path_factory):
    """Outputs of the Triton path for every case, computed by one interpreter child process."""
    payload = []
    for case in CASES:
        cfg, stored, shared, Q = compressed(*case)
        xs = [inputs(T, Q.shape[1], dtype, seed=T) for T, dtype in triton_runs(case)]
        payload.append(dict(id=case_id(case), config=cfg.to_dict(), shape=list(Q.shape), stored=stored,
                            shared=shared, xs=xs))
    tmp = tmp_path_factory.mktemp("triton")
    torch.save(payload, tmp / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels_triton_child.py"), str(tmp / "cases.pt"),
                           str(tmp / "out.pt")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_path_matches_decode(case, triton_child):
    cfg, stored, shared, Q = compressed(*case)
    ys = triton_child["ys"][case_id(case)]
    runs = triton_runs(case)
    assert len(ys) == len(runs)
    for (T, dtype), y in zip(runs, ys):
        check_close(y, inputs(T, Q.shape[1], dtype, seed=T), Q)


def test_triton_paths_in_the_interpreter(triton_child):
    """What the interpreter process offers: Triton after the CPU path, 1..16 tokens, no shape limit."""
    paths = triton_child["paths"]
    assert paths["nf3 T1"] == ["cpu", "triton", "decode"]
    assert paths["nf3 T5"] == ["triton", "decode"]  # CPU path: 1..4 tokens
    assert paths["nf3 T16 bf16"] == ["triton", "decode"]
    assert paths["nf3 T17"] == ["decode"]  # Triton path: 1..16 tokens
    assert paths["nf3 f64"] == ["decode"]
    assert paths["rtn"] == ["decode"]
    assert paths["vq 64x38"] == ["triton", "decode"]  # VQ vectors crossing rows: Triton only


def test_triton_not_offered_on_cpu_outside_the_interpreter(triton_child):
    """In this (test) process TRITON_INTERPRET is not set: the Triton path is not offered on CPU
    tensors and forcing it names the reason."""
    assert os.environ.get("TRITON_INTERPRET") in (None, "0")
    cfg, stored, shared, _ = compressed("nf3", (64, 128), "plain")
    assert paths_without_avx512(cfg, "cpu", torch.float32, 1) == ["cpu", "decode"]
    with pytest.raises(UnsupportedPath, match="TRITON_INTERPRET"):
        frozen_matmul(inputs(1, 128, torch.float32), stored, cfg, (64, 128), shared, path="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the compiled Triton kernel)")
@pytest.mark.parametrize("case", [c for c in CASES if c[2] != "plain" or c[1] == (64, 172)], ids=case_id)
def test_triton_cuda_matches_decode(case):
    cfg, stored, shared, Q = compressed(*case)
    dev = torch.device("cuda")
    stored_d = {k: v.to(dev) for k, v in stored.items()}
    shared_d = {k: v.to(dev) for k, v in shared.items()}
    assert available_paths(cfg, dev, torch.float32, 1, tuple(Q.shape))[0] == "triton"
    for T, dtype in triton_runs(case):
        x = inputs(T, Q.shape[1], dtype, seed=T)
        y = frozen_matmul(x.to(dev), stored_d, cfg, tuple(Q.shape), shared_d, path="triton")
        check_close(y.cpu(), x, Q)


# ---------------------------------------------------------------------------------------------
# fallbacks and errors
# ---------------------------------------------------------------------------------------------
def paths_without_avx512(*args) -> list[str]:
    return [p for p in available_paths(*args) if p != "cpu_avx512"]


def test_available_paths_fall_back_to_decode():
    f32 = torch.float32
    nf3 = CompressionConfig(quantizer="nf", bits=3)
    if cpu_avx512.machine_reason() is None:  # the register-LUT path comes first where it serves
        assert available_paths(nf3, "cpu", f32, 1, (64, 128)) == ["cpu_avx512", "cpu", "decode"]
        assert available_paths(nf3, "cpu", f32, 1, (64, 172))[0] == "cpu"  # blocks cross rows
        vq28 = CompressionConfig(quantizer="vq", bits=2, options={"dim": 8})
        assert available_paths(vq28, "cpu", f32, 1, (64, 128))[0] == "cpu"  # 65536-entry table
    assert paths_without_avx512(nf3, "cpu", f32, 1) == ["cpu", "decode"]
    # rotation is served (x and y transformed), so it is no reason to fall back
    assert paths_without_avx512(nf3.replace(rotation="hadamard", permute=True), "cpu", f32, 1) == ["cpu", "decode"]
    for other in (CompressionConfig(quantizer="rtn", bits=3), CompressionConfig(quantizer="none", bits=16),
                  CompressionConfig(quantizer="autoencoder", bits=3)):
        assert paths_without_avx512(other, "cpu", f32, 1) == ["decode"]
    assert paths_without_avx512(nf3, "cpu", f32, 4) == ["cpu", "decode"]
    assert paths_without_avx512(nf3, "cpu", f32, 5) == ["decode"]  # CPU path: 1..4 tokens
    assert paths_without_avx512(nf3, "cpu", torch.float64, 1) == ["decode"]
    vq = CompressionConfig(quantizer="vq", bits=2, options={"dim": 4})
    assert paths_without_avx512(vq, "cpu", f32, 1, (64, 38)) == ["decode"]  # vectors would cross rows
    assert paths_without_avx512(vq, "cpu", f32, 1, (64, 40)) == ["cpu", "decode"]
    assert paths_without_avx512(vq, "cpu", f32, 1) == ["cpu", "decode"]  # no shape given: not checked


@pytest.mark.parametrize("fmt", ["rtn", "none"])
def test_auto_path_decodes_other_formats(fmt):
    cfg = CompressionConfig(quantizer=fmt, bits=3 if fmt == "rtn" else 16)
    w = compress_weight(torch.randn(48, 80) * 0.02, cfg)
    x = inputs(2, 80, torch.float32)
    check_close(frozen_matmul(x, w.frozen, cfg, w.shape, w.shared), x, w.decode_frozen())
    with pytest.raises(UnsupportedPath) as e:
        frozen_matmul(x, w.frozen, cfg, w.shape, w.shared, path="cpu")
    assert "\n" not in str(e.value) and f"format {fmt!r}" in str(e.value)


def test_forced_unsupported_paths_raise_one_line():
    cfg, stored, shared, _ = compressed("vq2x4", (100, 37), "plain")
    x = inputs(5, 37, torch.float32)
    with pytest.raises(UnsupportedPath) as e:
        frozen_matmul(x, stored, cfg, (100, 37), shared, path="cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("path 'cpu' cannot serve this call:") and "1..4 tokens" in msg
    with pytest.raises(ValueError, match="unknown path 'gpu'"):
        frozen_matmul(x, stored, cfg, (100, 37), shared, path="gpu")
    with pytest.raises(ValueError, match="q = 37"):
        frozen_matmul(inputs(1, 36, torch.float32), stored, cfg, (100, 37), shared)
    assert unsupported_reason("cpu", cfg, "cpu", torch.float32, 1, (100, 37)).startswith("vectors cross rows")


def test_avx512_build_failure_is_one_clear_reason(monkeypatch, tmp_path):
    """A compiler that fails gives a one-line reason (and the path is simply not offered). The build needs no
    AVX-512 CPU, so this runs on any x86-64 Linux host."""
    if cpu_avx512._platform_reason() is not None:
        pytest.skip(f"the AVX-512 kernel is built on x86-64 Linux only: {cpu_avx512._platform_reason()}")
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("REALLM_KERNEL_CACHE", str(tmp_path))
    path, why = cpu_avx512.compile_library()
    assert path is None and why.startswith("compiling the AVX-512 kernel with false failed") and "\n" not in why
    if cpu_avx512.machine_reason() is None or "compil" in cpu_avx512.machine_reason():
        lib, why = cpu_avx512._library.__wrapped__()
        assert lib is None and why.startswith("compiling the AVX-512 kernel with false failed")


def test_avx512_kernel_compiles_and_links_where_it_cannot_run(monkeypatch, tmp_path):
    """The C kernel's source compiles with its AVX-512 flags and exports its two entry points on any x86-64 Linux
    host with a C compiler, so CI checks the build even on a CPU without AVX-512 (where its numeric tests skip)."""
    if cpu_avx512._platform_reason() is not None:
        pytest.skip(f"the AVX-512 kernel is built on x86-64 Linux only: {cpu_avx512._platform_reason()}")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler on this host (set CC, or install gcc)")
    monkeypatch.setenv("REALLM_KERNEL_CACHE", str(tmp_path))
    path, why = cpu_avx512.compile_library()
    assert why is None and path is not None and path.parent == tmp_path and path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary build directory is gone
    lib = ctypes.CDLL(str(path))  # loading runs no AVX-512 instruction
    assert lib.reallm_lut_build is not None and lib.reallm_lut_tasks is not None
    assert cpu_avx512.compile_library() == (path, None)  # built once per source and flags


def test_every_cpu_path_this_machine_can_run_is_offered():
    """What CI can run here is not among the skipped: the Numba path is offered, the AVX-512 path is either offered or
    refused only for the CPU's missing instructions (never a build failure), and Triton's interpreter is importable."""
    assert cpu_lut.machine_reason() is None  # numba is installed (dev extras) and the host is little-endian
    cfg = CompressionConfig(quantizer="nf", bits=3)
    assert "cpu" in available_paths(cfg, "cpu", torch.float32, 1, (64, 128))
    why = cpu_avx512.machine_reason()
    if why is not None and cpu_avx512._platform_reason() is None:
        assert why.startswith("this CPU lacks avx512"), why
    if TRITON_WHEELS:
        assert triton.__version__


def test_prepare_holds_little_and_reports_missing_codebook():
    cfg, stored, shared, _ = compressed("vq3x2", (172, 64), "perm")
    prep = prepare(stored, cfg, (172, 64), shared)
    assert prep.codes.data_ptr() == stored["codes"].data_ptr()  # referenced, not copied
    # permutation: 6 row blocks of 32 rows × 64 columns in int16; table: 64 codewords × 2 in fp32
    assert prep.held_bytes() == 6 * 64 * 2 + 64 * 2 * 4
    assert prep.held_bytes() < 0.2 * 172 * 64 * 2  # far below the dense fp16 size (2 bytes / weight)
    cfg_s, stored_s, shared_s, _ = compressed("vq3x2", (172, 64), "shared")
    with pytest.raises(ValueError, match="codebook"):
        prepare(stored_s, cfg_s, (172, 64), None)
    with pytest.raises(ValueError, match="format 'rtn'"):
        prepare(stored, CompressionConfig(quantizer="rtn", bits=3), (172, 64))
