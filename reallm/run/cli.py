"""The command line: one LightningCLI for every phase, chosen by `class_path` in YAML.

    python train.py fit --config configs/ae.yaml --config configs/methods/nf3.yaml \\
        --model.init_args.model_name_or_path <hub id or dir> --run_dir runs/nf3
    python train.py validate --config configs/eval.yaml --model.init_args.checkpoint runs/nf3/reallm \\
        --data.init_args.path ../shared/data/tinystories_valid.txt --run_dir runs/nf3-eval

Every run writes into its --run_dir (default: a new `runs/<subcommand>-<time>-<pid>`): the resolved
`config.yaml`, the logs, `results.json`, `figures/` and, for phases that produce one, the ReALLM
checkpoint in `run_dir/reallm/`. User errors (bad paths, bad keys, impossible configs, a NaN in a
loss or a weight) print one line and exit non-zero (REALLM_DEBUG=1 shows the traceback).

Options added to Lightning's (see `reallm.run.tracking` and `reallm.run.callbacks`):
    --logger csv|wandb|none    metrics to run_dir/logs/metrics.csv (default), also to Weights & Biases
                               (offline without an API key; --wandb.project, --wandb.group, ...), or nowhere
    --nan_guard.*              stop at the first NaN / Inf (on by default)
    --eval_after_fit.path      perplexity of a fit phase's result, added to its results.json
    --artifacts.*              figures in run_dir/figures/ (on by default) and the W&B uploads
    --push_to_hub <user>/<repo>  upload the checkpoint of a fit phase to the Hugging Face Hub (reallm.checkpoint.hub)
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import LightningCLI

import reallm.run.strategies  # noqa: F401  (registers --trainer.strategy ddp_matrices)
from reallm.checkpoint.card import write_model_card
from reallm.checkpoint.directory import read_meta
from reallm.checkpoint.hub import push_to_hub
from reallm.core.errors import CheckpointError, UserError
from reallm.core.hf_models import has_tokenizer
from reallm.data.base import BaseDataModule
from reallm.phases.base import ReALLMModule
from reallm.run.callbacks import EvalAfterFit, NonFiniteGuard, RunArtifacts
from reallm.run.tracking import WandbSettings, logger_config
from reallm.weight.config import LEGACY_OPTION_KEYS


def default_run_dir(subcommand: str | None = None) -> str:
    run_id = os.environ.get("WANDB_RUN_ID")
    if run_id:  # started by `wandb agent` (or `python -m reallm.run.sweep`): one folder per sweep run
        sweep = os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_RUN_GROUP") or "wandb"
        return str(Path("runs") / f"sweep-{sweep}" / run_id)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{subcommand or 'run'}-{stamp}-{os.getpid()}")


def data_source(model_name_or_path: str | None, checkpoint: str | None) -> str | None:
    """The model a datamodule serves: the base model, or a checkpoint (which holds the tokenizer)."""
    if model_name_or_path:
        return model_name_or_path
    if checkpoint:
        ck = Path(checkpoint)
        if has_tokenizer(ck):
            return str(ck)

        try:  # without a tokenizer of its own, the base model's
            return read_meta(ck).get("base_model") or str(ck)
        except CheckpointError:  # named when the phase reads the checkpoint
            return str(ck)
    return None


def phase_class(class_path: str) -> type[ReALLMModule]:
    """The phase class a config's `model.class_path` names (jsonargparse has checked that it is a
    ReALLMModule subclass)."""
    module, _, name = str(class_path).rpartition(".")
    return getattr(importlib.import_module(module), name)


class ReALLMCLI(LightningCLI):
    """LightningCLI with the project's run directory, links and error handling."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="run directory (config.yaml, logs, results.json, reallm/); "
                                 "default: runs/<subcommand>-<time>-<pid>")
        parser.link_arguments(
            ("model.init_args.model_name_or_path", "model.init_args.checkpoint"),
            "data.init_args.model_name_or_path",
            compute_fn=data_source,
        )
        parser.add_argument("--logger", type=Literal["csv", "wandb", "none"], default="csv",
                            help="csv: run_dir/logs/metrics.csv; wandb: Weights & Biases too (offline "
                                 "unless an API key is set; see --wandb.*); none: no logger. "
                                 "An explicit --trainer.logger wins.")
        parser.add_class_arguments(WandbSettings, "wandb")
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        parser.add_lightning_class_args(EvalAfterFit, "eval_after_fit")
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.add_argument("--push_to_hub", type=str | None, default=None,
                            help="<user or org>/<repo>: after a fit phase, upload run_dir/reallm (with its model "
                                 "card) to the Hugging Face Hub; credentials: HF_TOKEN or `hf auth login`")

    def parse_arguments(self, parser, args) -> None:
        # the command line, for the model card of the checkpoint the run writes
        argv = sys.argv[1:] if args is None else args
        self.command = "python train.py " + (shlex.join(str(a) for a in argv) if isinstance(argv, (list, tuple))
                                             else str(argv))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = cfg.get("run_dir") or default_run_dir(self.subcommand)
        cfg["run_dir"] = run_dir
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        cfg["model"]["init_args"]["run_dir"] = run_dir
        checkpoint = cfg["model"]["init_args"].get("checkpoint")
        if checkpoint and phase_class(cfg["model"]["class_path"]).starts_from == "checkpoint":
            read_meta(checkpoint)  # a missing or broken checkpoint is named before anything loads
        trainer = cfg["trainer"]
        trainer["default_root_dir"] = run_dir
        if trainer.get("logger") in (None, True):  # the --logger switch (CSV by default)
            trainer["logger"] = logger_config(cfg.get("logger") or "csv", cfg.get("wandb"), run_dir, self.subcommand)

    def before_fit(self) -> None:
        self._hand_config()

    def before_validate(self) -> None:
        self._hand_config()

    def after_fit(self) -> None:
        self._publish_checkpoint()

    def _publish_checkpoint(self) -> None:
        """The checkpoint a fit phase wrote gets its model card from the run (results.json, command line), and
        goes to the Hub with --push_to_hub."""
        cfg = self.config[self.subcommand]
        run_dir = Path(cfg["run_dir"])
        checkpoint = run_dir / "reallm"
        if not self.trainer.is_global_zero or not (checkpoint / "config.json").is_file():
            return
        results = run_dir / "results.json"
        write_model_card(checkpoint, results=results if results.is_file() else None, command=self.command)
        if cfg.get("push_to_hub"):
            url = push_to_hub(checkpoint, cfg["push_to_hub"], refresh_card=False)
            print(f"uploaded {checkpoint} to {url}", flush=True)

    def _hand_config(self) -> None:
        """Give the module its resolved config (results.json) and write run_dir/config.yaml.

        Written here rather than by Lightning's SaveConfigCallback, which skips fast_dev_run runs
        and refuses to overwrite (a resumed run rewrites the same file).
        """
        cfg = self.config[self.subcommand]
        self.model.resolved_config = _plain(cfg)
        if self.trainer.is_global_zero:
            self.parser._subcommands_action._name_parser_map[self.subcommand].save(
                cfg, str(Path(cfg["run_dir"]) / "config.yaml"), skip_none=False, overwrite=True, multifile=False)


def _plain(cfg) -> dict:
    """The resolved config as plain JSON-able data."""
    import json

    from jsonargparse import Namespace

    def conv(o):
        if isinstance(o, Namespace):
            return {k: conv(v) for k, v in vars(o).items()}
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if hasattr(o, "to_dict"):
            return o.to_dict()
        try:
            json.dumps(o)
            return o
        except TypeError:
            return str(o)

    return conv(cfg)


class _DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger / litmodels" advertisements (optional cloud
    packages this project does not use), printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud")


def quiet_known_noise() -> None:
    """Silence, narrowly, what every run printed that is expected and not the user's concern.

    - Lightning 2.6.6 (the newest release) builds `torch.utils._pytree.LeafSpec` objects, which torch
      2.13 deprecates with a FutureWarning on every run; nothing in this project or in its settings
      causes it and no Lightning release avoids it yet: that one message, from that one Lightning
      module, is ignored (remove when Lightning stops using LeafSpec).
    - Lightning's litlogger / litmodels tips (see `_DropLightningTips`).
    """
    warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning's rank_zero_info logs
    if not any(isinstance(f, _DropLightningTips) for f in log.filters):
        log.addFilter(_DropLightningTips())


def cli_main(args: list[str] | None = None, run: bool = True) -> ReALLMCLI | None:
    """Entry point of train.py. User errors become one line on stderr and exit code 1."""
    quiet_known_noise()

    try:
        return ReALLMCLI(
            ReALLMModule,
            BaseDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            parser_kwargs={"exit_on_error": False},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )
    except (UserError, OSError) as e:
        if os.environ.get("REALLM_DEBUG"):
            raise
        _close_progress_bars()
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("REALLM_DEBUG"):
            raise
        msg, code = _argument_error_message(e), 2
        if msg is None:
            msg, code = _runtime_error_message(e), 1
        if msg is None:
            raise
        _close_progress_bars()
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(code) from None


def _close_progress_bars() -> None:
    """End the open tqdm bars (their line), so that the error line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - best effort, never hide the real error
            pass


def _runtime_error_message(e: Exception) -> str | None:
    """One line for errors of the user's set-up met while running: Lightning's misconfigurations
    (e.g. a GPU accelerator on a machine without one), a package an option needs, and running out
    of accelerator memory."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(e, MisconfigurationException):
        return " ".join(str(e).split())
    if isinstance(e, ImportError):  # an optional package a chosen option needs (e.g. torch_xla for TPUs)
        return f"missing package: {' '.join(str(e).split())}"
    if isinstance(e, torch.OutOfMemoryError):
        return ("out of accelerator memory: reduce --data.init_args.batch_size or seq_len, use bf16, gradient "
                "checkpointing or more devices (" + " ".join(str(e).split())[:160] + ")")
    return None


def _moved_option_hint(text: str) -> str:
    """Where a key of the compression config went when each format's options moved under `options` (issue 20), if
    the error names one, else ""."""
    for key in LEGACY_OPTION_KEYS:
        if f"'{key}'" in text:
            now = {"vq_dim": "options.dim", "autoencoder": "options (its entries one level deep)"}.get(
                key, f"options.{key}")
            return f" (the formats' own options moved under compression.options: {key} is now {now})"
    return ""


def _union_error_items(text: str) -> list[str]:
    """The error list of jsonargparse's "Does not validate against any of the Union subtypes" text, one string
    per item with its more indented lines joined in, e.g. `Problem with given class_path 'X': Parser key
    "runtime": Expected a typing.Literal['resident', 'cache', 'auto']. Got value: fast`."""
    items: list[str] = []
    indent: int | None = None
    for line in text.splitlines():
        depth, stripped = len(line) - len(line.lstrip()), line.strip()
        if stripped.startswith("- ") and indent in (None, depth):
            indent = depth
            items.append(stripped[2:])
        elif items and depth > indent:
            items[-1] += " " + stripped
        elif items:
            break  # the lines after the list (the given value)
    return items


def _argument_error_message(e: Exception) -> str | None:
    """One line for jsonargparse's errors (bad keys, values, and exceptions raised while a class
    given in the config is instantiated, which jsonargparse wraps in a ValueError listing one
    error per candidate type); None for anything else."""
    text = str(e)
    if type(e).__name__ in ("ArgumentError", "NSKeyError"):
        if "Does not validate against any of the Union subtypes" in text:  # a bad value of a phase's option
            errors = [m for m in _union_error_items(text) if not m.startswith("Expected a <class 'NoneType'>")]
            if errors:
                return errors[0] + _moved_option_hint(text)
        return " ".join(text.split()) + _moved_option_hint(text)
    if isinstance(e, ValueError) and "Does not validate against any of the Union subtypes" in text:
        errors = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        # nested unions nest their error lists: keep the innermost real message
        errors = [m for m in errors if not m.startswith(("Expected a <class 'NoneType'>", "Does not validate"))]
        return errors[0] if errors else " ".join(text.split())
    return None
