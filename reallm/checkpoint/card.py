"""The model card of a checkpoint: the README.md a checkpoint directory (and its Hub repository) shows.

`model_card(dir, ...)` is its text: Hub metadata, base model, method, nominal and accounted bits, the run's
perplexity and zero-shot rows, the command that made it, the library versions, how to load it;
`write_model_card(dir, ...)` writes it into the directory. `save_compressed` writes one into every checkpoint;
`reallm.checkpoint.hub.push_to_hub` refreshes it before an upload.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from reallm.checkpoint.directory import read_meta
from reallm.core.errors import UserError
from reallm.core.io import LIBRARY_VERSION, atomic_write_text
from reallm.layer.bits import bits_report

__all__ = ["CARD_FILE", "HUB_ID", "model_card", "write_model_card"]

CARD_FILE = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # "<user or org>/<name>"


def _load_results(results: str | os.PathLike | dict | None) -> dict[str, Any]:
    if results is None or isinstance(results, dict):
        return dict(results or {})
    path = Path(results)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read results ({e})") from None


def _fmt(x: Any, digits: int | None = 3) -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{x:g}" if digits is None else f"{x:.{digits}f}"
    if isinstance(x, list):
        return ", ".join(_fmt(v, digits) for v in x)
    return "-" if x is None else str(x)


def _bits_from_records(layers: dict[str, Any]) -> dict[str, Any]:
    """Nominal and accounted bits of the decoder linears from config.json's records (no model needed)."""
    total = weights = 0.0
    nominal = set()
    for rec in layers.values():
        p, q = rec["shape"]
        total += rec["bits"]["total"]
        weights += p * q
        cfg = rec.get("config", {})
        nominal.add(cfg.get("bits"))
    return {"nominal": nominal.pop() if len(nominal) == 1 else sorted(n for n in nominal if n is not None),
            "decoder_linears": total / weights if weights else None, "whole_model": None}


def model_card(directory: str | os.PathLike, *, model: nn.Module | None = None,
               results: str | os.PathLike | dict | None = None, command: str | None = None,
               repo_id: str | None = None, location: str | os.PathLike | None = None) -> str:
    """The text of a checkpoint's README.md (model card).

    Args:
        directory: a format-2 checkpoint directory.
        model: the model in memory (its accounted bits are measured with `reallm.bits_report`); optional.
        results: the run's results.json (path or dict): its bits, perplexity and zero-shot rows, method and
            model are shown (preferred over `model` for the bits: they are the run's record).
        command: the command that made the checkpoint.
        repo_id: the Hub repository it goes to (used in the usage snippet; default: `location`).
        location: where the checkpoint will be read from (default: `directory`; a save that writes into a
            temporary directory first names the final one).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    res = _load_results(results)
    extra = meta.get("extra") or {}
    if isinstance(res.get("bits"), dict):
        bits = res["bits"]
    elif model is not None:
        bits = bits_report(model)
    else:
        bits = _bits_from_records(meta["layers"])
    base = meta.get("base_model") or res.get("model")
    method = res.get("method") or extra.get("method") or "custom"
    formats = sorted({rec["config"]["quantizer"] for rec in meta["layers"].values()})
    source = repo_id or str(location or directory)
    header = ["---", "library_name: transformers", "tags:", "- reallm", "- quantization", "- compressed"]
    if base and HUB_ID.match(str(base)) and not Path(str(base)).exists():
        header.append(f"base_model: {base}")
    header.append("---")
    lines = [
        *header, "",
        f"# {Path(str(base)).name if base else Path(location or directory).name}, compressed with ReALLM "
        f"({method})", "",
        f"A compressed version of `{base or 'unknown'}`: each linear layer of its decoder blocks holds a frozen "
        "compressed part plus a trainable low-rank DoRA part (ReALLM, Leconte et al. 2024, arXiv 2405.13155). "
        "Bits count every stored tensor at its stored precision (codes, codebooks, scales, permutations, "
        "low-rank factors, DoRA magnitudes); the nominal figure is the paper's b.", "",
        "| | |", "| --- | --- |",
        f"| base model | `{base or '-'}` |",
        f"| method | {method} |",
        f"| stored formats | {', '.join(formats)} |",
        f"| compressed linears | {len(meta['layers'])} |",
        f"| nominal bits | {_fmt(bits.get('nominal'), None)} |",
        f"| accounted bits, decoder linears | {_fmt(bits.get('decoder_linears'))} |",
        f"| accounted bits, whole model | {_fmt(bits.get('whole_model'))} |",
    ]
    if extra.get("phase") or res.get("phase"):
        lines.append(f"| phase | {res.get('phase') or extra.get('phase')} |")
    lines += [f"| checkpoint format | reallm {meta['format_version']} (transformers quantization method `reallm`) |",
              f"| library | reallm {LIBRARY_VERSION}, transformers {transformers.__version__} |", ""]
    ppl = res.get("perplexity") or {}
    if ppl:
        lines += ["## Perplexity", "", "| dataset | context | perplexity | tokens |", "| --- | --- | --- | --- |"]
        for name, row in ppl.items():
            lines.append(f"| {name} | {row.get('context', '-')} | {_fmt(row.get('value'), 4)} | "
                         f"{row.get('tokens', '-')} |")
        lines.append("")
    zs = (res.get("zero_shot") or {}).get("tasks") or {}
    if zs:
        lines += ["## Zero-shot accuracy (lm-eval-harness, acc)", "", "| task | acc | documents |",
                  "| --- | --- | --- |"]
        lines += [f"| {t} | {_fmt(r.get('acc'), 4)} | {r.get('samples', '-')} |" for t, r in zs.items()]
        lines.append("")
    lines += [
        "## Use", "",
        "```python",
        "import reallm  # registers the `reallm` quantization method with transformers (pip install reallm)",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{source}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{source}")',
        'print(tokenizer.decode(model.generate(**tokenizer("Once upon a time", return_tensors="pt"), '
        'max_new_tokens=20)[0]))',
        "```", "",
        "Without `import reallm` (lm-eval-harness, pipelines in another program): add `trust_remote_code=True`; "
        "the checkpoint's `configuration_reallm.py` only imports reallm (which must be installed).", "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained={source},trust_remote_code=True --tasks arc_easy",
        "```", "",
    ]
    if command:
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def write_model_card(directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Write README.md into a checkpoint directory, atomically (arguments as `model_card`)."""
    path = Path(directory) / CARD_FILE
    atomic_write_text(path, model_card(directory, **kwargs))
    return path
