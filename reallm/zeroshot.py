"""`python -m reallm.zeroshot`: zero-shot accuracy with lm-eval-harness, from the command line.

The code lives in `reallm.evaluation.zeroshot` (with the rest of the evaluation); this module is the
entry point users type, and re-exports its Python API.
"""

from reallm.evaluation.zeroshot import PAPER_TASKS, ZeroShotError, format_table, main, task_manager, zero_shot

__all__ = ["PAPER_TASKS", "ZeroShotError", "format_table", "main", "task_manager", "zero_shot"]

if __name__ == "__main__":
    raise SystemExit(main())
