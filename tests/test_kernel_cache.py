"""The Numba CPU kernels are compiled once per machine: a second process loads the machine code of a kernel key
from the kernel cache instead of compiling it again (each key takes 1–40 s to compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reallm.layer.kernels.cpu_lut import kernel_module_source, machine_reason

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, torch
from reallm import CompressionConfig, compress_weight
from reallm.layer.kernels import frozen_matmul
from reallm.layer.kernels.cpu_lut import _KERNELS
w = compress_weight(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.02,
                    CompressionConfig(quantizer="nf", bits=3))
x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
y = frozen_matmul(x, w.frozen, w.config, w.shape, w.shared, path="cpu")
torch.testing.assert_close(y, x @ w.decode_frozen().T, rtol=1e-4, atol=1e-5)
(kernel,) = _KERNELS.values()
print(json.dumps({"hits": sum(kernel.rows.stats.cache_hits.values()),
                  "misses": sum(kernel.rows.stats.cache_misses.values())}))
"""


def test_a_second_process_loads_the_compiled_kernel(tmp_path):
    if machine_reason() is not None:
        pytest.skip(f"the Numba CPU path is unavailable here: {machine_reason()}")
    env = {**os.environ, "REALLM_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"hits": 0, "misses": 1}  # compiled, and written to the cache
    assert runs[1] == {"hits": 1, "misses": 0}  # loaded
    assert [p.suffix for p in tmp_path.glob("cpu_lut_*")] == [".py"]


def test_the_module_of_a_key_depends_on_the_key():
    a, b = kernel_module_source(3, 1, "lut", 2, 64), kernel_module_source(3, 2, "lut", 2, 64)
    assert a != b and "USE_LUT = True" in a and "def row_dot(" in a and "cache=True" in a
    assert "USE_LUT = False" in kernel_module_source(16, 1, "dot", 8, 65536)
