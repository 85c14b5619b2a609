"""ReALLM: LLM compression (low-rank + neural-decoded VQ) and DoRA fine-tuning.

Python API (see README):
    import reallm  # registers the "reallm" quantization method with transformers (from_pretrained)
    from reallm import CompressionConfig, compress_, save_compressed, load_compressed, bits_report
"""

from reallm.checkpoint.compressed import (
    export_dense,
    load_compressed,
    save_adapters,
    save_compressed,
)
from reallm.checkpoint.hub import push_to_hub
from reallm.checkpoint.registration import register_with_transformers
from reallm.core.errors import CheckpointError, CompressionError, UnsupportedModelError, UserError
from reallm.core.io import LIBRARY_VERSION
from reallm.layer.bits import bits_report, format_bits_table
from reallm.layer.linear import ReALLMLinear, iter_reallm_layers
from reallm.model.surgery import compress_, mark_only_adapters_trainable
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.pipeline import compress_weight

__all__ = [
    "CheckpointError",
    "CompressionConfig",
    "CompressionError",
    "ReALLMLinear",
    "ReALLMWeight",
    "UnsupportedModelError",
    "UserError",
    "bits_report",
    "compress_",
    "compress_weight",
    "export_dense",
    "format_bits_table",
    "iter_reallm_layers",
    "load_compressed",
    "mark_only_adapters_trainable",
    "push_to_hub",
    "save_adapters",
    "save_compressed",
]
__version__ = LIBRARY_VERSION

register_with_transformers()
