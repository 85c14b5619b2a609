"""LightningModules, one per phase, all deriving from ReALLMModule."""

from reallm.modules.base import ReALLMModule, UserError
from reallm.modules.compress import CompressPhase
from reallm.modules.evaluate import EvaluatePhase

__all__ = ["CompressPhase", "EvaluatePhase", "ReALLMModule", "UserError"]
