"""`e8p`: QuIP#'s E8P lattice codebook (QuIP#-like, data-free; `reallm.formats.e8p.lattice`).

Each 8-vector (8 consecutive values of one row, after the pipeline's rotation / permutation / block
layout) is stored as a 16-bit code of the E8P codebook: 2^16 points of the shifted E8 lattice built
from QuIP#'s 256-entry table of abs patterns, sign flips and a ±¼ shift, computed at load and never
stored (zero codebook bits). Each matrix records the table in its metadata (`e8p_table`); matrices
without it were written with the project's earlier padding and decode with that table. A decoded vector
is `scale · codeword` times its block's absmax scale, with one lattice scale per matrix searched for the
lowest error (fp32, stored and counted).

bits = 2: one E8P stage (16 bits per 8 weights). bits = 3 adds a residual stage of 256 lattice points
(8 bits per 8 weights: the origin, the 240 minimal vectors of E8 and 15 points of norm² 4), bits = 4 a
second E8P stage; each stage has its own scale (searched stage by stage, then jointly for the final error).

Scales. QuIP# applies this codebook after its randomised Hadamard rotation (`rotation: hadamard`),
where the values look Gaussian, with one scale per matrix and no block scales. This format keeps the
pipeline's absmax block scales (B0 = 64, double-quantised: about 0.13 bit per weight) under the matrix
scale, because they gave the lower perplexity on a real model, also per accounted bit. Measured
(relative Frobenius error, accounted bits, 1 thread, seed 0; TinyStories valid, context 512, all 151
windows; original perplexity 5.290):

| data | bits | one matrix scale: error / bits / ppl | + absmax block scales: error / bits / ppl |
| --- | --- | --- | --- |
| Gaussian 1024², Hadamard | 2 | 0.3021 / 2.000 | 0.3058 / 2.127 |
| Gaussian 1024², Hadamard | 3 | 0.1717 / 3.000 | 0.1737 / 3.127 |
| Gaussian 1024², no rotation | 2 | 0.3022 / 2.000 | 0.3062 / 2.127 |
| stories260K (35 matrices), Hadamard | 2 | 0.3158 / 2.025 / 168.5 | 0.3048 / 2.160 / 83.3 |
| stories260K, Hadamard | 3 | 0.1827 / 3.030 / 24.45 | 0.1728 / 3.165 / 17.50 |
| stories260K, no rotation | 2 | 0.3640 / 2.005 | 0.3097 / 2.140 |

On Gaussian data the block scales cost 0.13 bit for a 1% larger error; on stories260K they lower the
error by 3.5% (15% without rotation) and halve the 2-bit perplexity; interpolating the one-scale
variant's log-perplexity linearly in bits to 2.16 / 3.16 bits gives ≈ 129 / 18.9, still above 83.3 / 17.5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reallm.formats.base import Codec, Encoded
from reallm.formats.e8p.lattice import (
    DEFAULT_TABLE,
    E8_STAGES,
    LEGACY_TABLE,
    e8_ball256,
    e8_residual_quantize,
    e8p_codebook,
)
from reallm.formats.registry import register
from reallm.ops.lut import decode_codes
from reallm.ops.packing import pack_bits

#: stages of each bit width (bits of the codes per weight = Σ code bits / 8)
STAGES_OF_BITS: dict[int, tuple[str, ...]] = {2: ("e8p",), 3: ("e8p", "e8_1bit"), 4: ("e8p", "e8p")}
#: stored tensor of each stage's codes
_CODE_KEYS = ("codes", "residual_codes")


#: the matrix metadata entry naming the E8P abs table its codes index (absent: written before QuIP#'s table)
TABLE_META_KEY = "e8p_table"


def _stage_table(stage: str, device: torch.device, table: str) -> Tensor:
    """The codewords of a stage in code order: E8P (65536, 8) of abs table `table` or the 1-bit ball (256, 8), fp32."""
    return e8p_codebook(device, table) if stage == "e8p" else e8_ball256(device)


@register
class E8PLattice(Codec):
    name = "e8p"
    summary = ("QuIP#'s E8P lattice (2^16 computed 8-dim points, 0 codebook bits), a lattice scale per matrix and "
               "absmax block scales; "
               "bits 3 / 4 add a residual stage (QuIP#-like with rotation: hadamard)")
    bit_items = {"codes": "codes", "residual_codes": "codes", "lattice_scales": "scales"}
    trainable = {"scales": ("lattice_scales",)}  # the lattice is fixed; its per-stage scales may train

    def validate(self, config) -> None:
        if config.bits not in STAGES_OF_BITS:
            raise ValueError(f"e8p supports bits 2 (E8P), 3 (E8P + 1-bit lattice stage) or 4 (E8P + E8P), "
                             f"got bits={config.bits}")

    def vector_dim(self, config) -> int:
        return 8

    def code_width(self, config) -> int:
        """Bits of one 8-vector's codes, all stages together (8·b)."""
        return sum(E8_STAGES[s] for s in STAGES_OF_BITS[config.bits])

    def decode_macs_per_weight(self, meta: dict[str, Any], config) -> float:
        return float(len(STAGES_OF_BITS[config.bits]))  # one lookup and one scaled add per stage

    def encode(self, X: Tensor, config, *, shared=None, state=None) -> Encoded:
        stages = STAGES_OF_BITS[config.bits]
        res = e8_residual_quantize(X.reshape(-1, 8), stages, seed=config.seed)  # 8-vectors of the blocks
        scales = torch.tensor(res.scales, dtype=torch.float32)  # (n_stages,) as stored
        if not torch.isfinite(scales).all() or not (scales > 0).all():
            raise ValueError(f"e8p: scale search gave {res.scales} (values too large or too small for fp32)")
        stored = {key: pack_bits(codes, E8_STAGES[stage]) for key, codes, stage in zip(_CODE_KEYS, res.codes, stages)}
        stored["lattice_scales"] = scales
        return Encoded(stored, meta={TABLE_META_KEY: DEFAULT_TABLE})

    def decode_range(self, stored: dict[str, Tensor], meta: dict[str, Any], config, shape, shared, start: int,
                     stop: int) -> Tensor:
        per_block = config.block_size // 8  # 8-vectors per block
        n = (stop - start) * per_block
        device = stored["codes"].device
        scales = stored["lattice_scales"].to(device=device, dtype=torch.float32)
        table = meta.get(TABLE_META_KEY, LEGACY_TABLE)
        out = None
        for k, (key, stage) in enumerate(zip(_CODE_KEYS, STAGES_OF_BITS[config.bits])):
            part = decode_codes(stored[key], E8_STAGES[stage], n, _stage_table(stage, device, table),
                                start=start * per_block).mul_(scales[k])  # (n, 8), only the range's codes
            out = part if out is None else out.add_(part)
        return out.view(stop - start, config.block_size)

    def stored_layout(self, config, shape, n_blocks, *, shared=False):
        """Each stage's codes packed at its code bits (one per 8-vector), then the fp32 lattice scale of each stage."""
        stages = STAGES_OF_BITS[config.bits]
        n_vectors = n_blocks * config.block_size // 8
        stored = {key: self.packed(n_vectors, E8_STAGES[stage]) for key, stage in zip(_CODE_KEYS, stages)}
        return {**stored, "lattice_scales": self.spec((len(stages),), torch.float32)}, {}
