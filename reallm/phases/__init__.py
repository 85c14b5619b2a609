"""The phases: one LightningModule each, all deriving from ReALLMModule, beside the recipe it wires
(calibration, block capture, distillation, the autoencoder's matrices). Configs name them by class path,
e.g. `class_path: reallm.phases.CompressPhase`."""

from reallm.core.errors import UserError
from reallm.phases.autoencoder import AutoencoderPhase
from reallm.phases.base import ReALLMModule
from reallm.phases.blockwise import BlockwisePhase
from reallm.phases.compress import CompressPhase
from reallm.phases.e2e import EndToEndPhase
from reallm.phases.evaluate import EvaluatePhase
from reallm.phases.validation import PerplexityMixin

__all__ = ["AutoencoderPhase", "BlockwisePhase", "CompressPhase", "EndToEndPhase", "EvaluatePhase", "PerplexityMixin",
           "ReALLMModule", "UserError"]
