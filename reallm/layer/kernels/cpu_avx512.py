"""CPU path "cpu_avx512": the lookup-table matvec, 16 rows at a time with AVX-512.

Same arithmetic as `reallm.layer.kernels.cpu_lut` (for each input group of g values, its dot products
with the K table entries, computed once per row block; then one look-up per code), but
vectorised *across rows*: 16 rows are processed together, and for one input group their 16
codes index the same LUT row. With K ≤ 64 that row sits in four zmm registers and two
`vpermi2ps` and a blend look all 16 up at once (the scalar path spends ~6 instructions per
code, this one < 1); with K ≤ 256 (VQ b2 d4, b4 d2, NF b ≥ 7) the 16 look-ups are one gather
(or, for a permuted matrix whose per-row-block LUT would not fit a cache-sized chunk, g gathers
of the codeword values, multiplied by the permuted x: no LUT at all).

Codes are read as stored: a run of 8 codes of w ≤ 8 bits is w bytes, loaded as one 64-bit word
per row (a gather over the 16 rows); `vpmultishiftqb` cuts the 8 codes into bytes and one
`vpermt2b` lines code j of the 16 rows up as sixteen 32-bit indices. Scale blocks are
dequantised on the fly (offset + code / (2^bits − 1) · group max).

Served (`unsupported_reason`): LUT tables of K ≤ 256 entries — NF2 / NF3 (g = 2), NF4..NF8
(g = 1), VQ with b·d ≤ 8 (b3 d2, b2 d2, b2 d4, b4 d2, ...) —; rows made of whole scale blocks (q % B0 == 0) whose block
holds whole runs of 8 codes (B0 % 8g == 0); 1–4 tokens; an x86-64 CPU with AVX-512
F/BW/DQ/VL/VBMI (Ice Lake, Sapphire Rapids, Zen 4 and later) on Linux; a C compiler. Other
matrices go to the scalar path.

Build: the C source below is compiled once per machine with the system C compiler (`$CC`, else
gcc / cc) into `$REALLM_KERNEL_CACHE` (default `~/.cache/reallm/kernels`), named by the hash
of source and flags, written atomically; nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reallm.weight.config import CompressionConfig

from .backend import FusedBackend
from .cpu_lut import group_table
from .prepare import PreparedFrozen, common_reason, values_per_code

__all__ = ["BACKEND", "MAX_TOKENS", "Avx512LutBackend", "compile_library", "machine_reason", "unsupported_reason",
           "avx512_frozen_matmul", "group_size"]

MAX_TOKENS = 4
_REGISTER_WIDTH = 6  # K = 2^w ≤ 64: the LUT of one group is four zmm registers
_MAX_WIDTH = 8  # K ≤ 256: the 16 look-ups are one gather from the group's LUT row
_NO_PERM_ROWS_PER_TASK = 256  # rows of one call without permutation (a multiple of the 16-row tile)
_LUT_CHUNK_BYTES = 1024 * 1024  # LUT of one column chunk: half a core's L2
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vbmi",
          "-fno-strict-aliasing"]

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* lut[(grp * T + t) * LS + k] = sum_i tbp[i * LS + k] * x[t * q + grp * g + i], LS = 64 or 256 entries
   per LUT row; tbp is the (g, LS) transposed table, zero-padded above K, so LUT rows are too. */
void reallm_lut_build(const float *restrict x, int64_t T, int64_t q, const float *restrict tbp, int64_t g,
                      int64_t LS, float *restrict lut) {
    int64_t ng = q / g;
    for (int64_t grp = 0; grp < ng; ++grp)
        for (int64_t t = 0; t < T; ++t) {
            const float *xg = x + t * q + grp * g;
            float *L = lut + (grp * T + t) * LS;
            for (int64_t k0 = 0; k0 < LS; k0 += 64) {
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t i = 0; i < g; ++i) {
                    const __m512 xi = _mm512_set1_ps(xg[i]);
                    const float *tb = tbp + i * LS + k0;
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(tb), xi, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(tb + 16), xi, a1);
                    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(tb + 32), xi, a2);
                    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(tb + 48), xi, a3);
                }
                _mm512_storeu_ps(L + k0, a0);
                _mm512_storeu_ps(L + k0 + 16, a1);
                _mm512_storeu_ps(L + k0 + 32, a2);
                _mm512_storeu_ps(L + k0 + 48, a3);
            }
        }
}

typedef struct {
    const uint8_t *codes; int64_t n_code_bytes; int64_t w; int64_t g; int64_t q; int64_t p;
    const uint8_t *scode; const float *gmax; float offset; float levels; int64_t sgroup; int64_t B;
    int64_t chunk_groups; float *out;
    const float *xp; const float *tbt;  /* MODE 3: the task's inputs (T, q) and the (g, 256) table */
} args_t;

/* out[t, r] += sum over the codes of rows [r0, r1) (16-row tiles), LUT of those rows' inputs.
   MODE 0: K <= 32 (one vpermi2ps), 1: K = 64 (two and a blend), 2: K <= 256 (a gather from the
   LUT row, LS = 256), 3: no LUT: gather the g codeword values and multiply by x (for permuted
   matrices with K > 64 whose per-row-block LUT would not stay in the cache). */
static inline __attribute__((always_inline)) void rows_body(const args_t *a, const float *lut, int64_t r0,
                                                            int64_t r1, const int T, const int MODE) {
    const int64_t LS = MODE >= 2 ? 256 : 64;
    const int64_t ng = a->q / a->g, cpb = a->B / a->g, row_bytes = ng * a->w / 8, bpr = a->q / a->B;
    const __m512i mask = _mm512_set1_epi32((1 << a->w) - 1);
    const __m512i bit5 = _mm512_set1_epi32(32);
    /* vpmultishiftqb control: byte k of every qword takes the 8 bits starting at bit k*w */
    uint8_t ctl[64], sel[8][64];
    for (int i = 0; i < 64; ++i) ctl[i] = (uint8_t)((i % 8) * a->w);
    /* vpermt2b selectors: dword lane i (row i of the tile) <- byte j of qword i of (lo, hi) */
    for (int j = 0; j < 8; ++j)
        for (int i = 0; i < 64; ++i) sel[j][i] = (uint8_t)(i % 4 ? 0 : (i / 4) * 8 + j);
    const __m512i shift_ctl = _mm512_loadu_si512((const void *)ctl);
    __m512i selj[8];
    for (int j = 0; j < 8; ++j) selj[j] = _mm512_loadu_si512((const void *)sel[j]);
    const __mmask64 low_byte = 0x1111111111111111ULL;
    for (int64_t c0 = 0; c0 < ng; c0 += a->chunk_groups) {
        int64_t c1 = c0 + a->chunk_groups < ng ? c0 + a->chunk_groups : ng;
        for (int64_t rt = r0; rt < r1; rt += 16) {
            int64_t nr = r1 - rt < 16 ? r1 - rt : 16;
            int64_t ro[16];
            for (int i = 0; i < 16; ++i) ro[i] = (rt + (i < nr ? i : nr - 1)) * row_bytes;
            const __m512i ro_lo = _mm512_loadu_si512((const void *)ro);
            const __m512i ro_hi = _mm512_loadu_si512((const void *)(ro + 8));
            int64_t last = ro[15] > ro[7] ? ro[15] : ro[7];
            __m512 tot[4];
            for (int t = 0; t < T; ++t) tot[t] = _mm512_setzero_ps();
            for (int64_t b0 = c0; b0 < c1; b0 += cpb) {  /* one scale block of every row */
                __m512 acc[4];
                for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
                for (int64_t v = b0; v < b0 + cpb; v += 8) {  /* one run of 8 codes = w bytes per row */
                    int64_t off = (v / 8) * a->w;
                    __m512i lo, hi;
                    if (last + off + 8 <= a->n_code_bytes) {  /* 64-bit loads stay inside the stream */
                        const __m512i o = _mm512_set1_epi64(off);
                        lo = _mm512_i64gather_epi64(_mm512_add_epi64(ro_lo, o), (const void *)a->codes, 1);
                        hi = _mm512_i64gather_epi64(_mm512_add_epi64(ro_hi, o), (const void *)a->codes, 1);
                    } else {  /* the stream's last bytes: copy what exists */
                        uint64_t wd[16];
                        for (int i = 0; i < 16; ++i) {
                            int64_t at = ro[i] + off, n = a->n_code_bytes - at < 8 ? a->n_code_bytes - at : 8;
                            wd[i] = 0;
                            memcpy(&wd[i], a->codes + at, (size_t)n);
                        }
                        lo = _mm512_loadu_si512((const void *)wd);
                        hi = _mm512_loadu_si512((const void *)(wd + 8));
                    }
                    /* byte j of qword i = code j of row i (+ junk above bit w) */
                    const __m512i flo = _mm512_multishift_epi64_epi8(shift_ctl, lo);
                    const __m512i fhi = _mm512_multishift_epi64_epi8(shift_ctl, hi);
                    for (int j = 0; j < 8; ++j) {
                        __m512i idx = _mm512_maskz_permutex2var_epi8(low_byte, flo, selj[j], fhi);
                        /* vpermi2ps reads bits 0..4 (and the blend bit 5): junk above bit w matters
                           only when w < 5; a gather reads the whole index */
                        if (a->w < 5 || (MODE >= 2 && a->w < 8)) idx = _mm512_and_si512(idx, mask);
                        if (MODE == 3) {
                            for (int64_t i = 0; i < a->g; ++i) {
                                const __m512 wi = _mm512_i32gather_ps(idx, a->tbt + i * 256, 4);
                                for (int t = 0; t < T; ++t)
                                    acc[t] = _mm512_fmadd_ps(
                                        wi, _mm512_set1_ps(a->xp[t * a->q + (v + j) * a->g + i]), acc[t]);
                            }
                            continue;
                        }
                        const float *L = lut + (v + j) * T * LS;
                        __mmask16 up = MODE == 1 ? _mm512_test_epi32_mask(idx, bit5) : 0;
                        for (int t = 0; t < T; ++t) {
                            const float *Lt = L + t * LS;
                            __m512 val;
                            if (MODE == 2) {
                                val = _mm512_i32gather_ps(idx, Lt, 4);
                            } else {
                                val = _mm512_permutex2var_ps(_mm512_loadu_ps(Lt), idx, _mm512_loadu_ps(Lt + 16));
                                if (MODE == 1) {
                                    __m512 v23 = _mm512_permutex2var_ps(_mm512_loadu_ps(Lt + 32), idx,
                                                                        _mm512_loadu_ps(Lt + 48));
                                    val = _mm512_mask_blend_ps(up, val, v23);
                                }
                            }
                            acc[t] = _mm512_add_ps(acc[t], val);
                        }
                    }
                }
                float sc[16];
                for (int i = 0; i < 16; ++i) {
                    int64_t blk = (rt + (i < nr ? i : nr - 1)) * bpr + b0 / cpb;
                    sc[i] = a->offset + (float)a->scode[blk] / a->levels * a->gmax[blk / a->sgroup];
                }
                __m512 s = _mm512_loadu_ps(sc);
                for (int t = 0; t < T; ++t) tot[t] = _mm512_fmadd_ps(acc[t], s, tot[t]);
            }
            for (int t = 0; t < T; ++t) {
                float o[16];
                _mm512_storeu_ps(o, tot[t]);
                for (int i = 0; i < nr; ++i) a->out[t * a->p + rt + i] += o[i];
            }
        }
    }
}

static void rows(const args_t *a, const float *lut, int64_t r0, int64_t r1, int64_t T, int mode) {
#define CASE(TT) case TT: \
    if (mode == 3) rows_body(a, lut, r0, r1, TT, 3); \
    else if (mode == 2) rows_body(a, lut, r0, r1, TT, 2); \
    else if (mode == 1) rows_body(a, lut, r0, r1, TT, 1); \
    else rows_body(a, lut, r0, r1, TT, 0); \
    break;
    switch (T) { CASE(1) CASE(2) CASE(3) CASE(4) default: break; }
#undef CASE
}

/* Tasks [task_begin, task_end) of rows_per_task rows. With a permutation (perm16 or perm32:
   (n_row_blocks, q), one task per row block) each task gathers x into xp and builds its LUT in
   lut; without, lut is the shared LUT of x, built by the caller. */
void reallm_lut_tasks(const float *x, int64_t T, const int16_t *perm16, const int32_t *perm32,
                      int64_t rows_per_task, int64_t task_begin, int64_t task_end, float *xp, float *lut,
                      const float *tb_t, int64_t K, const uint8_t *codes, int64_t n_code_bytes, int64_t w,
                      int64_t g, int64_t q, int64_t p, const uint8_t *scode, const float *gmax, float offset,
                      float levels, int64_t sgroup, int64_t B, int64_t chunk_groups, float *out) {
    int permuted = perm16 || perm32;
    args_t a = {codes, n_code_bytes, w, g, q, p, scode, gmax, offset, levels, sgroup, B, chunk_groups, out,
                permuted ? xp : x, tb_t};
    /* a permuted matrix rebuilds its LUT per row block: with K > 64 and a LUT larger than one
       cache-sized chunk, gathering the codeword values themselves costs less */
    int mode = K > 64 ? (permuted && q / g > chunk_groups ? 3 : 2) : K > 32 ? 1 : 0;
    int64_t LS = mode >= 2 ? 256 : 64;
    for (int64_t task = task_begin; task < task_end; ++task) {
        int64_t r0 = task * rows_per_task, r1 = r0 + rows_per_task < p ? r0 + rows_per_task : p;
        if (permuted) {
            for (int64_t t = 0; t < T; ++t)
                for (int64_t j = 0; j < q; ++j) {
                    int64_t col = perm16 ? (int64_t)perm16[task * q + j] : (int64_t)perm32[task * q + j];
                    xp[t * q + j] = x[t * q + col];
                }
            if (mode != 3) reallm_lut_build(xp, T, q, tb_t, g, LS, lut);
        }
        rows(&a, lut, r0, r1, T, mode);
    }
}
"""


def group_size(config: CompressionConfig, q: int | None) -> int:
    """Values per look-up g: d for VQ; for NF 2 while the pair table fits in registers (b ≤ 3,
    K = 2^(2b) ≤ 64), else 1 (one level per look-up)."""
    if values_per_code(config) > 1:
        return values_per_code(config)
    return 2 if 2 * config.bits <= _REGISTER_WIDTH else 1


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("REALLM_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reallm" / "kernels"


def _platform_reason() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"
    return None


def compile_library() -> tuple[Path | None, str | None]:
    """Compile the C source into the kernel cache, once per source and flags: (the library's path, None) or
    (None, why not). Needs Linux on x86-64 and a C compiler (`$CC`, else gcc / cc), not an AVX-512 CPU: the
    compiler emits AVX-512 code on any x86-64 host, so the build is checked where the kernel cannot run."""
    why = _platform_reason()
    if why is not None:
        return None, why
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None, "no C compiler found (set CC, or install gcc)"
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    lib_path = out_dir / f"reallm_lut_avx512_{digest}.so"
    if not lib_path.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                src = Path(tmp) / "lut_avx512.c"
                src.write_text(_SOURCE)
                tmp_lib = Path(tmp) / lib_path.name
                proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(tmp_lib)], capture_output=True, text=True)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                    return None, f"compiling the AVX-512 kernel with {cc} failed: {last}"
                os.replace(tmp_lib, lib_path)  # atomic: a concurrent build never leaves half a file
        except OSError as e:
            return None, f"cannot write the compiled kernel under {out_dir}: {e}"
    return lib_path, None


@cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the compiled library, None) or (None, why it is unavailable); built once per machine."""
    why = _platform_reason()
    if why is not None:
        return None, why
    missing = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vbmi"} - _cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    lib_path, why = compile_library()
    if lib_path is None:
        return None, why
    lib = ctypes.CDLL(str(lib_path))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.reallm_lut_build.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr]
    lib.reallm_lut_build.restype = None
    lib.reallm_lut_tasks.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64,
                                     i64, ptr, ptr, f32, f32, i64, i64, i64, ptr]
    lib.reallm_lut_tasks.restype = None
    return lib, None


def machine_reason() -> str | None:
    """Why this machine cannot run the AVX-512 path at all (CPU, OS, compiler), or None; builds
    the library on first call."""
    return _library()[1]


def unsupported_reason(
    config: CompressionConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    n_tokens: int,
    shape: tuple[int, int] | None = None,
) -> str | None:
    """Why the AVX-512 path cannot serve this call, or None when it can (arguments as in
    `reallm.layer.kernels.cpu_lut.unsupported_reason`)."""
    if torch.device(device).type != "cpu":
        return f"the CPU path runs on CPU tensors, got device {torch.device(device)}"
    common = common_reason(config, dtype, n_tokens, MAX_TOKENS, "AVX-512")
    if common is not None:
        return common
    g = group_size(config, None)
    if g * config.bits > _MAX_WIDTH:
        return f"its table has 2^{g * config.bits} entries per look-up, more than 256"
    if config.block_size % (8 * g):
        return f"block size {config.block_size} is not a multiple of 8 codes ({8 * g} values)"
    if shape is not None and shape[1] % config.block_size:
        return f"scale blocks cross rows (q = {shape[1]} is not a multiple of {config.block_size})"
    _, why = _library()
    return why



_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="reallm-avx512")
    return _POOL


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def avx512_frozen_matmul(x: Tensor, prep: PreparedFrozen, config: CompressionConfig) -> Tensor:
    """z = x · X̂ᵀ (T, p) in fp32, X̂ the stored (rotated) matrix with its permutation undone.

    Args:
        x: (T, q), already rotated when the matrix is (see `reallm.layer.kernels.backend.FusedBackend`).
        prep: the prepared frozen part (CPU tensors).
        config: its configuration.
    """
    lib, why = _library()
    if lib is None:
        raise RuntimeError(why)
    p, q = prep.shape
    T = x.shape[0]
    g = group_size(config, q)
    table = group_table(prep, g)  # (K, g)
    K = table.shape[0]
    row = 64 if K <= 64 else 256  # LUT row: 64 entries (in registers) or 256 (gathered)
    tb_t = np.zeros((g, row), dtype=np.float32)  # (g, row): the table transposed, zero above K
    tb_t[:, :K] = table.numpy().T
    xf = np.ascontiguousarray(x.to(torch.float32).numpy())  # (T, q)
    codes = prep.codes.numpy()
    scode = prep.scale_codes.numpy()
    gmax = np.ascontiguousarray(prep.scale_group_max.numpy())
    out = np.zeros((T, p), dtype=np.float32)
    ng = q // g
    lut_floats = ng * T * row
    cpb = prep.block_size // g
    chunk_groups = max(1, _LUT_CHUNK_BYTES // (T * row * 4 * cpb)) * cpb
    perm16 = perm32 = None
    if prep.perm is not None:
        perm = prep.perm.numpy()
        perm16, perm32 = (perm, None) if perm.dtype == np.int16 else (None, perm)
        rows_per_task = prep.permute_rows
        shared_lut = None
    else:
        rows_per_task = _NO_PERM_ROWS_PER_TASK
        shared_lut = np.empty(lut_floats, dtype=np.float32)
        lib.reallm_lut_build(_ptr(xf), T, q, _ptr(tb_t), g, row, _ptr(shared_lut))
    n_tasks = -(-p // rows_per_task)
    n_threads = max(1, min(torch.get_num_threads(), n_tasks))
    bounds = [n_tasks * i // n_threads for i in range(n_threads + 1)]

    def run(begin: int, end: int) -> None:
        if shared_lut is None:
            xp, lut = np.empty(T * q, dtype=np.float32), np.empty(lut_floats, dtype=np.float32)
        else:
            xp, lut = xf, shared_lut
        lib.reallm_lut_tasks(
            _ptr(xf), T, _ptr(perm16) if perm16 is not None else None, _ptr(perm32) if perm32 is not None else None,
            rows_per_task, begin, end, _ptr(xp), _ptr(lut), _ptr(tb_t), K, _ptr(codes), codes.size,
            g * prep.bits, g, q, p, _ptr(scode), _ptr(gmax), float(prep.scale_offset.item()),
            float((1 << prep.scale_bits) - 1), prep.scale_group, prep.block_size, chunk_groups, _ptr(out))

    futures = [_pool().submit(run, bounds[i], bounds[i + 1]) for i in range(1, n_threads)]
    run(bounds[0], bounds[1])  # the calling thread takes the first share
    for f in futures:
        f.result()
    return torch.from_numpy(out)


class Avx512LutBackend(FusedBackend):
    """Backend "cpu_avx512": the lookup-table matvec in C with AVX-512 (`avx512_frozen_matmul`), 1–4 tokens."""

    name = "cpu_avx512"

    def unavailable_reason(self) -> str | None:
        return machine_reason()

    def unsupported_reason(self, config: CompressionConfig, device: torch.device | str, dtype: torch.dtype,
                           n_tokens: int, shape: tuple[int, int] | None = None) -> str | None:
        return unsupported_reason(config, device, dtype, n_tokens, shape)

    def kernel(self, x: Tensor, prep: PreparedFrozen, config: CompressionConfig, out_dtype: torch.dtype) -> Tensor:
        return avx512_frozen_matmul(x, prep, config)  # (T, p) fp32


BACKEND = Avx512LutBackend()
