"""Fused dequantize-matmul kernels for the frozen part of a compressed linear (y = x · Q̂ᵀ).

    from reallm.layer.kernels import frozen_matmul, available_paths, prepare
    prep = prepare(w.frozen, w.config, w.shape, w.shared)          # keep it with the layer
    y = frozen_matmul(x, w.frozen, w.config, w.shape, w.shared, prepared=prep)

Every kernel is a backend behind one protocol (`backend.KernelBackend`: name, availability,
`unsupported_reason`, matmul), one file per kernel library: "cpu_avx512" (`cpu_avx512.py`, C with
AVX-512), "cpu" (`cpu_lut.py`, Numba lookup-table matvec), "triton" (`triton_vq.py`: CUDA, or the
Triton interpreter on CPU under TRITON_INTERPRET=1), "decode" (`decode.py`: plain decode then matmul,
always available). `prepare.py` builds what the fused ones read; `dispatch.py` tries the registered
backends in order (`BACKENDS`) and runs the first that serves the call.
"""

from .backend import FrozenOperand, FusedBackend, KernelBackend
from .dispatch import BACKENDS, PATHS, UnsupportedPath, available_paths, frozen_matmul, get_backend, unsupported_reason
from .prepare import PreparedFrozen, fused_format, prepare

__all__ = [
    "BACKENDS",
    "PATHS",
    "FrozenOperand",
    "FusedBackend",
    "KernelBackend",
    "PreparedFrozen",
    "UnsupportedPath",
    "available_paths",
    "get_backend",
    "fused_format",
    "frozen_matmul",
    "prepare",
    "unsupported_reason",
]
