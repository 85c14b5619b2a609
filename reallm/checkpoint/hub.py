"""A ReALLM checkpoint directory as a Hugging Face Hub repository: verify it, upload it.

    python -m reallm.checkpoint.hub <checkpoint dir> <user or org>/<repo> [--private] [--results <results.json>]

`verify_checkpoint(dir)` checks every digest of a format-2 checkpoint without building the model;
`push_to_hub(dir, repo_id)` verifies it, refreshes its model card (`reallm.checkpoint.card`) and uploads the
directory with huggingface_hub (`HfApi.create_repo`, `HfApi.upload_folder`). Credentials are
huggingface_hub's own (`HF_TOKEN`, `hf auth login`, or `token=`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import huggingface_hub

from reallm.checkpoint import format2 as fmt
from reallm.checkpoint.card import CARD_FILE, HUB_ID, write_model_card
from reallm.checkpoint.directory import read_meta, weight_files
from reallm.core.errors import CheckpointError, UserError

__all__ = ["main", "push_to_hub", "verify_checkpoint"]


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check everything a loader checks, without building the model: config.json's seal, the listed files,
    every tensor against its digest, every adapter set. Returns the checkpoint's metadata."""
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
    directory = Path(directory)
    if not HUB_ID.match(repo_id):
        raise UserError(f"repo_id must be '<user or org>/<name>', got {repo_id!r}")
    verify_checkpoint(directory)
    if refresh_card is None:  # the card a run wrote (with its command line) is kept unless told otherwise
        refresh_card = not (directory / CARD_FILE).is_file() or results is not None or command is not None
    if refresh_card and results is None and (directory.parent / "results.json").is_file():
        results = directory.parent / "results.json"
    if refresh_card:
        write_model_card(directory, results=results, command=command, repo_id=repo_id)
    api = huggingface_hub.HfApi(token=token)
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
