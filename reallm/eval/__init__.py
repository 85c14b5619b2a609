"""Evaluation by the protocol (``docs/protocol.md``): text sources and their windows, perplexity
(one accumulator, torchmetrics' ``Perplexity``), greedy samples and zero-shot accuracy (lm-eval-harness).

- `sources.py`: data specs → :class:`TextSource` (file, preset, hub dataset) and their rows.
- `windows.py`: the WikiText and C4 rules, calibration sampling (pure functions).
- `perplexity.py`: :class:`WindowPerplexity`, :func:`perplexity`, :func:`greedy_generate`.
- `zeroshot.py`: zero-shot accuracy through lm-eval's ``HFLM`` (``python -m reallm.eval.zeroshot``).
"""

from reallm.eval.perplexity import WindowPerplexity, greedy_generate, model_logits, perplexity

__all__ = ["WindowPerplexity", "greedy_generate", "model_logits", "perplexity"]
