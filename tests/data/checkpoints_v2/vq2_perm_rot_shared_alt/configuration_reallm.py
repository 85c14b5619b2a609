"""Loads this ReALLM checkpoint with `trust_remote_code=True` in a process that has not imported
reallm (e.g. `lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True`): importing reallm registers
its quantizer (quant_method "reallm") with transformers; the config is then the architecture's own.
Needs the reallm package (pip install reallm). Written by reallm.checkpoint.save_compressed."""

import reallm  # noqa: F401  (registers the "reallm" quantization method with transformers)
from transformers import AutoConfig, PretrainedConfig


class ReALLMAutoConfig(PretrainedConfig):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        kwargs["trust_remote_code"] = False  # the model type's own config class, not this one
        return AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
