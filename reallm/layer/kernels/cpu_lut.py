"""CPU path: lookup-table matvec over the packed codes, compiled with Numba (batch 1–4 tokens).

y[t, r] = Σ_blocks s_blk · Σ_{codes v of row r in blk} LUT[t, v − v_row, code_v]

- LUT (the "lookup-table matvec"): for each input group of g values (the permuted x of the row
  block when the matrix is permuted), the dot products with all K table entries, computed once
  per row block (per matrix without permutation); then every code costs one lookup and one add
  per token. For VQ the table is the codebook (g = d); for NF it is the product table of g
  consecutive levels (g = 2 for NF3 / NF4, 4 for NF2), whose index is exactly the g·b-bit field
  of g consecutive b-bit codes in the little-endian stream. Used when K = 2^(g·b) ≤ 256.
- "dot" mode, for larger tables (VQ b·d > 8, e.g. b = 2, d = 8 with 65536 codewords): every code
  costs the d-term dot product of its codeword with the input group.
- Codes are read from the stored byte stream as stored: a run of 8 codes is exactly `width`
  bytes, so the inner loop, generated per (width, tokens, mode) and compiled once per machine (a cache on disk),
  reads those bytes and cuts the 8 codes with constant shifts; codes at the edges of a row or a
  scale block (shapes whose rows or blocks do not start on an 8-code boundary) are cut one by one.
- Block scales are dequantised on the fly from the stored uint8 codes (8 bits read per block).
- Rotation is applied to x and y (see `reallm.layer.kernels.backend.FusedBackend`), outside this module.

Limits (`unsupported_reason`): q must be a multiple of the group g (a VQ vector must not cross
a row); 1–4 tokens; x in fp32 / bf16 / fp16 on the CPU (computed in fp32).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reallm.core.io import atomic_write_text
from reallm.weight.config import CompressionConfig

from .backend import FusedBackend
from .prepare import PreparedFrozen, common_reason, values_per_code

__all__ = ["BACKEND", "MAX_TOKENS", "NumbaLutBackend", "unsupported_reason", "cpu_frozen_matmul"]

MAX_TOKENS = 4  # past a few tokens decode-then-GEMM (one BLAS call) wins over per-token lookups
_LUT_MAX_WIDTH = 8  # K ≤ 256: the LUT of one input group stays within 1 KB per token
_CODES_PER_RUN = 8  # 8 codes of w bits = w bytes: every run starts on a byte boundary
_ACCUMULATORS = 4  # independent partial sums per token (hides the latency of the float adds)
_NO_PERM_ROWS_PER_TASK = 128  # rows sharing one pass over the LUT chunks (L2 reuse)
_LUT_CHUNK_BYTES = 1024 * 1024  # LUT of one column chunk: half a core's L2, beside the streamed codes


def _numba() -> Any:
    """The numba module, or None when it is not installed (the path is then unavailable)."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def group_size(config: CompressionConfig, q: int | None) -> int:
    """Values per lookup g: d for VQ; for NF the largest of 4 (b = 2) / 2 (b ≤ 4) / 1 that
    divides q and the block size and keeps K = 2^(g·b) ≤ 256."""
    if values_per_code(config) > 1:
        return values_per_code(config)
    for g in (4, 2, 1):
        if g * config.bits <= _LUT_MAX_WIDTH and config.block_size % g == 0 and (q is None or q % g == 0):
            return g
    return 1


def unsupported_reason(
    config: CompressionConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    n_tokens: int,
    shape: tuple[int, int] | None = None,
) -> str | None:
    """Why the CPU path cannot serve this call, or None when it can.

    Args:
        config: the matrix's compression configuration.
        device: device of x and of the stored tensors.
        dtype: dtype of x.
        n_tokens: rows of x (tokens in the batch).
        shape: (p, q) of the weight, when known (shape-dependent limits are checked then).
    """
    if torch.device(device).type != "cpu":
        return f"the CPU path runs on CPU tensors, got device {torch.device(device)}"
    if sys.byteorder != "little":
        return _BIG_ENDIAN
    common = common_reason(config, dtype, n_tokens, MAX_TOKENS, "CPU")
    if common is not None:
        return common
    d = values_per_code(config)
    if shape is not None and d > 1 and shape[1] % d:
        return f"vectors cross rows (q = {shape[1]} is not a multiple of d = {d})"
    if _numba() is None:
        return _NO_NUMBA
    return None


_BIG_ENDIAN = "the CPU path assumes a little-endian host"
_NO_NUMBA = "numba is not installed (pip install numba)"


def machine_reason() -> str | None:
    """Why this process cannot run the CPU path at all (a big-endian host, no numba), or None."""
    if sys.byteorder != "little":
        return _BIG_ENDIAN
    return _NO_NUMBA if _numba() is None else None



# ---------------------------------------------------------------------------------------------
# generated row kernel
# ---------------------------------------------------------------------------------------------
def _cut_code(j: int, width: int) -> str:
    """Expression of code j (0..7) of a run, from the run's bytes b0..b{width-1} (uint64 locals).

    Everything on the hot path is unsigned: numba then skips the negative-index wraparound."""
    lo = j * width
    terms = []
    for k in range(lo // 8, (lo + width - 1) // 8 + 1):
        shift = 8 * k - lo
        terms.append(f"(b{k} << U({shift}))" if shift > 0 else f"(b{k} >> U({-shift}))" if shift < 0 else f"b{k}")
    return f"({' | '.join(terms)}) & U({(1 << width) - 1})"


def _code_update(mode: str, n_tokens: int, g: int, k_entries: int, local: str, acc: int, ind: str) -> list[str]:
    """Statements adding the contribution of code `c` (uint64) at local code index `local`
    (a uint64 expression) to accumulator `acc`."""
    lines = []
    for t in range(n_tokens):
        if mode == "lut":  # lut layout (n_groups, T, K)
            lines.append(f"{ind}a{t}_{acc} += lut[({local}) * U({n_tokens * k_entries}) + U({t * k_entries}) + c]")
        else:  # dot: table (K, g), xp (T, q)
            lines.append(f"{ind}a{t}_{acc} += codeword_dot(tb, c, xp, {t}, xo + ({local}) * U({g}))")
    return lines


def _row_source(width: int, n_tokens: int, mode: str, g: int, k_entries: int) -> str:
    """Python source of `row_dot(...)`: adds to out[:, r] the contribution of the codes
    [v_row, v_row + n_codes_row) of row r (a column chunk), for `n_tokens` tokens; `lut` holds the
    chunk's groups from local index 0, `xp[:, xoff:]` its inputs (dot mode)."""
    T, A, W = n_tokens, _ACCUMULATORS, width
    mask = (1 << W) - 1
    L = []
    L.append("def row_dot(codes, lut, tb, xp, xoff, v_row, n_codes_row, cpb, scode, gmax, offset, levels, sgroup,"
             " out, r):")
    L.append("    xo = U(xoff)")
    for t in range(T):
        L.append(f"    y{t} = 0.0")
    # block and group indices advance by one per block: no integer division inside the row
    L.append("    v = v_row")
    L.append("    v_end = v_row + n_codes_row")
    L.append("    blk = v // cpb")
    L.append("    se = blk * cpb")
    L.append("    grp = blk // sgroup")
    L.append("    grp_end = (grp + 1) * sgroup")
    L.append("    while v < v_end:")
    L.append("        se = min(se + cpb, v_end)")
    L.append("        s = offset + np.float32(scode[blk]) / levels * gmax[grp]")
    for t in range(T):
        L.append("        " + " = ".join(f"a{t}_{a}" for a in range(A)) + " = np.float32(0.0)")
    # head / tail: one code at a time (bit position v * W, at most 3 bytes)
    single = [
        "bit = U(v) * U(W)",
        "i = bit >> U(3)",
        "sh = bit & U(7)",
        "word = U(codes[i])",
        "if sh + U(W) > U(8):",
        "    word |= U(codes[i + U(1)]) << U(8)",
        "if sh + U(W) > U(16):",
        "    word |= U(codes[i + U(2)]) << U(16)",
        f"c = (word >> sh) & U({mask})",
    ]
    single = [s.replace("W", str(W)) for s in single]
    L.append("        while v < se and (v & 7) != 0:")
    L += ["            " + s for s in single]
    L += _code_update(mode, T, g, k_entries, "U(v - v_row)", 0, "            ")
    L.append("            v += 1")
    L.append(f"        while v + {_CODES_PER_RUN} <= se:")
    L.append(f"            bi = U(v >> 3) * U({W})")
    for k in range(W):
        L.append(f"            b{k} = U(codes[bi + U({k})])")
    L.append("            vl = U(v - v_row)")
    for j in range(_CODES_PER_RUN):
        L.append(f"            c = {_cut_code(j, W)}")
        L += _code_update(mode, T, g, k_entries, f"vl + U({j})", j % A, "            ")
    L.append(f"            v += {_CODES_PER_RUN}")
    L.append("        while v < se:")
    L += ["            " + s for s in single]
    L += _code_update(mode, T, g, k_entries, "U(v - v_row)", 0, "            ")
    L.append("            v += 1")
    for t in range(T):
        L.append(f"        y{t} += s * (" + " + ".join(f"a{t}_{a}" for a in range(A)) + ")")
    L.append("        blk += 1")
    L.append("        if blk == grp_end:")
    L.append("            grp += 1")
    L.append("            grp_end += sgroup")
    for t in range(T):
        L.append(f"    out[{t}, r] += y{t}")
    return "\n".join(L) + "\n"


# Kernels, compiled once per machine per key. They release the GIL: a call splits its row tasks into one
# contiguous range per thread and runs them on a small Python thread pool (numba's own parallel loops would cost
# a second, slower compilation per key, and its default threading layer must not be entered by two threads at
# once). Compiling one key takes 1–40 s (its unrolled row loop grows with tokens and code width), so each key's
# source is written once as a module file in the kernel cache directory and compiled with numba's on-disk cache:
# a later process loads the machine code instead of compiling again. The file name is the digest of the source
# and numba's version, so a changed generator or numba never reads a stale kernel.
_KERNELS: dict[tuple, Any] = {}
_POOL: ThreadPoolExecutor | None = None

_COMMON_SOURCE = """
@njit(fastmath=True, inline="always", cache=True)
def codeword_dot(tb, c, xp, t, base):
    \"\"\"sum_i tb[c, i] * xp[t, base + i]: one codeword against its input group.\"\"\"
    s = np.float32(0.0)
    for i in range(tb.shape[1]):
        s += tb[c, i] * xp[t, base + i]
    return s


@njit(fastmath=True, nogil=True, cache=True)
def build_lut(xp, tb_t, lut):
    \"\"\"lut[(grp * T + t) * K + k] = sum_i tb[k, i] * xp[t, grp*g + i]; tb_t is tb transposed (g, K).\"\"\"
    T, q = xp.shape
    gg, K = tb_t.shape
    for grp in range(q // gg):
        for t in range(T):
            base = (grp * T + t) * K
            for k in range(K):
                lut[base + k] = np.float32(0.0)
            for i in range(gg):
                xv = xp[t, grp * gg + i]
                for k in range(K):
                    lut[base + k] += tb_t[i, k] * xv
"""

_ROWS_SOURCE = """
@njit(fastmath=True, nogil=True, cache=True)
def rows(x, perm, rows_per_task, task_begin, task_end, chunk, shared_lut, codes, tb, tb_t, scode, gmax,
         offset, levels, sgroup, cpb, out):
    \"\"\"out[:, rows of tasks task_begin..task_end-1] += x (T, q) . X^T, by column chunks of `chunk` values (a
    multiple of g) so that a chunk's LUT stays in the core's cache while the task's rows use it. With a
    permutation (perm (n_row_blocks, q), one task per row block) each task gathers x through its block's column
    order and builds its LUT chunk by chunk; without (perm of shape (0, q)) `shared_lut` (the whole row's LUT)
    serves every task.\"\"\"
    T, q = x.shape
    p = out.shape[1]
    gg, K = tb_t.shape
    has_perm = perm.shape[0] > 0
    xp = np.empty((T, q), dtype=np.float32)
    lut = np.empty(chunk // gg * T * K if (USE_LUT and has_perm) else 1, dtype=np.float32)
    for task in range(task_begin, task_end):
        r0 = task * rows_per_task
        r1 = min(p, r0 + rows_per_task)
        if has_perm:
            for t in range(T):
                for j in range(q):
                    xp[t, j] = x[t, perm[task, j]]
        else:
            xp[:, :] = x
        for c0 in range(0, q, chunk):
            c1 = min(q, c0 + chunk)
            if not USE_LUT:
                chunk_lut = lut
            elif has_perm:
                build_lut(xp[:, c0:c1], tb_t, lut)
                chunk_lut = lut
            else:
                chunk_lut = shared_lut[c0 // gg * T * K:]
            for r in range(r0, r1):
                row_dot(codes, chunk_lut, tb, xp, c0, (r * q + c0) // gg, (c1 - c0) // gg, cpb, scode,
                        gmax, offset, levels, sgroup, out, r)
"""


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: $REALLM_KERNEL_CACHE, else $XDG_CACHE_HOME/reallm/kernels (default
    ~/.cache/reallm/kernels), else, when that cannot be created, a folder of the temporary directory."""
    configured = os.environ.get("REALLM_KERNEL_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reallm" / "kernels"
    for directory in ([Path(configured)] if configured else [base]) + [
            Path(tempfile.gettempdir()) / f"reallm-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"]:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if os.access(directory, os.W_OK):
                return directory
        except OSError:
            continue
    raise OSError("no writable directory for the compiled CPU kernels (set REALLM_KERNEL_CACHE)")


def kernel_module_source(width: int, n_tokens: int, mode: str, g: int, k_entries: int) -> str:
    """The whole module of one key: its row loop (`_row_source`), the row-task driver and the shared helpers,
    every function compiled with numba's on-disk cache."""
    row = _row_source(width, n_tokens, mode, g, k_entries).replace(
        "def row_dot(", "@njit(fastmath=True, cache=True)\ndef row_dot(", 1)
    header = (f'"""Generated by reallm.layer.kernels.cpu_lut for (width, tokens, mode, g, K) = '
              f'{(width, n_tokens, mode, g, k_entries)}."""\n\nimport numpy as np\nfrom numba import njit\n\n'
              f"U = np.uint64\nUSE_LUT = {mode == 'lut'}\n")
    return header + _COMMON_SOURCE + "\n\n" + row + _ROWS_SOURCE


def _load_kernel_module(key: tuple) -> ModuleType:
    source = kernel_module_source(*key)
    digest = hashlib.sha256((source + _numba().__version__).encode()).hexdigest()[:20]
    path = kernel_cache_dir() / f"cpu_lut_{digest}.py"
    if not path.is_file():
        atomic_write_text(path, source)  # two processes may write it at once: each rename is whole
    spec = importlib.util.spec_from_file_location(f"reallm_cpu_lut_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache finds the module of a cached function by its name
    spec.loader.exec_module(module)
    return module


def _kernel(width: int, n_tokens: int, mode: str, g: int, k_entries: int) -> Any:
    """The compiled module of one (width, tokens, mode, group, table size): `rows(...)`, the output rows of a
    range of row tasks (see `cpu_frozen_matmul`), and `build_lut`."""
    key = (width, n_tokens, mode, g, k_entries)
    if key not in _KERNELS:
        _KERNELS[key] = _load_kernel_module(key)
    return _KERNELS[key]


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="reallm-cpu-lut")
    return _POOL


def group_table(prep: PreparedFrozen, g: int) -> Tensor:
    """The (2^(g·b'), g) fp32 table of one lookup: the VQ codebook, or for NF the product table of
    g consecutive levels (entry k = levels[(k >> (b·i)) & (2^b − 1)] for i < g)."""
    if prep.values_per_code > 1 or g == 1:
        return prep.table
    key = f"cpu_nf_table_{g}"
    if key not in prep.cache:
        b = prep.bits
        k = torch.arange(1 << (g * b))
        idx = torch.stack([(k >> (b * i)) & ((1 << b) - 1) for i in range(g)], dim=1)  # (K, g)
        prep.cache[key] = prep.table[:, 0].cpu()[idx].contiguous()  # (K, g)
    return prep.cache[key]


def cpu_frozen_matmul(x: Tensor, prep: PreparedFrozen, config: CompressionConfig) -> Tensor:
    """z = x · X̂ᵀ (T, p) in fp32, X̂ the stored (rotated) matrix with its permutation undone.

    Args:
        x: (T, q) already rotated when the matrix is (see `reallm.layer.kernels.backend.FusedBackend`).
        prep: the prepared frozen part (CPU tensors).
        config: its configuration (for the group size of NF lookups).
    """
    p, q = prep.shape
    T = x.shape[0]
    g = group_size(config, q)
    table = group_table(prep, g)  # (K, g)
    K = table.shape[0]
    width = g * prep.bits
    mode = "lut" if width <= _LUT_MAX_WIDTH else "dot"
    kernel = _kernel(width, T, mode, g, K)
    rows, build_lut = kernel.rows, kernel.build_lut
    xf = x.to(torch.float32).contiguous().numpy()  # (T, q)
    tb = table.numpy()  # (K, g)
    tb_t = np.ascontiguousarray(tb.T)  # (g, K)
    if prep.perm is not None:
        perm, rows_per_task = prep.perm.numpy(), prep.permute_rows
        shared_lut = np.empty(1, dtype=np.float32)
    else:
        perm, rows_per_task = np.empty((0, q), dtype=np.int16), _NO_PERM_ROWS_PER_TASK
        shared_lut = np.empty((q // g) * T * K if mode == "lut" else 1, dtype=np.float32)
        if mode == "lut":
            build_lut(xf, tb_t, shared_lut)
    # column chunk: its LUT (chunk / g groups × T × K fp32) within _LUT_CHUNK_BYTES, a multiple of
    # 8·g values (whole runs of 8 codes) and of the block size when possible
    unit = 8 * g * prep.block_size // math.gcd(8 * g, prep.block_size)
    chunk = max(1, _LUT_CHUNK_BYTES // (4 * T * K * (unit // g))) * unit if mode == "lut" else q
    chunk = min(chunk, -(-q // g) * g)
    out = np.zeros((T, p), dtype=np.float32)
    args = (chunk, shared_lut, prep.codes.numpy(), tb, tb_t, prep.scale_codes.numpy(), prep.scale_group_max.numpy(),
            np.float32(prep.scale_offset.item()), np.float32((1 << prep.scale_bits) - 1),
            prep.scale_group, prep.block_size // g, out)
    n_tasks = -(-p // rows_per_task)
    n_threads = max(1, min(torch.get_num_threads(), n_tasks))
    bounds = [n_tasks * i // n_threads for i in range(n_threads + 1)]
    if n_threads == 1:
        rows(xf, perm, rows_per_task, 0, n_tasks, *args)
    else:
        futures = [_pool().submit(rows, xf, perm, rows_per_task, bounds[i], bounds[i + 1], *args)
                   for i in range(n_threads)]
        for f in futures:
            f.result()
    return torch.from_numpy(out)


class NumbaLutBackend(FusedBackend):
    """Backend "cpu": the lookup-table matvec compiled with Numba (`cpu_frozen_matmul`), 1–4 tokens."""

    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return machine_reason()

    def unsupported_reason(self, config: CompressionConfig, device: torch.device | str, dtype: torch.dtype,
                           n_tokens: int, shape: tuple[int, int] | None = None) -> str | None:
        return unsupported_reason(config, device, dtype, n_tokens, shape)

    def kernel(self, x: Tensor, prep: PreparedFrozen, config: CompressionConfig, out_dtype: torch.dtype) -> Tensor:
        return cpu_frozen_matmul(x, prep, config)  # (T, p) fp32


BACKEND = NumbaLutBackend()
