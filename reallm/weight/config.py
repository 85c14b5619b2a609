"""The compression configuration of one weight matrix: the fields every stored format shares, plus the format's
own options (`options`, checked by the format's options class in its folder, `reallm/formats/<name>/options.py`).

The docstring of each field is what `python train.py fit --help` shows for it; the options of every registered
format are appended to the docstring of `options` when this module is imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from reallm.formats import get_codec, names
from reallm.formats.base import FormatOptions

QUANTIZERS = names()  # every registered stored format (reallm/formats/), built-in ones first
# the choices --help lists (jsonargparse reads the Literal); a format folder added to reallm/formats/ appears here
# without any edit of this file
QuantizerName = Literal[QUANTIZERS]  # type: ignore[valid-type]
STORAGE_DTYPES = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8}
# CompressionConfig keys of before issue 20 that now live in a format's options (FormatOptions.legacy_keys)
LEGACY_OPTION_KEYS = ("vq_dim", "kmeans_iters", "kmeans_tol", "kmeans_init", "kmeans_max_points", "codebook_scope",
                      "codebooks", "beam", "refine_iters", "autoencoder")


@dataclass
class CompressionConfig:
    """How one weight matrix W (out × in) is compressed: W ≈ decode(codes) + L1 L2ᵀ.

    Args:
        quantizer: stored format of the frozen part (a folder of reallm/formats/). "none" keeps the
            residual in fp16 (LoRA / fp16 rows), "nf" NormalFloat-b with absmax block scales
            (QLoRA, LQ-LoRA), "rtn" asymmetric round-to-nearest int-b with min/max per block
            (baseline), "vq" k-means vector quantization of d-vectors with absmax block scales
            (ReALLM without decoder), "additive" M codebooks whose codewords are summed (AQLM-like),
            "e8p" QuIP#'s E8P lattice codebook (QuIP#-like, with rotation="hadamard"),
            "autoencoder" the trained patch autoencoder (set by phase 1); `python -m reallm.formats`
            lists every format with its options.
        bits: nominal bits b per coordinate (the paper's "bits"; "e8p": 2, 3 or 4).
        block_size: values per first-level absmax scale block, B0 (row-major flattening).
        scale_bits: bits of the double-quantized scale codes.
        scale_group: scales per fp32 second-level group maximum, B1.
        permute: reorder columns greedily per row block before quantizing (paper Algorithm 1).
        permute_rows: rows per permutation block.
        rotation: "hadamard" applies QuIP#'s randomised Hadamard rotation on both sides
            (only two seeds are stored); "none" otherwise.
        rank: rank r of the low-rank part. An integer ≥ 1 is an absolute rank; a value in
            (0, 1) is a fraction of min(p, q) (0.015625 gives r = 64 at 4096); 0 disables it.
        lowrank_init: "svd" (paper Alg. 2), "alternating" (LQ-LoRA, keeps the best iterate)
            or "zero" (QLoRA: the product starts at zero).
        lowrank_iters: maximum iterations of "alternating".
        randomized_svd: force (True) or forbid (False) the randomised SVD; None decides by size.
        lowrank_dtype: storage precision of the low-rank factors / DoRA A and B
            ("float16", "bfloat16", "float32" or "int8" with one fp16 scale per rank vector).
            The layer computes with exactly the stored values.
        dora: keep a trainable DoRA magnitude vector (one per output unit); False is plain LoRA.
        magnitude_dtype: storage precision of the DoRA magnitude ("float32" keeps the initial
            layer output exactly equal to the decomposition; "float16" halves its cost).
        error_feedback: "gptq" re-chooses the codes of formats whose codes index a value table (vq, nf) column
            group by column group with GPTQ's error feedback (`reallm.ops.gptq`): the columns not yet quantised
            compensate the error of those done, for the output error under the calibration inputs' full second
            moments (needs `calibration:` with calibration.full_max ≥ the layer's input width). A pipeline stage
            (like permute and rotation), so it is shared: codes, codebooks, scales and bits keep their format;
            other formats, and matrices whose input width is not a multiple of the vector length, are encoded as
            without it (results.json counts the matrices it changed). "none": plain nearest assignment.
        feedback_damp: GPTQ's dampening λ: λ·mean(diag H) is added to the diagonal of H before inverting it.
        seed: seed of every random choice (k-means init, rotation signs, randomised SVD).
        options: the format's own options, a mapping checked by its options class (unknown keys and values are
            refused); the keys left out take their defaults. Each format's options:
    """

    quantizer: QuantizerName = "vq"
    bits: int = 3
    block_size: int = 64
    scale_bits: int = 8
    scale_group: int = 256
    permute: bool = False
    permute_rows: int = 128
    rotation: Literal["none", "hadamard"] = "none"
    rank: float = 0
    lowrank_init: Literal["svd", "alternating", "zero"] = "svd"
    lowrank_iters: int = 20
    randomized_svd: bool | None = None
    lowrank_dtype: Literal["float32", "float16", "bfloat16", "int8"] = "float16"
    dora: bool = True
    magnitude_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    error_feedback: Literal["none", "gptq"] = "none"
    feedback_damp: float = 0.01
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Resolve `options` into the format's options class and raise ValueError with one clear sentence for
        an impossible configuration."""
        def bad(msg: str) -> None:
            raise ValueError(f"invalid compression config: {msg}")

        try:
            codec = get_codec(self.quantizer)
            if isinstance(self.options, FormatOptions):
                if type(self.options) is not codec.options:
                    bad(f"options of type {type(self.options).__name__} given for quantizer {self.quantizer!r} "
                        f"(whose options are {codec.options.__name__})")
            else:
                self.options = codec.options.from_dict(self.options, self.quantizer)
            codec.validate(self)
        except (ValueError, TypeError) as e:
            bad(str(e).removeprefix("invalid compression config: "))
        if codec.blockwise:
            if self.block_size < 1 or self.block_size % codec.vector_dim(self):
                bad(f"block_size ({self.block_size}) must be a positive multiple of the vector length "
                    f"({codec.vector_dim(self)})")
        if codec.absmax_scales:
            if not 1 <= self.scale_bits <= 16 or self.scale_group < 1:
                bad("scale_bits must be in 1..16 and scale_group ≥ 1")
        if self.rank < 0:
            bad(f"rank must be ≥ 0, got {self.rank}")
        if self.rank >= 1 and self.rank != int(self.rank):
            bad(f"a rank ≥ 1 must be an integer, got {self.rank}")
        if self.lowrank_dtype not in STORAGE_DTYPES:
            bad(f"lowrank_dtype must be one of {tuple(STORAGE_DTYPES)}")
        if self.magnitude_dtype not in ("float32", "float16", "bfloat16"):
            bad("magnitude_dtype must be float32, float16 or bfloat16")
        if self.rotation not in ("none", "hadamard"):
            bad(f"rotation must be 'none' or 'hadamard', got {self.rotation!r}")
        if self.lowrank_init not in ("svd", "alternating", "zero"):
            bad(f"lowrank_init must be svd, alternating or zero, got {self.lowrank_init!r}")
        if self.permute_rows < 1:
            bad("permute_rows must be ≥ 1")
        if self.error_feedback not in ("none", "gptq"):
            bad(f"error_feedback must be 'none' or 'gptq', got {self.error_feedback!r}")
        if not self.feedback_damp > 0:
            bad(f"feedback_damp must be > 0, got {self.feedback_damp}")

    # -- derived values -------------------------------------------------------------------
    def resolve_rank(self, p: int, q: int) -> int:
        """The integer rank used for a p × q matrix (a fraction is taken of min(p, q))."""
        if self.rank == 0:
            return 0
        if self.rank < 1:
            return max(1, round(self.rank * min(p, q)))
        return min(int(self.rank), min(p, q))

    @property
    def code_width(self) -> int:
        """Bits of one stored code (the format's): b·d for VQ, b for scalar quantizers."""
        return get_codec(self.quantizer).code_width(self)

    @property
    def nominal_bits(self) -> float:
        """The paper's "bits": b (16 when nothing is quantized)."""
        return get_codec(self.quantizer).nominal_bits(self)

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**out, "options": self.options.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionConfig:
        """A config from `to_dict`'s form, or from the flat form written before issue 20 (every format's options
        among the shared fields: checkpoints and configs of then), whose keys move into the format's options."""
        d = dict(d)
        legacy = {k: d.pop(k) for k in LEGACY_OPTION_KEYS if k in d}
        if legacy:
            if "options" in d:
                raise ValueError(f"compression config with both options and the former flat keys {sorted(legacy)}")
            d["options"] = get_codec(d.get("quantizer", "vq")).options.from_legacy(legacy)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown compression config keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> CompressionConfig:
        """A copy with fields changed. Changing the quantizer without giving options starts from the new
        format's default options."""
        if "quantizer" in changes and changes["quantizer"] != self.quantizer and "options" not in changes:
            changes["options"] = {}
        return dataclasses.replace(self, **changes)

    def with_options(self, **changes: Any) -> CompressionConfig:
        """A copy with some of the format's options changed (`cfg.with_options(kmeans_iters=5)`)."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes))

    def key(self) -> str:
        """A stable identity used to group matrices that share a codebook or decoder."""
        return json.dumps(self.to_dict(), sort_keys=True)


def options_help() -> str:
    """One paragraph per registered format with options: its options' names and defaults."""
    lines = []
    for name in names():
        cls = get_codec(name).options
        fields_ = dataclasses.fields(cls)
        if fields_:
            shown = ", ".join(f"{f.name}={_default(f)!r}" for f in fields_)
            lines.append(f"            {name} ({cls.__module__}.{cls.__name__}): {shown}.")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


CompressionConfig.__doc__ = CompressionConfig.__doc__.rstrip() + "\n" + options_help() + "\n"


def storage_bits(dtype_name: str) -> int:
    return STORAGE_DTYPES[dtype_name]


def ceil_log2(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1
