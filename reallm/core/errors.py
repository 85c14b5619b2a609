"""Every error a user can cause, at the bottom of the import graph (nothing here imports the project).

Each is printed by the command line as one `error:` line with exit code 1 (`REALLM_DEBUG=1` shows the
traceback). The specific ones stay `ValueError`s as well, for callers of the Python API.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CompressionError", "NonFiniteError", "UnsupportedModelError", "UserError"]


class UserError(Exception):
    """A problem with the user's input or set-up: one clear line, nothing written half."""


class CompressionError(UserError, ValueError):
    """A weight that cannot be compressed (NaN/Inf values, impossible shape or configuration)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded as it is (names the file and the problem)."""


class UnsupportedModelError(UserError, ValueError):
    """A model the surgery cannot handle (no recognisable stack of decoder blocks)."""


class NonFiniteError(UserError):
    """A NaN or Inf in a loss, a metric or a weight (one line: what, where, at which step)."""
