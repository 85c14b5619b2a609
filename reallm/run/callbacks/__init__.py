"""Lightning callbacks the CLI adds to every run, one module each (each has a key of the config):

- `NonFiniteGuard` (`nan_guard`, nonfinite.py): stops the run at the first NaN or Inf in a loss, a logged
  metric, a weight being compressed or a trained weight, with one line that names the layer and the step.
- `EvalAfterFit` (`eval_after_fit`, eval_after_fit.py): optionally measures the perplexity (protocol.md) of
  the model a `fit` phase produced and adds it to results.json.
- `RunArtifacts` (`artifacts`, artifacts.py): writes the run's figures into run_dir/figures/ and, when a
  W&B logger is attached, uploads results, config, figures and the per-matrix table (`reallm.run.tracking`).

They work on any phase through its contract (`reallm.phases.base.ReALLMModule`): the model it
compresses, trains or evaluates is `pl_module.phase_model`, its run directory `pl_module.run_dir`.
"""

from reallm.core.errors import NonFiniteError
from reallm.run.callbacks.artifacts import RunArtifacts
from reallm.run.callbacks.eval_after_fit import EvalAfterFit
from reallm.run.callbacks.nonfinite import NonFiniteGuard

__all__ = ["EvalAfterFit", "NonFiniteError", "NonFiniteGuard", "RunArtifacts"]
