"""``RUN_DIR/run.log``: what a run shows on the console, with date and time, kept in its folder.

:func:`run_log` copies every log record that reaches the root logger (the console's, plus
cryospin's INFO records when the logging configuration would drop them: a library caller gets
a complete file too) to ``RUN_DIR/run.log`` for the duration of a ``with`` block, then removes
its handler (tests and notebooks call the trainer in-process). :func:`note` adds a line to the
attached run logs only, for what the command line prints on stdout (the end-of-run lines).

The records are held in memory until the trainer has accepted the run (:func:`start_run_log`:
the folder, the configuration and the particles checked), then written: a command refused
before that (``--resume`` with other particles, a 3D map given as particles) writes nothing
into the folder. Each invocation starts with a separator line naming its command
(``==== started: cryospin reconstruct ...`` / ``==== resumed: ...``). An exception that leaves
the block is recorded before it goes on: one line for a user error or an interrupt (Ctrl-C,
SIGTERM: the ``--resume`` command), the traceback for anything else.

The file is only ever appended to, every record flushed as it is written: a kill can at worst
cut the last line short (the next invocation starts on a new line). It is not part of an
epoch's commit point (docs/reliability.md). When it cannot be written mid-run (disk full), one
line on stderr says so and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryospin.atomic import describe_os_error
from cryospin.errors import CryospinError, OutputError
from cryospin.rundir import RUN_LOG  # the file name of the log in a run folder

__all__ = ["RUN_LOG", "RECORD_FORMAT", "DATE_FORMAT", "run_log", "start_run_log", "note",
           "header_line"]

RECORD_FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_PACKAGE = "cryospin"


class _RunLogHandler(logging.FileHandler):
    """Holds the records until :meth:`start`, then appends them (flushed one by one); after a
    failed write it says so once on stderr, without a traceback, and drops the rest."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.held: list[logging.LogRecord] | None = []
        self.failed = False

    def start(self) -> None:
        """Open the file (``OSError`` if it cannot be) and write the held records."""
        self.acquire()
        try:
            if self.held is None:
                return
            _start_on_a_new_line(self.baseFilename)
            self.stream = self._open()
            held, self.held = self.held, None
            for record in held:
                self.emit(record)
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
        elif not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if self.failed:
            return
        self.failed = True
        exc = sys.exc_info()[1]
        reason = describe_os_error(exc) if isinstance(exc, OSError) else repr(exc)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"cryospin: {self.baseFilename}: cannot append to the run log "
                             f"({reason}); it is not written for the rest of this run\n")


def _attached() -> list[_RunLogHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, _RunLogHandler)]


def _record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(_PACKAGE, level, __file__, 0, message, None, None)


def _stopped(exc: BaseException) -> logging.LogRecord:
    """The record of an exception leaving the run: one line for a user error or an interrupt
    (their messages say what to do), the traceback otherwise."""
    if isinstance(exc, CryospinError | KeyboardInterrupt):
        return _record(f"==== stopped: {str(exc) or type(exc).__name__} ====", logging.WARNING)
    record = _record(f"==== stopped by {type(exc).__name__}: {exc} ====", logging.ERROR)
    record.exc_info = (type(exc), exc, exc.__traceback__)
    return record


def _start_on_a_new_line(path: str) -> None:
    """Append a newline when the file ends inside a line (cut short by a kill)."""
    try:
        with open(path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        return


def header_line(argv: Sequence[str] | None, *, resumed: bool) -> str:
    """The separator line of an invocation: ``==== resumed: cryospin reconstruct --resume
    run1 ====`` (``argv`` None: an in-process call)."""
    command = shlex.join(argv) if argv else "(in-process call)"
    return f"==== {'resumed' if resumed else 'started'}: {command} ===="


@contextlib.contextmanager
def run_log(path: str | Path, *, header: str | None = None) -> Iterator[None]:
    """Inside: every log record is also kept for ``path``, written from
    :func:`start_run_log` on (module docstring).

    ``header`` comes first (:func:`header_line`). When a run log for ``path`` is attached
    already (the command line around the trainer), nothing more is done.
    """
    where = os.path.abspath(path)
    if any(h.baseFilename == where for h in _attached()):
        yield
        return
    handler = _RunLogHandler(where)
    handler.setFormatter(logging.Formatter(RECORD_FORMAT, DATE_FORMAT))
    package = logging.getLogger(_PACKAGE)
    level = package.level
    if not package.isEnabledFor(logging.INFO):
        package.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        if header is not None:
            handler.handle(_record(header))
        yield
    except BaseException as exc:  # the reason the run stopped, then on its way
        handler.handle(_stopped(exc))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        package.setLevel(level)


def start_run_log(path: str | Path) -> None:
    """The run in ``path``'s folder is accepted: write what the attached run log of ``path``
    holds and append from now on (nothing when none is attached, e.g. on a rank > 0).

    Raises
    ------
    OutputError
        When ``path`` cannot be opened for appending.
    """
    where = os.path.abspath(path)
    for handler in _attached():
        if handler.baseFilename == where:
            try:
                handler.start()
            except OSError as exc:
                raise OutputError(f"cannot write the run log ({describe_os_error(exc)})",
                                  where) from None


def note(message: str) -> None:
    """Add ``message`` (with date and time) to the attached run logs only, not the console:
    for the lines the command line prints itself."""
    for handler in _attached():
        handler.handle(_record(message))
