"""The loader module written into every format-2 checkpoint (`configuration_reallm.py`), for processes that
load it with `trust_remote_code=True` without having imported reallm (lm-eval's `--model hf`, pipelines).

It imports reallm (which registers the `reallm` quantization method) and hands over to the architecture's own
config class; it defines no model code. `config.json`'s `auto_map` points to it; `drop_loader_reference`
forgets that pointer again (a loading artefact a later save that does not write the module must not keep).
Standard library only: `reallm.checkpoint.compressed` writes the module without importing transformers'
quantizer registry.
"""

from __future__ import annotations

__all__ = ["LOADER_CLASS", "LOADER_FILE", "LOADER_MODULE", "LOADER_SOURCE", "drop_loader_reference"]

LOADER_MODULE = "configuration_reallm"
LOADER_FILE = f"{LOADER_MODULE}.py"
LOADER_CLASS = "ReALLMAutoConfig"
# the loader module written into every checkpoint: `trust_remote_code=True` (lm-eval's --model hf, pipelines)
# imports it in a process that has not imported reallm; it registers the quantizer and hands over to the
# architecture's own config class (it defines no model code)
LOADER_SOURCE = '''"""Loads this ReALLM checkpoint with `trust_remote_code=True` in a process that has not imported
reallm (e.g. `lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True`): importing reallm registers
its quantizer (quant_method "reallm") with transformers; the config is then the architecture's own.
Needs the reallm package (pip install reallm). Written by reallm.checkpoint.compressed.save_compressed."""

import reallm  # noqa: F401  (registers the "reallm" quantization method with transformers)
from transformers import AutoConfig, PretrainedConfig


class ReALLMAutoConfig(PretrainedConfig):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        kwargs["trust_remote_code"] = False  # the model type's own config class, not this one
        return AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
'''


def drop_loader_reference(config) -> None:
    """Forget the loader module's entry of `auto_map` (a loading artefact: a later save_pretrained that does
    not write the module must not point to it)."""
    auto_map = getattr(config, "auto_map", None)
    if isinstance(auto_map, dict) and str(auto_map.get("AutoConfig", "")).startswith(LOADER_MODULE + "."):
        rest = {k: v for k, v in auto_map.items() if k != "AutoConfig"}
        if rest:
            config.auto_map = rest
        else:
            del config.auto_map
