"""Triton path: fused dequantize-matmul of the NF / VQ frozen part, for 1–16 tokens.

One program computes BLOCK_R outputs (rows of Q̂) for BLOCK_T tokens, walking the columns in
tiles of BLOCK_C. For every (row, column) of a tile it reads the code of its value straight from
the packed little-endian stream (the 1–3 bytes holding bits [v·w, v·w + w) of code v, with
v = flat index // d), looks the value up in the level table / codebook, multiplies it by its
block scale (dequantised on the fly from the uint8 scale code and its group maximum), and
accumulates x · valueᵀ in fp32; the weight is never materialised in memory. With a column
permutation, all rows of a program lie in one row block (BLOCK_R divides permute_rows) and x is
gathered through that block's column order. Shapes need no alignment: scale blocks and VQ
vectors may cross rows (q not a multiple of B0 or of d).

Modes: compiled for CUDA tensors, or run by Triton's interpreter on CPU tensors (how the CPU-only
CI tests it). Triton fixes the mode of every `@triton.jit` function when it is decorated — its
own helpers (tl.sum, tl.zeros, ...) when triton is imported — so TRITON_INTERPRET=1 must be set
before triton is first imported; this module records the mode at its import and offers the CPU
tensors path only in interpreter mode. Not measured on a GPU yet (none was available while it
was written).
"""

import torch
from torch import Tensor

from reallm.weight.config import CompressionConfig

from .backend import FusedBackend
from .prepare import PreparedFrozen, common_reason

try:  # triton ships with CUDA builds of torch; on CPU it is a test dependency (the interpreter)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

__all__ = ["BACKEND", "MAX_TOKENS", "TritonBackend", "unsupported_reason", "triton_frozen_matmul", "interpreting"]

MAX_TOKENS = 16  # beyond this, decode once and use a dense GEMM (tensor cores) instead
_BLOCK_R = 16
_BLOCK_C = 64


_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """True when this process's Triton runs kernels in its interpreter (TRITON_INTERPRET=1 was set
    before import, and still is): the Triton path then serves CPU tensors, and not CUDA ones."""
    return _INTERPRETED and bool(triton.knobs.runtime.interpret)


def unsupported_reason(
    config: CompressionConfig,
    device: "torch.device | str",
    dtype: torch.dtype,
    n_tokens: int,
    shape: "tuple[int, int] | None" = None,
) -> "str | None":
    """Why the Triton path cannot serve this call, or None when it can.

    Args:
        config: the matrix's compression configuration.
        device: device of x and of the stored tensors.
        dtype: dtype of x.
        n_tokens: rows of x (tokens in the batch).
        shape: (p, q) of the weight (no shape limits apply: vectors and blocks may cross rows).
    """
    if triton is None:
        return "triton is not installed"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if interpreting():
            return "Triton runs in its interpreter in this process (TRITON_INTERPRET=1): CPU tensors only"
    elif dev.type == "cpu":
        if not interpreting():
            return ("on CPU tensors the Triton kernel runs only in Triton's interpreter "
                    "(TRITON_INTERPRET=1 set before triton is imported)")
    else:
        return f"device {dev} is not supported by the Triton path (cuda, or cpu with TRITON_INTERPRET=1)"
    return common_reason(config, dtype, n_tokens, MAX_TOKENS, "Triton")



if tl is not None:

    def _frozen_matmul_kernel(
        x_ptr, y_ptr, codes_ptr, table_ptr, scode_ptr, gmax_ptr, offset_ptr, perm_ptr,
        n_tokens, p, q, n_code_bytes, stride_xt, stride_yt, block_size, scale_group, permute_rows,
        scale_levels,
        CODE_WIDTH: tl.constexpr, VPC: tl.constexpr, HAS_PERM: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr,
    ):
        """y[t, r] = Σ_c x[t, col(r, c)] · table[code(r q + c)] · scale((r q + c) // block_size)."""
        pid_r = tl.program_id(0)
        pid_t = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
        toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (T,)
        row_ok = rows < p
        tok_ok = toks < n_tokens
        row_base = rows.to(tl.int64) * q  # (R,) flat index of each row's first value
        offset = tl.load(offset_ptr)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, q, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)  # (C,)
            col_ok = cols < q
            m = row_ok[:, None] & col_ok[None, :]  # (R, C)
            f = row_base[:, None] + cols[None, :]  # (R, C) flat index (int64)
            v = f // VPC  # code index
            bit = v * CODE_WIDTH
            byte = bit >> 3
            sh = (bit & 7).to(tl.int32)
            word = tl.load(codes_ptr + byte, mask=m, other=0).to(tl.int32)
            if CODE_WIDTH > 1:  # the code may reach into the next byte (sh + w > 8)
                nxt = tl.load(codes_ptr + byte + 1, mask=m & (byte + 1 < n_code_bytes), other=0)
                word = word | (nxt.to(tl.int32) << 8)
            if CODE_WIDTH > 9:  # ... and the one after (sh + w > 16)
                nxt2 = tl.load(codes_ptr + byte + 2, mask=m & (byte + 2 < n_code_bytes), other=0)
                word = word | (nxt2.to(tl.int32) << 16)
            code = (word >> sh) & ((1 << CODE_WIDTH) - 1)  # (R, C)
            val = tl.load(table_ptr + code * VPC + (f % VPC), mask=m, other=0.0)
            blk = f // block_size
            sc = tl.load(scode_ptr + blk, mask=m, other=0).to(tl.float32)
            gm = tl.load(gmax_ptr + blk // scale_group, mask=m, other=0.0)
            w = tl.where(m, val * (offset + sc / scale_levels * gm), 0.0)  # (R, C) fp32
            if HAS_PERM:  # every row of the program is in row block (pid_r * BLOCK_R) // permute_rows
                rb = (pid_r * BLOCK_R) // permute_rows
                xcol = tl.load(perm_ptr + rb.to(tl.int64) * q + cols, mask=col_ok, other=0).to(tl.int64)
            else:
                xcol = cols.to(tl.int64)
            xt = tl.load(x_ptr + toks[:, None].to(tl.int64) * stride_xt + xcol[None, :],
                         mask=tok_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # (T, C)
            if USE_DOT:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
        out = y_ptr + toks[:, None].to(tl.int64) * stride_yt + rows[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=tok_ok[:, None] & row_ok[None, :])


    _frozen_matmul_kernel = triton.jit(_frozen_matmul_kernel)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two ≤ cap dividing n."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def triton_frozen_matmul(x: Tensor, prep: PreparedFrozen, out_dtype: torch.dtype) -> Tensor:
    """z = x · X̂ᵀ (T, p) in `out_dtype`, X̂ the stored (rotated) matrix with its permutation undone.

    Args:
        x: (T, q), on the prepared tensors' device; already rotated when the matrix is.
        prep: the prepared frozen part.
        out_dtype: dtype of the result (accumulation is fp32).
    """
    p, q = prep.shape
    x = x.contiguous()
    T = x.shape[0]
    y = torch.empty(T, p, device=x.device, dtype=out_dtype)
    block_t = min(MAX_TOKENS, triton.next_power_of_2(T))
    block_r = _BLOCK_R if prep.perm is None else _pow2_divisor(prep.permute_rows, _BLOCK_R)
    use_dot = block_t >= 16 and block_r >= 16
    block_c = _BLOCK_C if (use_dot or block_t < 16) else 32  # bounds the (T, R, C) product tile
    perm = prep.perm if prep.perm is not None else prep.codes  # unused placeholder pointer
    grid = (triton.cdiv(p, block_r), triton.cdiv(T, block_t))
    _frozen_matmul_kernel[grid](
        x, y, prep.codes, prep.table, prep.scale_codes, prep.scale_group_max, prep.scale_offset, perm,
        T, p, q, prep.codes.numel(), x.stride(0), y.stride(0), prep.block_size, prep.scale_group,
        prep.permute_rows, float((1 << prep.scale_bits) - 1),
        CODE_WIDTH=prep.code_width, VPC=prep.values_per_code, HAS_PERM=prep.perm is not None,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_C=block_c, USE_DOT=use_dot,
    )
    return y


class TritonBackend(FusedBackend):
    """Backend "triton": `triton_frozen_matmul` on CUDA tensors (on CPU tensors in the interpreter), 1–16 tokens."""

    name = "triton"

    def unavailable_reason(self) -> "str | None":
        return "triton is not installed" if triton is None else None

    def unsupported_reason(self, config: CompressionConfig, device: "torch.device | str", dtype: torch.dtype,
                           n_tokens: int, shape: "tuple[int, int] | None" = None) -> "str | None":
        return unsupported_reason(config, device, dtype, n_tokens, shape)

    def kernel(self, x: Tensor, prep: PreparedFrozen, config: CompressionConfig, out_dtype: torch.dtype) -> Tensor:
        return triton_frozen_matmul(x, prep, out_dtype)  # (T, p) in out_dtype


BACKEND = TritonBackend()
