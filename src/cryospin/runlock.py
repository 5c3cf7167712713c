"""One cryospin process per output folder: an exclusive lock, and no silent overwrites.

:func:`folder_lock` holds ``FOLDER/.cryospin.lock`` with ``fcntl.flock`` (exclusive,
non-blocking) and writes the holder's PID and command line into it. A second process that
wants the same folder stops at once with one line::

    RUN: in use by another cryospin process (PID 1234: cryospin reconstruct ...); wait for it
    or choose another -o

The kernel releases a ``flock`` when the process ends in any way (exit, exception, Ctrl-C,
SIGKILL, OOM killer), so a dead run never leaves a stale lock: the file stays (it is hidden
and never deleted, which would let two processes lock two different files of that name) and
the next process takes it over. Within one process the lock is re-entrant (``reconstruct
--halves`` holds RUN while each half holds RUN/half_A, RUN/half_B; a library caller may hold a
folder around :func:`cryospin.train.fit.fit`, which takes it again).

:func:`check_output_folder` and :func:`claim_output_folder` add the rule of the commands whose
output is a whole folder (``simulate``, ``backproject``, ``posterior``): a folder that already
holds files is refused unless ``--force`` is given, before anything is read or written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryospin.atomic import describe_os_error
from cryospin.errors import OutputError

__all__ = [
    "LOCK_NAME",
    "folder_lock",
    "lock_holder",
    "describe_command",
    "check_output_folder",
    "claim_output_folder",
]

log = logging.getLogger(__name__)

#: Name of the lock file inside a locked folder (hidden; never deleted).
LOCK_NAME = ".cryospin.lock"
_COMMAND_CHARS = 100  # the holder's command line is shortened to this in messages
# flock errors of file systems without locks (some NFS/Lustre mounts): run unlocked
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

# this process's locks: real path of the lock file -> [fd, depth]
_held: dict[str, list[int]] = {}
_held_guard = threading.Lock()


def describe_command(argv: Sequence[str] | None = None) -> str:
    """The command line ``argv`` as one string (None: this process's ``sys.argv``, the
    program's file name only)."""
    if argv is None:
        argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
                *sys.argv[1:]]
    return " ".join(str(a) for a in argv)


def lock_holder(folder: str | Path) -> str:
    """``"PID 1234: cryospin reconstruct ..."`` from ``FOLDER/.cryospin.lock`` as its last
    holder wrote it (``"PID unknown"`` when unreadable or empty). Says nothing about whether
    the lock is held now."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "PID unknown"
    pid, _, command = text.strip().partition(" ")
    if not pid.isdigit():
        return "PID unknown"
    command = " ".join(command.split())
    if len(command) > _COMMAND_CHARS:
        command = command[:_COMMAND_CHARS].rstrip() + " ..."
    return f"PID {pid}: {command}" if command else f"PID {pid}"


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, command: str | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of the existing folder ``folder`` inside the ``with`` block.

    Parameters
    ----------
    folder : path
        The output folder (must exist).
    command : str, optional
        The holder's command line, written into the lock file with the PID for the message of
        a refused process (default: this process's ``sys.argv``).

    Yields
    ------
    Path
        The lock file, ``folder/.cryospin.lock``.

    Raises
    ------
    OutputError
        When another process holds the folder (``in use by another cryospin process (PID
        ...: ...); wait for it or choose another -o``), or the lock file cannot be created.
        A refused process writes nothing. On a file system without ``flock`` a warning is
        logged and the block runs unlocked.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    key = os.path.realpath(path)
    with _held_guard:
        if key in _held:  # re-entrant within this process
            _held[key][1] += 1
            acquired_here = False
        else:
            acquired_here = True
    if not acquired_here:
        try:
            yield path
        finally:
            _release(key)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot create the lock file {LOCK_NAME} "
                          f"({describe_os_error(exc)})", folder) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise OutputError(f"in use by another cryospin process ({_holder_soon(folder)}); "
                              "wait for it or choose another -o", folder) from None
        if exc.errno not in _NO_LOCKS:
            os.close(fd)
            raise OutputError(f"cannot lock {LOCK_NAME} ({describe_os_error(exc)})",
                              folder) from None
        log.warning("%s: the file system does not support locks (%s): make sure no other "
                    "cryospin process writes into this folder", folder, describe_os_error(exc))
    try:
        record = f"{os.getpid()} {describe_command() if command is None else command}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
    except OSError as exc:  # disk full: the lock holds all the same; only the message suffers
        log.debug("could not write %s (%s)", path, describe_os_error(exc))
    with _held_guard:
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        _release(key)


def _release(key: str) -> None:
    with _held_guard:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
    os.close(entry[0])  # releases the flock (the file is kept, see the module docstring)


def _holder_soon(folder: Path, wait_s: float = 0.5) -> str:
    """:func:`lock_holder`, waiting briefly for a holder that has just locked the file but not
    yet written its PID."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = lock_holder(folder)
        if holder != "PID unknown" or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def _entries(folder: Path) -> list[str]:
    """Names in ``folder`` other than the lock file ([] when it does not exist)."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot list the output folder ({describe_os_error(exc)})",
                          folder) from None


def check_output_folder(folder: str | Path, *, force: bool = False) -> None:
    """Refuse ``folder`` as an output folder when it holds files (unless ``force``) or is not a
    folder. Reads only; call it before any work so that a refusal costs nothing.

    Raises
    ------
    OutputError
        ``DIR: not empty (N files, e.g. gt.mrc); choose another -o or pass --force to write
        into it`` (or ``exists and is not a folder``).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError("exists and is not a folder; choose another -o", folder)
    if force:
        return
    names = _entries(folder)
    if names:
        count = f"{len(names)} files" if len(names) > 1 else "1 file"
        raise OutputError(f"not empty ({count}, e.g. {names[0]}); choose another -o or pass "
                          "--force to write into it (files of the same names are replaced)",
                          folder)


@contextlib.contextmanager
def claim_output_folder(folder: str | Path, *, force: bool = False,
                        command: str | None = None) -> Iterator[Path]:
    """Create ``folder`` and hold its lock inside the ``with`` block, refusing a folder that
    holds files unless ``force`` (checked again under the lock, in case another process wrote
    there since :func:`check_output_folder`).

    A folder created here that holds nothing but the lock file when the block fails is removed
    again (a failed command leaves no empty output folder behind).

    Raises
    ------
    OutputError
        See :func:`check_output_folder` and :func:`folder_lock`; or the folder cannot be
        created.
    """
    folder = Path(folder)
    check_output_folder(folder, force=force)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({describe_os_error(exc)})",
                          folder) from None
    with folder_lock(folder, command=command):
        try:
            check_output_folder(folder, force=force)
            yield folder
        except BaseException:
            if created and not _entries(folder):  # still holding the lock: safe to remove
                with contextlib.suppress(OSError):
                    (folder / LOCK_NAME).unlink()
                    folder.rmdir()
            raise
