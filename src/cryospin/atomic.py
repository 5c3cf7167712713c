"""Atomic file output: write to a temporary name in the same folder, fsync, rename.

A crash or kill while writing never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryospin.errors import OutputError

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename onto ``path``.

    The temporary file keeps the final suffix (``.tmp.<random>.<suffix>``) so writers that look
    at the extension (mrcfile, starfile) still work. On any exception the temporary file is
    removed and ``path`` is left untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.tmp.", suffix=path.suffix, dir=folder
        )
    except OSError as exc:
        raise OutputError(f"cannot write here ({exc.strerror})", folder) from None
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
        raise OutputError(f"write failed ({exc.strerror})", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _set_default_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 minus the umask), not mkstemp's 0600."""
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
