"""Pure tensor quantization primitives (any device, no nn.Module state).

See ``docs/architecture.md``: packing, block scales, scalar (NF / RTN) quantizers, batched k-means
VQ, greedy column permutation, randomised Hadamard rotation and low-rank decompositions.
"""

from reallm.quant.hadamard import orthogonal_transform, rotate, unrotate
from reallm.quant.lowrank import LowRankResult, low_rank_svd, lowrank_decompose
from reallm.quant.packing import pack_bits, packed_nbytes, unpack_bits
from reallm.quant.permutation import (
    greedy_column_permutation,
    greedy_column_permutation_reference,
    index_bits,
    permute_columns,
    unpermute_columns,
)
from reallm.quant.scalar import nearest_level, nf_levels, rtn_dequantize, rtn_quantize
from reallm.quant.scales import QuantizedScales, block_absmax, quantize_scales
from reallm.quant.vq import KMeansResult, assign, kmeans

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
