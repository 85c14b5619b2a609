"""A ReALLM checkpoint directory as a Hugging Face Hub repository: the model card and the upload.

    python -m reallm.checkpoint.hub <checkpoint dir> <user or org>/<repo> [--private] [--results <results.json>]

`write_model_card(dir, ...)` writes README.md (Hub metadata, base model, method, nominal and accounted
bits, the run's perplexity rows, the command that made it, the library versions, how to load it);
`push_to_hub(dir, repo_id)` checks every digest of the checkpoint, refreshes the card and uploads the
directory with huggingface_hub (`HfApi.create_repo`, `HfApi.upload_folder`). Credentials are
huggingface_hub's own (`HF_TOKEN`, `hf auth login`, or `token=`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from reallm.core.errors import CheckpointError, UserError
from reallm.core.io import atomic_write_text

__all__ = ["model_card", "push_to_hub", "verify_checkpoint", "write_model_card"]

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    import transformers

    from reallm.checkpoint.compressed import read_meta
    from reallm.core.io import LIBRARY_VERSION

    directory = Path(directory)
    meta = read_meta(directory)
    res = _load_results(results)
    extra = meta.get("extra") or {}
    if isinstance(res.get("bits"), dict):
        bits = res["bits"]
    elif model is not None:
        from reallm.layer.bits import bits_report

        bits = bits_report(model)
    else:
        bits = _bits_from_records(meta["layers"])
    base = meta.get("base_model") or res.get("model")
    method = res.get("method") or extra.get("method") or "custom"
    formats = sorted({rec["config"]["quantizer"] for rec in meta["layers"].values()})
    source = repo_id or str(location or directory)
    header = ["---", "library_name: transformers", "tags:", "- reallm", "- quantization", "- compressed"]
    if base and _HUB_ID.match(str(base)) and not Path(str(base)).exists():
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


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check everything a loader checks, without building the model: config.json's seal, the listed files,
    every tensor against its digest, every adapter set. Returns the checkpoint's metadata."""
    from reallm.checkpoint import format2 as fmt
    from reallm.checkpoint.compressed import read_meta, weight_files

    directory = Path(directory)
    meta = read_meta(directory)
    if meta["format_version"] != fmt.FORMAT_VERSION:
        raise CheckpointError(f"{directory}: format version {meta['format_version']} is not a Hugging Face "
                              f"directory: load it with reallm.load_compressed and save it again")
    fmt.verify_files(directory, meta, strict=True)
    with fmt.TensorFiles(weight_files(directory)) as files:
        fmt.verify_dense(meta, files)
        fmt.read_layers(meta, files)
    for name in meta["adapter_sets"]:
        if name != "default":
            fmt.read_adapter_file(directory, meta, name)
    return meta


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    results: str | os.PathLike | dict | None = None,
    command: str | None = None,
    refresh_card: bool | None = None,
) -> str:
    """Upload a checkpoint directory to the Hub as a model repository (created if needed).

    The checkpoint is verified first (a corrupted one is never uploaded). The model card is kept if there is
    one (a run's card names its command line), written when there is none or when `results` / `command` are
    given (`refresh_card` forces either way); a card written without `results` uses the run's results.json
    beside the checkpoint (`<run_dir>/results.json` for `<run_dir>/reallm`) when it exists.

    Args:
        directory: the checkpoint (`save_compressed`, or `model.save_pretrained`).
        repo_id: "<user or org>/<name>".
        private: create the repository private (None: the Hub's default).
        token: a Hub token (default: huggingface_hub's own login).
        commit_message: the commit message.
        results: results.json of the run (path or dict) for the model card.
        command: the command that made it, for the model card.
        refresh_card: rewrite README.md (None: when missing or when results / command are given).
    Returns:
        the URL of the commit.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not _HUB_ID.match(repo_id):
        raise UserError(f"repo_id must be '<user or org>/<name>', got {repo_id!r}")
    verify_checkpoint(directory)
    if refresh_card is None:  # the card a run wrote (with its command line) is kept unless told otherwise
        refresh_card = not (directory / CARD_FILE).is_file() or results is not None or command is not None
    if refresh_card and results is None and (directory.parent / "results.json").is_file():
        results = directory.parent / "results.json"
    if refresh_card:
        write_model_card(directory, results=results, command=command, repo_id=repo_id)
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=getattr(repo, "repo_id", repo_id),
                                 repo_type="model", commit_message=commit_message or "Upload ReALLM checkpoint")
    except OSError as e:  # huggingface_hub's HTTP, offline and missing-token errors are all OSErrors
        text = " ".join(str(e).split())
        raise UserError(f"cannot upload {directory} to the Hub repository {repo_id}: {text[:300]} (the checkpoint "
                        f"is complete; retry with: python -m reallm.checkpoint.hub {directory} {repo_id})") from None
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a ReALLM checkpoint directory (e.g. runs/<run>/reallm)")
    ap.add_argument("repo_id", help="<user or org>/<repo>")
    ap.add_argument("--private", action="store_true", help="create the repository private")
    ap.add_argument("--results", help="results.json for the model card (default: the run's, beside the checkpoint)")
    ap.add_argument("--message", help="commit message")
    args = ap.parse_args(argv)
    try:
        url = push_to_hub(args.checkpoint, args.repo_id, private=args.private or None, results=args.results,
                          commit_message=args.message)
    except (UserError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
