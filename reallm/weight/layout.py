"""The stored layout of one matrix, known from its config and shape alone, and the bits it implies.

    matrix_layout(config, (p, q)) → the shape and dtype of every tensor `compress_weight` (or the autoencoder phase)
        will store: frozen (the pipeline's, then the format's), shared, lowrank
    predict_bits(config, (p, q))  → exactly `ReALLMWeight.bits()` of the encoded matrix, item by item

No tensor is computed: a bit budget can be checked before anything is encoded (phase 1's adaptive choice,
`reallm.model.candidates.check_budget`). The pipeline's stages are predicted here, as `reallm.weight.pipeline` runs
them (rotation seeds, packed permutation, double-quantised block scales, low-rank factors); the format's own
tensors by its codec (`Codec.stored_layout`). tests/test_bit_prediction.py checks the prediction of every format
against its encoded matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reallm.formats import Codec, get_codec
from reallm.formats.base import TensorSpec
from reallm.ops.permutation import index_bits
from reallm.ops.precision import FLOAT_DTYPES
from reallm.weight.config import CompressionConfig
from reallm.weight.container import count_bits

__all__ = ["MatrixLayout", "lowrank_layout", "matrix_layout", "pipeline_layout", "predict_bits"]


@dataclass
class MatrixLayout:
    """What one compressed (p, q) matrix stores, tensor by tensor (name → spec), as its `ReALLMWeight` holds it.

    frozen:  the pipeline's tensors (rotation seeds, permutation, scales) then the format's, in the stored order.
    shared:  the tensors it uses with other matrices (a model-wide codebook, an autoencoder's decoder).
    lowrank: the stored low-rank factors ("L1.value", "L2.value", int8: their scales).
    rank:    r, the low-rank factors' rank.
    """

    shape: tuple[int, int]
    config: CompressionConfig
    frozen: dict[str, TensorSpec]
    shared: dict[str, TensorSpec]
    lowrank: dict[str, TensorSpec]
    rank: int

    def bits(self, shared_numel: int | None = None, include_magnitude: bool | None = None) -> dict[str, float]:
        """`ReALLMWeight.bits()` of the encoded matrix; `shared_numel`: weights of every matrix sharing the
        shared tensors (None: this matrix alone)."""
        return count_bits(
            self.config, self.shape,
            frozen={k: s.nbits for k, s in self.frozen.items()},
            shared={k: s.nbits for k, s in self.shared.items()},
            lowrank=sum(s.nbits for s in self.lowrank.values()),
            rank=self.rank, shared_numel=shared_numel, include_magnitude=include_magnitude)

    def shared_bits(self) -> int:
        """Bits of the shared tensors, whole (what a budget pays once for all the matrices sharing them)."""
        return sum(s.nbits for s in self.shared.values())


def pipeline_layout(config: CompressionConfig, shape: tuple[int, int], codec: Codec) -> dict[str, TensorSpec]:
    """The tensors the pipeline's stages store before the format's (`normalize_residual`), for a blockwise format:
    the two int64 rotation seeds, the column order of each of the ⌈p / permute_rows⌉ row blocks packed at
    ⌈log2 q⌉ bits, and the absmax scales of the n_blocks = ⌈p·q / B0⌉ blocks, double-quantised (`quantize_scales`:
    uint8 codes (n_blocks,), fp32 group maxima (⌈n_blocks / B1⌉,), one fp32 offset)."""
    if not codec.blockwise:
        return {}
    p, q = shape
    out: dict[str, TensorSpec] = {}
    if config.rotation == "hadamard":
        out["rotation_seeds"] = TensorSpec((2,), torch.int64)
    if config.permute:
        out["perm"] = Codec.packed(-(-p // config.permute_rows) * q, index_bits(q))
    if codec.absmax_scales:
        n_blocks = _n_blocks(config, shape)
        out["scale_codes"] = TensorSpec((n_blocks,), torch.uint8)
        out["scale_group_max"] = TensorSpec((-(-n_blocks // config.scale_group),), torch.float32)
        out["scale_offset"] = TensorSpec((), torch.float32)
    return out


def lowrank_layout(config: CompressionConfig, shape: tuple[int, int]) -> dict[str, TensorSpec]:
    """The stored factors L1 (p, r) and L2 (q, r) at `config.lowrank_dtype` (`reallm.weight.factors`), int8 with
    one fp16 scale per rank vector (r,); nothing when r = 0."""
    p, q = shape
    r = config.resolve_rank(p, q)
    if r == 0:
        return {}
    out: dict[str, TensorSpec] = {}
    for name, rows in (("L1", p), ("L2", q)):
        if config.lowrank_dtype == "int8":
            out[f"{name}.value"] = TensorSpec((rows, r), torch.int8)
            out[f"{name}.scale"] = TensorSpec((r,), torch.float16)
        else:
            out[f"{name}.value"] = TensorSpec((rows, r), FLOAT_DTYPES[config.lowrank_dtype])
    return out


def matrix_layout(config: CompressionConfig, shape: tuple[int, int], *, shared: bool | None = None) -> MatrixLayout:
    """The stored layout of a (p, q) matrix compressed with `config`.

    Args:
        shared: whether the tensors the format can share are fitted once for several matrices and passed to the
            encoder (`compress_weight(shared=...)`); None: when the config asks for it (`Codec.can_share`, e.g.
            vq's codebook_scope "model"), as the phases do. The autoencoder's decoder is shared either way.
    """
    codec = get_codec(config.quantizer)
    shared = codec.can_share(config) if shared is None else shared
    stored, used = codec.stored_layout(config, shape, _n_blocks(config, shape), shared=shared)
    frozen = {**pipeline_layout(config, shape, codec), **stored}
    return MatrixLayout(tuple(shape), config, frozen, used, lowrank_layout(config, shape),
                        config.resolve_rank(*shape))


def predict_bits(config: CompressionConfig, shape: tuple[int, int], *, shared: bool | None = None,
                 shared_numel: int | None = None, include_magnitude: bool | None = None) -> dict[str, float]:
    """`ReALLMWeight.bits()` of a (p, q) matrix compressed with `config`, before it is: the same items, the same
    totals (`matrix_layout`'s `shared`; `shared_numel`: weights of every sharer, None: this matrix alone)."""
    return matrix_layout(config, shape, shared=shared).bits(shared_numel, include_magnitude)


def _n_blocks(config: CompressionConfig, shape: tuple[int, int]) -> int:
    """Blocks of B0 values of the row-major flattened (p, q) matrix, the last one zero padded."""
    return -(-shape[0] * shape[1] // config.block_size)
