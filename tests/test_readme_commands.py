"""The README's commands of "Command line", and those of the docs sections it links to, run as printed.

The README prints one command per phase in its "Command line" section and links to the sections of
docs/phases.md ("Command line", "Fine-tuning: phases 2 and 3") where the fuller commands live; the test reads
the README's commands and follows those links, so a command moved into docs/ is still run as printed there.
The fenced bash blocks are parsed: continuation lines joined, comments dropped, `(a | b)` alternatives each
run, `[...]` optional parts kept. The `<...>` placeholders become local paths (stories260K, a phase-1
checkpoint made by the printed phase-1 command, ../shared/data) and only flags that keep the runs short on a
CPU are appended (fewer windows, shorter windows). Every command runs in a subprocess from the repository
root, offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), as a user would run it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_REL = "../shared"
SECTION = "Command line"  # the README section with one command per phase and the links into docs/
# a link from that section to a section of a docs page: [text](docs/<page>.md#<anchor>)
DOCS_LINK = re.compile(r"\]\((docs/[\w./-]+\.md)#([\w-]+)\)")

# only what keeps each phase short on a CPU (the commands are otherwise as printed)
SHORT = {
    "configs/ae.yaml": ["--model.init_args.compression.options.kmeans_iters", "5"],
    "configs/eval.yaml": ["--data.init_args.max_eval_windows", "2"],
    "configs/blockwise.yaml": ["--data.init_args.train_sequences", "8", "--data.init_args.seq_len", "64",
                               "--data.init_args.batch_size", "4"],
    "configs/e2e.yaml": ["--data.init_args.train_sequences", "8", "--data.init_args.seq_len", "64",
                         "--data.init_args.batch_size", "4", "--data.init_args.max_eval_windows", "2",
                         "--trainer.max_epochs", "1"],
}


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def section(text: str, title: str | None = None, *, slug: str | None = None) -> str:
    """The body of the section headed `title` (or whose anchor is `slug`), up to the next heading of the same
    or a higher level; lines inside fenced blocks are never headings (a bash comment starts with `#` too)."""
    lines, fenced, start, level = text.splitlines(), False, None, 0
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"(#+) (.*)$", line)
        if heading is None:
            continue
        if start is not None and len(heading.group(1)) <= level:
            return "\n".join(lines[start:i])
        name = heading.group(2).strip()
        if start is None and (name == title or (slug is not None and anchor(name) == slug)):
            start, level = i + 1, len(heading.group(1))
    if start is None:
        raise KeyError(f"no section {title or '#' + str(slug)!r}")
    return "\n".join(lines[start:])


def bash_commands(body: str) -> list[str]:
    """The shell commands of the fenced bash blocks of a section body, one string each."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split("   #", 1)[0].strip()  # a trailing comment
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def readme_commands() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(the README's per-phase commands; those and the commands of the docs sections they link to, in order,
    each once; the links followed as (page, anchor))."""
    body = section((ROOT / "README.md").read_text(), SECTION)
    printed = bash_commands(body)
    links = DOCS_LINK.findall(body)
    commands = list(printed)
    for page, slug in links:
        commands += bash_commands(section((ROOT / page).read_text(), slug=slug))
    return printed, list(dict.fromkeys(commands)), links


def expand(command: str) -> list[str]:
    """Every variant of a command: one per `(a | b)` alternative; `[...]` optional parts are kept."""
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    groups = re.findall(r"\(([^()]*\|[^()]*)\)", command)
    if not groups:
        return [command]
    parts = re.split(r"\([^()]*\|[^()]*\)", command)
    variants = []
    for choice in itertools.product(*[[a.strip() for a in g.split("|")] for g in groups]):
        out = parts[0]
        for c, rest in zip(choice, parts[1:]):
            out += c + rest
        variants.append(out)
    return variants


def test_readme_sections_parse():
    printed, commands, links = readme_commands()
    assert ("docs/phases.md", "command-line") in links and ("docs/phases.md", "fine-tuning-phases-2-and-3") in links
    followed = {c for page, slug in links for c in bash_commands(section((ROOT / page).read_text(), slug=slug))}
    assert set(printed) <= followed, "a README command differs from the docs section it links to"
    phases = [c for c in commands if c.startswith("python train.py")]
    configs = [re.search(r"--config (configs/\w+\.yaml)", c).group(1) for c in phases]
    assert configs == ["configs/ae.yaml", "configs/eval.yaml", "configs/blockwise.yaml", "configs/e2e.yaml"]
    assert len(expand(phases[1])) == 2  # checkpoint | base model


def test_readme_commands_run_as_printed(tmp_path):
    if not (ROOT / SHARED_REL).resolve().is_dir():
        pytest.skip(f"{(ROOT / SHARED_REL).resolve()} is absent: the README commands need stories260K and the "
                    f"TinyStories texts of ../shared")
    model = f"{SHARED_REL}/models/stories260K"
    train, valid = f"{SHARED_REL}/data/tinystories_train.txt", f"{SHARED_REL}/data/tinystories_valid.txt"
    runs = {"compress": tmp_path / "compress", "blockwise": tmp_path / "blockwise", "e2e": tmp_path / "e2e"}
    fixed = {
        "<preset>": "vq-3bit-ft",  # a preset with a DoRA part, which phases 2 and 3 need
        "<hf id or dir>": model,
        "<phase-1 dir>": str(runs["compress"]),
        "<phase-1 or 2 dir>": str(runs["blockwise"]),
        "<hub id, file, or list of them>": valid,
        "<calibration text>": train,
        "<training text>": train,
        "<evaluation sets>": valid,
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    ran: list[tuple[str, Path | None]] = []
    for printed in readme_commands()[1]:
        if printed.startswith("python benchmarks/"):
            continue  # the whole pipeline benchmark (tests/test_pipeline_cli.py runs it on a tiny model)
        for k, command in enumerate(expand(printed)):
            run_dir = None
            if "--run_dir <dir>" in command:
                config = re.search(r"--config configs/(\w+)\.yaml", command).group(1)
                run_dir = runs.get({"ae": "compress"}.get(config, config), tmp_path / f"{config}-{k}")
                command = command.replace("--run_dir <dir>", f"--run_dir {run_dir}")
            command = command.replace("<run dirs...>", " ".join(str(d) for _, d in ran if d is not None))
            command = command.replace("--figures <dir>", f"--figures {tmp_path / 'figures'}")
            for placeholder, value in fixed.items():
                command = command.replace(placeholder, value)
            assert "<" not in command, f"unsubstituted placeholder in: {command}"
            args = shlex.split(command)
            assert args[0] == "python"
            config = next((a for a in args if a.startswith("configs/") and a in SHORT), None)
            args = [sys.executable, *args[1:], *(SHORT[config] if config else [])]
            proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
            ran.append((command, run_dir))
            if "reallm.run.report" in command:
                assert "| vq-3bit-ft |" in proc.stdout and (tmp_path / "figures" / "report.md").is_file()

    results = {d.name: json.loads((d / "results.json").read_text()) for _, d in ran if d is not None}
    assert results["compress"]["complete"] and results["compress"]["method"] == "vq-3bit-ft"
    evals = [r for name, r in results.items() if name.startswith("eval")]
    assert len(evals) == 2  # the checkpoint and the base model
    for r in evals:  # evaluated at stories260K's own context
        assert r["perplexity"]["tinystories_valid"]["context"] == 512
        assert 1 < r["perplexity"]["tinystories_valid"]["value"] < 100
    assert results["blockwise"]["complete"] and len(results["blockwise"]["blocks"]) == 5
    assert results["e2e"]["complete"] and results["e2e"]["perplexity"]["tinystories_valid"]["context"] == 64


def test_readme_three_lines_from_the_demo_checkpoint(tmp_path, single_thread):
    """"From `make demo`'s checkpoint to generated text, in three lines": the Makefile's demo compression (its
    own command as `make -n` prints it, k-means and calibration shortened), then the README's three lines in a
    fresh process, as printed, from the directory layout the demo makes; the text is the greedy continuation of
    `load_compressed`'s model."""
    if not (ROOT / SHARED_REL / "models" / "stories260K").resolve().is_dir():
        pytest.skip("the demo needs ../shared/models/stories260K")
    import torch
    from transformers import AutoTokenizer

    from reallm import load_compressed

    run = tmp_path / "runs" / "demo-vq-3bit"
    dry = subprocess.run(["make", "-n", "demo", f"PY={sys.executable}", f"RUN={run}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    demo = re.sub(r"\s*\\\n\s*", " ", dry.stdout).splitlines()  # make -n prints the recipe as it would run it
    command = next(line.strip() for line in demo if "train.py fit" in line)
    # the default is calibration-aware with GPTQ's error feedback (fewer calibration windows below: test speed)
    assert "--model.init_args.compression.error_feedback gptq" in command and "tinystories_train.txt" in command
    command = command.replace("--model.init_args.calibration.windows 128", "--model.init_args.calibration.windows 8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*shlex.split(command), *SHORT["configs/ae.yaml"], "--artifacts.figures", "false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"in three lines:\n\n```python\n(.*?)```", section, flags=re.S).group(1)
    assert len(block.strip().splitlines()) == 3
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    checkpoint = tmp_path / "runs" / "demo-vq-3bit" / "compress" / "reallm"
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        out = load_compressed(checkpoint).generate(**ids, max_new_tokens=40, do_sample=False)
    assert out.shape[1] == ids.input_ids.shape[1] + 40
    assert proc.stdout.strip() == tok.decode(out[0]).strip()
