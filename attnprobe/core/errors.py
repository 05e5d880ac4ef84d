"""The error type every "bad input" exception of the toolkit derives from.

:class:`UserError` means the user can fix it (a missing file, an unknown model, a report of
another model, a bad option); the CLIs print its message as one line on stderr and exit with
code 2. Everything else is a bug or an environment failure (exit 1, see :mod:`attnprobe.core.cli`).
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input; the message says what to change."""
