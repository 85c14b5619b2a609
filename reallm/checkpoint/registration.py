"""`import reallm` registers the `reallm` quantization method with transformers, without importing
transformers' quantizer registry itself.

That registry (`transformers.quantizers.auto`, which imports every quantizer transformers ships) takes
seconds to import, and only a process that loads or saves a model through transformers needs it; such a
process imports it anyway (`transformers.modeling_utils` does). So: if it is already imported, the
registration (`reallm.checkpoint.quantizer`) happens at once; otherwise a post-import hook on `sys.meta_path`
performs it right after transformers has imported it, before anything can look a method up in it.
Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__all__ = ["register_with_transformers"]

REGISTRY_MODULE = "transformers.quantizers.auto"
QUANTIZER_MODULE = "reallm.checkpoint.quantizer"


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for the registry module, wraps the real loader so that our registration runs
    right after the module is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        spec = None
        for finder in sys.meta_path:  # the finder that would have found it without us
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        _remove_watcher()
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module(QUANTIZER_MODULE)  # registers ReALLMConfig and ReALLMHfQuantizer

        spec.loader.exec_module = exec_then_register
        return spec


def _remove_watcher() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegistryWatcher)]


def register_with_transformers() -> None:
    """Register now if transformers' quantizer registry is imported, otherwise as soon as it is."""
    if REGISTRY_MODULE in sys.modules:
        importlib.import_module(QUANTIZER_MODULE)
    elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())
