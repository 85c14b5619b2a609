"""Shared fixtures: a tiny seeded Llama (no download) and the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = (Path(__file__).parents[1] / ".." / "shared").resolve()


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on this 2-core machine) each worker computes on one
    thread, and so do the processes its tests start: two workers of two threads each would oversubscribe the
    cores, and OpenMP barriers stall under oversubscription."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# `make test` runs two workers, each taking whole files (`--dist loadfile`: a file's module fixtures are built
# once). The files that take longest (measured with `--durations=0`, end-to-end runs in subprocesses, several
# processes, the Triton interpreter) are handed out first, so that the two workers end together instead of one of
# them running a long file alone at the end (longest-first scheduling). Order only; every test still runs.
LONGEST_FILES = ("test_cli.py", "test_readme_commands.py", "test_pipeline_cli.py", "test_configs.py",
                 "test_kernels.py", "test_e2e.py", "test_perplexity.py", "test_ae_phase.py", "test_hf_checkpoint.py",
                 "test_hub.py", "test_hardening.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the other files, and the tests within a file, keep their order


@pytest.fixture
def tiny_llama():
    """A tiny random ``LlamaForCausalLM`` (vocab 512, hidden 64, 2 layers), fixed seed, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` from the project root (real data and the stories260K model); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data directory {SHARED} is absent (real-data tests need ../shared)")
    return SHARED


@pytest.fixture(scope="module")
def single_thread():
    """Numerical checks on small problems run single-threaded: fast and stable on a shared 2-core
    machine (OpenMP barriers stall under oversubscription). The previous setting is restored after
    the module. Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
