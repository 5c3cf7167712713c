"""Atomic file output: write to a temporary name in the same folder, fsync, rename.

A crash or kill while writing never leaves a half-written file under the final name. A kill
(SIGKILL, power loss) can leave the temporary file itself behind (``.NAME.tmp.XXXXXXXX.SUFFIX``,
hidden); :func:`remove_stale_temporaries` deletes those, e.g. when a run is resumed. A failed
write (disk full, file-size limit, permissions) raises :class:`~cryospin.errors.OutputError`
with one line naming the file and the reason, and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryospin.errors import OutputError

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "describe_os_error",
    "remove_stale_temporaries",
]

_TMP_TAG = ".tmp."

# errno -> what the user can do about it
_HINTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space or raise the quota",
    errno.EFBIG: "the file-size limit (ulimit -f) was reached",
}


def describe_os_error(exc: OSError) -> str:
    """One line for ``exc``: the system's wording, plus a hint for disk-full style errors.

    ``OSError(ENOSPC)`` -> ``"No space left on device; free some space"``.
    """
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    hint = _HINTS.get(exc.errno) if exc.errno is not None else None
    return f"{reason}; {hint}" if hint else reason


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename onto ``path``.

    The temporary file keeps the final suffix (``.tmp.<random>.<suffix>``) so writers that look
    at the extension (mrcfile, starfile) still work. On any exception the temporary file is
    removed and ``path`` is left untouched.

    Raises
    ------
    OutputError
        When the temporary file cannot be created, written, flushed or renamed: an ``OSError``
        (or an exception caused by one, as ``torch.save`` raises) becomes one line naming
        ``path`` and the reason (e.g. ``write failed (No space left on device; free some
        space)``). Other exceptions pass through unchanged.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}{_TMP_TAG}", suffix=path.suffix, dir=folder
        )
    except OSError as exc:
        raise OutputError(f"cannot write here ({describe_os_error(exc)})", folder) from None
    os.close(fd)
    tmp = Path(tmp_name)
    _set_default_mode(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"write failed ({describe_os_error(exc)})", path) from None
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        cause = _os_error_in_chain(exc)  # writers that wrap the OSError (torch.save does)
        if cause is None:
            raise
        raise OutputError(f"write failed ({describe_os_error(cause)})", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    """The first OSError with an errno among ``exc``'s causes/contexts, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def _set_default_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 minus the umask), not mkstemp's
    0600."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files that :func:`atomic_path` left in ``folder`` when killed.

    Only hidden files named ``.NAME.tmp.XXXXXXXX[.SUFFIX]`` (the pattern of
    :func:`atomic_path`) are removed; call it only when no other process writes to ``folder``
    (e.g. when resuming a run). Returns the removed paths (unremovable ones are skipped).
    """
    removed = []
    folder = Path(folder)
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith(".") and _TMP_TAG in name[1:] and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return sorted(removed)
