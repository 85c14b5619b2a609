"""Pure tensor quantization primitives (any device, no nn.Module state).

See ``docs/architecture.md``: packing, block scales, scalar (NF / RTN) quantizers, batched k-means
VQ, greedy column permutation, randomised Hadamard rotation and low-rank decompositions.
"""

from reallm.ops.hadamard import orthogonal_transform, rotate, unrotate
from reallm.ops.kmeans import KMeansResult, assign, kmeans
from reallm.ops.lowrank import LowRankResult, low_rank_svd, lowrank_decompose
from reallm.ops.packing import pack_bits, packed_nbytes, unpack_bits
from reallm.ops.permutation import (
    greedy_column_permutation,
    greedy_column_permutation_reference,
    index_bits,
    permute_columns,
    unpermute_columns,
)
from reallm.ops.scalar import nearest_level, nf_levels, rtn_dequantize, rtn_quantize
from reallm.ops.scales import QuantizedScales, block_absmax, quantize_scales

__all__ = [
    "KMeansResult",
    "LowRankResult",
    "QuantizedScales",
    "assign",
    "block_absmax",
    "greedy_column_permutation",
    "greedy_column_permutation_reference",
    "index_bits",
    "kmeans",
    "low_rank_svd",
    "lowrank_decompose",
    "nearest_level",
    "nf_levels",
    "orthogonal_transform",
    "pack_bits",
    "packed_nbytes",
    "permute_columns",
    "quantize_scales",
    "rotate",
    "rtn_dequantize",
    "rtn_quantize",
    "unpack_bits",
    "unpermute_columns",
    "unrotate",
]
