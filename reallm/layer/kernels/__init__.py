"""Fused dequantize-matmul kernels for the frozen part of a compressed linear (y = x · Q̂ᵀ).

    from reallm.layer.kernels import frozen_matmul, available_paths, prepare
    prep = prepare(w.frozen, w.config, w.shape, w.shared)          # keep it with the layer
    y = frozen_matmul(x, w.frozen, w.config, w.shape, w.shared, prepared=prep)

Paths: "triton" (CUDA, or the Triton interpreter on CPU under TRITON_INTERPRET=1), "cpu"
(Numba lookup-table matvec), "decode" (plain decode then matmul, always available). See
`reallm.layer.kernels.dispatch` for the choice and `unsupported_reason` for each path's limits.
"""

from .dispatch import PATHS, UnsupportedPath, available_paths, frozen_matmul, unsupported_reason
from .prepare import PreparedFrozen, fused_format, prepare

__all__ = [
    "PATHS",
    "PreparedFrozen",
    "UnsupportedPath",
    "available_paths",
    "fused_format",
    "frozen_matmul",
    "prepare",
    "unsupported_reason",
]
