"""LightningModules, one per phase, all deriving from ReALLMModule."""

from reallm.datamodules.patches import PatchDataModule  # its former place: older configs name reallm.modules
from reallm.errors import UserError
from reallm.modules.autoencoder import AutoencoderPhase
from reallm.modules.base import ReALLMModule
from reallm.modules.blockwise import BlockwisePhase
from reallm.modules.compress import CompressPhase
from reallm.modules.e2e import EndToEndPhase
from reallm.modules.evaluate import EvaluatePhase
from reallm.modules.perplexity import PerplexityMixin

__all__ = ["AutoencoderPhase", "BlockwisePhase", "CompressPhase", "EndToEndPhase", "EvaluatePhase", "PatchDataModule",
           "PerplexityMixin", "ReALLMModule", "UserError"]
