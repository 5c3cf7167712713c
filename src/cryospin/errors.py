"""User-facing errors.

Every problem caused by the user's input (a missing file, a malformed star, NaN pixels) raises
:class:`InputError` with one line naming the file and the problem. The CLI prints that line and
exits with status 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CryospinError", "InputError", "OutputError"]


class CryospinError(Exception):
    """Base class of errors the CLI reports as one line, without a traceback."""


class InputError(CryospinError):
    """Bad input: the message names the file (when there is one) and the problem."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class OutputError(CryospinError):
    """An output cannot be written (unwritable folder, disk full)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
