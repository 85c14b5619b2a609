"""Evaluation: perplexity on protocol windows, greedy samples."""

from reallm.eval.perplexity import greedy_generate, perplexity

__all__ = ["greedy_generate", "perplexity"]
