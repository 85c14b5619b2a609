"""The Numba CPU kernels are compiled once per machine: a kernel key's module is written to the kernel cache and
compiled with numba's on-disk cache, so that a later process loads its machine code instead of compiling it again
(each key takes 1–40 s to compile)."""

from __future__ import annotations

import sys

import pytest
import torch

from reallm import CompressionConfig, compress_weight
from reallm.layer.kernels import cpu_lut, frozen_matmul
from reallm.layer.kernels.cpu_lut import kernel_module_source, machine_reason


def _stats(kernel) -> dict[str, int]:
    return {"hits": sum(kernel.rows.stats.cache_hits.values()), "misses": sum(kernel.rows.stats.cache_misses.values())}


def test_a_kernel_is_compiled_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    """As a second process would: the module is forgotten (this process's table and sys.modules), then loaded
    again from the cache directory, and numba finds the compiled code there."""
    if machine_reason() is not None:
        pytest.skip(f"the Numba CPU path is unavailable here: {machine_reason()}")
    monkeypatch.setenv("REALLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_lut, "_KERNELS", {})
    w = compress_weight(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.02,
                        CompressionConfig(quantizer="nf", bits=3))
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        y = frozen_matmul(x, w.frozen, w.config, w.shape, w.shared, path="cpu")
        torch.testing.assert_close(y, x @ w.decode_frozen().T, rtol=1e-4, atol=1e-5)
        (kernel,) = cpu_lut._KERNELS.values()
        runs.append(_stats(kernel))
        cpu_lut._KERNELS.clear()
        del sys.modules[kernel.__name__]
    assert runs == [{"hits": 0, "misses": 1}, {"hits": 1, "misses": 0}]  # compiled and written; then loaded
    assert [p.suffix for p in tmp_path.glob("cpu_lut_*")] == [".py"]


def test_the_module_of_a_key_depends_on_the_key():
    a, b = kernel_module_source(3, 1, "lut", 2, 64), kernel_module_source(3, 2, "lut", 2, 64)
    assert a != b and "USE_LUT = True" in a and "def row_dot(" in a and "cache=True" in a
    assert "USE_LUT = False" in kernel_module_source(16, 1, "dot", 8, 65536)
