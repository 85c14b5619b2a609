"""The contract every stored format of the frozen part fulfils (a "codec").

The encoding pipeline (`reallm.weight.pipeline`) is the same for every format and knows none by name:

    R = W − L1 L2ᵀ → Hadamard rotation → column permutation per row block → blocks of B0 values
    (row-major flattening, zero padded) → absmax block scales (double-quantised) → **codec.encode**

and decoding runs it backwards from **codec.decode**. A codec says which of the shared stages it
wants (`blockwise`, `absmax_scales`), what it stores (`encode` → tensors, `bit_items` → where their
bits are reported), and whether several matrices can share tensors it fits once (`fit_shared`,
e.g. a model-wide VQ codebook). Adding a format is one module in `reallm/formats/` that defines a
`Codec` subclass and decorates it with `@register` (the package imports every module in it), a
preset in `configs/methods/`, and a row in `tests/test_codec_contract.py`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol, Union, get_args, get_origin, get_type_hints

import torch
from torch import Tensor

from reallm.ops.packing import packed_nbytes


class FormatConfig(Protocol):
    """What a codec reads of the compression config: the fields every format shares (the format's own knobs
    are read by the format itself). `reallm.weight.config.CompressionConfig`, which sits above the formats,
    fulfils it; a codec never imports it."""

    quantizer: str
    bits: int
    block_size: int
    seed: int
    #: the format's own options: an instance of its `Codec.options` class
    options: Any


@dataclass
class FormatOptions:
    """A stored format's own options: none here. A format with knobs of its own subclasses this as a dataclass
    in its folder's `options.py` (its class docstring's Args are the `--help`) and names the class in its codec
    (`Codec.options`); `CompressionConfig.options` then holds an instance, checked by the class. `version` is
    written with the options, so that a checkpoint says which schema its options follow."""

    #: the schema version written with the options; bump it when a field changes meaning
    version: ClassVar[int] = 1
    #: CompressionConfig keys of before issue 20, when every format's options sat in one flat bag (checkpoints
    #: and configs written then) → the field of this class that took each over; keys not listed were never read
    #: by the format and are dropped
    legacy_keys: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, format_name: str = "") -> FormatOptions:
        """The options of `values` (a dict as `to_dict` writes it, `version` optional), checked: a newer
        version or an unknown key is a ValueError naming it."""
        values = dict(values or {})
        format_name = format_name or cls.__name__
        version = values.pop("version", cls.version)
        if not isinstance(version, int) or version > cls.version:
            raise ValueError(f"options of format {format_name!r} have version {version!r}; this reallm reads up to "
                             f"version {cls.version} (a newer reallm wrote them)")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"format {format_name!r} has no option {', '.join(map(repr, unknown))} "
                             f"(its options: {', '.join(known) or 'none'})")
        hints = get_type_hints(cls)
        for name, value in list(values.items()):
            if value in ("None", "null") and _admits(hints[name], None):
                values[name] = value = None  # a dotted CLI key gives the dict the string
            if not _admits(hints[name], value):
                raise ValueError(f"option {name!r} of format {format_name!r} must be {_type_name(hints[name])}, "
                                 f"got {value!r}")
        return cls(**values)

    @classmethod
    def from_legacy(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        """The options dict of a flat config of before issue 20 (the keys of `legacy_keys` that it has)."""
        return {field_name: flat[key] for key, field_name in cls.legacy_keys.items() if key in flat}

__all__ = ["Codec", "Encoded", "FormatConfig", "FormatOptions", "Layout", "PIPELINE_BIT_ITEMS", "TensorSpec"]

# stored tensors written by the shared pipeline stages (not by a codec), and their bit items
# stored floating tensors of the pipeline that fine-tuning may train (codes stay frozen), by item
PIPELINE_TRAINABLE: dict[str, tuple[str, ...]] = {"scales": ("scale_group_max", "scale_offset")}

PIPELINE_BIT_ITEMS: dict[str, str] = {
    "scale_codes": "scales",
    "scale_group_max": "scales",
    "scale_offset": "scales",
    "perm": "permutation",
    "rotation_seeds": "rotation",
}


@dataclass
class Encoded:
    """What `Codec.encode` returns.

    stored: tensors of this matrix, in their stored dtype (packed codes, codebooks, ...).
    meta: JSON-able facts the decoder needs beyond the config (kept in the checkpoint's metadata).
    shared: tensors used but owned by several matrices (a model-wide codebook); the container keeps
        them by reference and the checkpoint stores them once.
    """

    stored: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of a stored tensor, known before it is computed: all its accounted bits follow from."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbits(self) -> int:
        """Bits of the tensor as stored: numel × element size (a 0-dim tensor holds one element)."""
        return math.prod(self.shape) * self.dtype.itemsize * 8


#: (stored, shared): what `Codec.stored_layout` returns, name → spec of each tensor, in `encode`'s order
Layout = tuple[dict[str, TensorSpec], dict[str, TensorSpec]]


class Codec:
    """One stored format. Subclasses set the class attributes and implement encode / decode."""

    #: the `CompressionConfig.quantizer` value that selects this format
    name: ClassVar[str] = ""
    #: one line for `--help` and the docs
    summary: ClassVar[str] = ""
    #: the class of the format's own options (`CompressionConfig.options`); FormatOptions: none
    options: ClassVar[type[FormatOptions]] = FormatOptions
    #: True: the pipeline applies rotation, permutation and the B0-block layout before `encode`, and
    #: `encode` / `decode` see blocks (n_blocks, B0); False: they see the residual (p, q) itself
    blockwise: ClassVar[bool] = True
    #: the pipeline divides each block by its double-quantised absmax scale (needs `blockwise`)
    absmax_scales: ClassVar[bool] = True
    #: stored tensor name → bit-accounting item (protocol.md); every key `encode` can store, and every
    #: shared key, must be listed (tests/test_codec_contract.py checks it)
    bit_items: ClassVar[dict[str, str]] = {}
    #: None when `compress_weight` can encode this format; otherwise who produces it (one line)
    produced_by: ClassVar[str | None] = None
    #: the format stores packed codes indexing a value table (`kernel_table`), with absmax block scales:
    #: the fused dequantize-matmul kernels of `reallm.layer.kernels` can then read it directly
    table_kernels: ClassVar[bool] = False
    #: `decode_range` reads only the range's stored values (otherwise the runtime decodes in one tile)
    decodes_ranges: ClassVar[bool] = True
    #: stored floating tensors that fine-tuning may train while the codes stay frozen, by item
    #: ("codebook", "scales"); written back at their stored precision, so the accounted bits do not change
    trainable: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: `encode` (and `fit_shared`) accept `weights=`, per-value importance weights from calibration data, and
    #: minimise the weighted error; the pipeline passes them only to formats that say so, so a format that
    #: leaves this False needs no change and is encoded as without calibration (its error is still measured
    #: on the layer's output). Scalar formats with a fixed grid (NF, RTN) gain nothing: the nearest level of a
    #: value is the same under any positive weight.
    weighted: ClassVar[bool] = False

    # -- configuration ----------------------------------------------------------------------
    def validate(self, config: FormatConfig) -> None:
        """Raise ValueError (one sentence, without the "invalid compression config" prefix) for a
        config this format cannot serve."""

    def nominal_bits(self, config: FormatConfig) -> float:
        """The paper's "bits" b of this format."""
        return float(config.bits)

    def vector_dim(self, config: FormatConfig) -> int:
        """Values per stored code (blocks are cut into vectors of this length)."""
        return 1

    def code_width(self, config: FormatConfig) -> int:
        """Bits of one stored code."""
        return config.bits * self.vector_dim(config)

    def decode_macs_per_weight(self, meta: dict[str, Any], config: FormatConfig) -> float:
        """Multiply-adds `decode` spends per weight (the runtime caches formats that cost much more than
        a matmul; table lookups, unpacking and scaling count as about one)."""
        return 1.0

    def kernel_table(self, stored: dict[str, Tensor], config: FormatConfig,
                     shared: dict[str, Tensor]) -> Tensor:
        """(2^code_width, vector_dim) fp32: the values each code stands for (formats with `table_kernels`)."""
        raise NotImplementedError(f"format {self.name!r} has no value table for the fused kernels")

    # -- shared tensors (e.g. vq's options.codebook_scope="model") --------------------------------
    def can_share(self, config: FormatConfig) -> bool:
        """Whether matrices compressed with `config` share tensors fitted once by `fit_shared`."""
        return False

    def sample_size(self, config: FormatConfig) -> int | None:
        """At most how many vectors `fit_shared` is given (a seeded sample of the pooled vectors); None: all."""
        return None

    def fit_shared(self, vectors: Tensor, config: FormatConfig,
                   weights: Tensor | None = None) -> dict[str, Tensor]:
        """Shared tensors fitted on the pooled vectors (N, vector_dim) of every sharing matrix (`weights`, of the
        vectors' shape, only for `weighted` formats: see `encode`)."""
        raise NotImplementedError(f"format {self.name!r} shares nothing between matrices")

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, X: Tensor, config: FormatConfig, *, shared: dict[str, Tensor] | None = None,
               state: dict[str, Any] | None = None, weights: Tensor | None = None) -> Encoded:
        """Stored form of X: blocks (n_blocks, B0), normalised by their scales when `absmax_scales`;
        the residual (p, q) when not `blockwise`. `shared` holds tensors fitted by `fit_shared`;
        `state` is a dict the codec may use to warm-start the next call on the same matrix (the
        alternating low-rank iterations call encode repeatedly). `weights` (only given to `weighted`
        formats, and only in calibration-aware phase 1): X's shape, ≥ 0, the importance of each value,
        i.e. the weight h_j = E[x_j²] of its original input column carried through rotation and permutation,
        times the square of its block's scale, normalised to mean 1 over the matrix, so that
        Σ weights · (X − X̂)² is proportional to the layer's output error in the diagonal approximation;
        the format minimises that instead of Σ (X − X̂)²."""
        raise NotImplementedError(f"format {self.name!r} is produced by {self.produced_by}")

    def decode(self, stored: dict[str, Tensor], meta: dict[str, Any], config: FormatConfig,
               shape: tuple[int, int], n_blocks: int, shared: dict[str, Tensor]) -> Tensor:
        """Inverse of `encode`, fp32: blocks (n_blocks, B0) before the scales are applied (blockwise
        formats), or the matrix (p, q). Implement this or `decode_range` (each defaults to the other)."""
        return self.decode_range(stored, meta, config, shape, shared, 0, n_blocks if self.blockwise else shape[0])

    def decode_range(self, stored: dict[str, Tensor], meta: dict[str, Any], config: FormatConfig,
                     shape: tuple[int, int], shared: dict[str, Tensor], start: int, stop: int) -> Tensor:
        """Part of `decode`: blocks [start, stop) (blockwise formats) or rows [start, stop), fp32. The
        resident runtime decodes a matrix in such row tiles, so that no whole dense copy is made; a format
        that can read its stored tensors by range overrides this (the default decodes all and slices)."""
        n_blocks = -(-shape[0] * shape[1] // config.block_size)
        return self.decode(stored, meta, config, shape, n_blocks, shared)[start:stop]

    # -- bits before encoding ---------------------------------------------------------------------
    def stored_layout(self, config: FormatConfig, shape: tuple[int, int], n_blocks: int, *,
                      shared: bool = False) -> Layout:
        """(stored, shared): the shape and dtype of every tensor `encode` stores for a (p, q) matrix, in `encode`'s
        order, and of the shared tensors it uses, known from the config and shape alone, so that a bit budget can
        be checked before anything is encoded (`reallm.weight.layout`). `n_blocks`: blocks of B0 values the
        pipeline gives a `blockwise` format (⌈p·q / B0⌉). `shared`: the tensors the format can share were
        fitted once for several matrices and are passed to `encode` (otherwise it fits and stores its own).

        The default is one packed stream "codes" of `code_width` bits per vector of `vector_dim` values; a
        format that stores anything else says so here (tests/test_bit_prediction.py checks every format's
        prediction against the bits of its encoded matrices)."""
        n_codes = n_blocks * config.block_size // self.vector_dim(config)
        return {"codes": self.packed(n_codes, self.code_width(config))}, {}

    @staticmethod
    def packed(n_codes: int, width: int) -> TensorSpec:
        """The spec of `reallm.ops.packing.pack_bits`' stream of `n_codes` codes of `width` bits: uint8
        (⌈n_codes·width / 8⌉,)."""
        return TensorSpec((packed_nbytes(n_codes, width),), torch.uint8)

    @staticmethod
    def spec(shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
        """A `TensorSpec` (for `stored_layout`)."""
        return TensorSpec(tuple(shape), dtype)


def _admits(annotation: Any, value: Any) -> bool:
    """Whether `value` fits an option's annotation (None, bool, int, float, str, Literal, unions, list, dict)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if origin is Literal:
        return value in get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_admits(a, value) for a in get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = get_args(annotation)
        return isinstance(value, (list, tuple)) and (not args or all(_admits(args[0], v) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or annotation)


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
