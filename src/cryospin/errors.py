"""User-facing errors.

Every problem caused by the user's input (a missing file, a malformed star, NaN pixels) raises
:class:`InputError` with one line naming the file and the problem. The CLI prints that line and
exits with status 2, without a traceback.

SIGTERM (a batch scheduler's time limit, ``kill``) is turned by the CLI into
:class:`Terminated`, a :class:`KeyboardInterrupt`, so that it takes Ctrl-C's path (the last
complete checkpoint is kept, the ``--resume`` command printed) and exits with status 143.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CryospinError", "InputError", "OutputError", "Terminated"]


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


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled like Ctrl-C, exit status ``128 + SIGTERM`` = 143.

    Raised by the signal handler that :func:`cryospin.cli.main.main` installs in the main thread.
    """

    exit_status = 143

    def __init__(self, message: str = "terminated (SIGTERM)") -> None:
        super().__init__(message)
