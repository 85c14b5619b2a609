"""Bit accounting of a compressed model (protocol.md, "Bit accounting").

"Bits" = stored bits / number of weights they represent, counting every tensor needed to rebuild
the weight at the precision it is actually stored. Reported per matrix, over all compressed
linears ("decoder_linears") and over the whole model (every other parameter at its dtype; a tied
head counted once).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reallm.core.hf_models import linear_weight
from reallm.layer.linear import iter_reallm_layers
from reallm.weight.pipeline import relative_error


def _original_weight(original: nn.Module | dict | None, name: str) -> torch.Tensor | None:
    if original is None:
        return None
    if isinstance(original, dict):
        w = original.get(f"{name}.weight")
        return None if w is None else w
    try:
        return linear_weight(original.get_submodule(name)).detach()
    except AttributeError:
        return None


@torch.no_grad()
def bits_report(model: nn.Module, original: nn.Module | dict | None = None) -> dict[str, Any]:
    """Accounting of protocol.md for a model after `compress_`.

    Args:
        model: the compressed model.
        original: the uncompressed model or its state dict; when given, each matrix's
            `rel_frobenius_error` is measured against it (otherwise the value recorded at
            compression time is reported, if any).
    Returns:
        {"nominal": b (or a list when layers differ), "decoder_linears": bits/weight,
         "whole_model": bits/weight, "matrices": [{name, shape, bits, nominal, items,
         rel_frobenius_error, rel_output_error (calibration-aware phase 1), config}], "totals": {...}}
    """
    matrices = []
    comp_bits = comp_weights = 0.0
    nominal = set()
    for name, layer in iter_reallm_layers(model):
        weight = layer.container()
        items = weight.bits()
        p, q = weight.shape
        W0 = _original_weight(original, name)
        if W0 is not None:
            if layer.layout == "conv1d" and tuple(W0.shape) == (q, p):
                W0 = W0.T
            err = relative_error(W0, layer.dequantize().to(W0.device))
        else:
            err = layer.stats.get("rel_frobenius_error")
        bias_bits = layer.bias.numel() * layer.bias.element_size() * 8 if layer.bias is not None else 0
        comp_bits += items["total"]
        comp_weights += p * q
        nominal.add(weight.config.nominal_bits)
        matrices.append({
            "name": name,
            "shape": [p, q],
            "bits": items["per_weight"],
            "nominal": weight.config.nominal_bits,
            "items": {k: v for k, v in items.items() if k not in ("total", "per_weight")},
            "bias_bits": bias_bits,
            "rel_frobenius_error": err,
            **({"rel_output_error": layer.stats["rel_output_error"]} if "rel_output_error" in layer.stats else {}),
            "config": weight.config.to_dict(),
        })
    # everything else, at its stored dtype (named_parameters yields a tied head once)
    adapters = {id(p) for _, layer in iter_reallm_layers(model) for p in layer.parameters()}
    other_bits = other_weights = 0
    for _, t in model.named_parameters():
        if id(t) not in adapters:  # adapters are already counted in their matrix's bits
            other_bits += t.numel() * t.element_size() * 8
            other_weights += t.numel()
    other_bits += sum(m["bias_bits"] for m in matrices)  # compressed layers keep their bias as is
    other_weights += sum(m["bias_bits"] and m["shape"][0] for m in matrices)
    decoder = comp_bits / comp_weights if comp_weights else float("nan")
    whole = (comp_bits + other_bits) / (comp_weights + other_weights) if comp_weights else float("nan")
    errs = [m["rel_frobenius_error"] for m in matrices if m["rel_frobenius_error"] is not None]
    out_errs = [m["rel_output_error"] for m in matrices if m.get("rel_output_error") is not None]
    return {
        "nominal": nominal.pop() if len(nominal) == 1 else sorted(nominal),
        "decoder_linears": decoder,
        "whole_model": whole,
        "mean_rel_frobenius_error": sum(errs) / len(errs) if errs else None,
        "mean_rel_output_error": sum(out_errs) / len(out_errs) if out_errs else None,
        "totals": {
            "decoder_linear_bits": comp_bits,
            "decoder_linear_weights": comp_weights,
            "other_bits": other_bits,
            "other_weights": other_weights,
        },
        "matrices": matrices,
    }


def format_bits_table(report: dict[str, Any]) -> str:
    """A markdown table of the per-matrix accounting (for the CLI and the demo); with the relative output error
    of calibration-aware phase 1 when the matrices have one."""
    out = report.get("mean_rel_output_error") is not None

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = ["| matrix | shape | bits/weight | rel. Frobenius error |" + (" rel. output error |" if out else ""),
             "| --- | --- | --- | --- |" + (" --- |" if out else "")]
    for m in report["matrices"]:
        lines.append(f"| {m['name']} | {m['shape'][0]}×{m['shape'][1]} | {m['bits']:.3f} | "
                     f"{cell(m['rel_frobenius_error'])} |" + (f" {cell(m.get('rel_output_error'))} |" if out else ""))
    lines.append(f"| **decoder linears** | | **{report['decoder_linears']:.3f}** | "
                 f"{report['mean_rel_frobenius_error'] or float('nan'):.4f} (mean) |"
                 + (f" {report['mean_rel_output_error']:.4f} (mean) |" if out else ""))
    lines.append(f"| **whole model** | | **{report['whole_model']:.3f}** | |" + (" |" if out else ""))
    return "\n".join(lines)
