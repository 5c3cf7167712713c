"""Memory release: hand the C heap's free memory back to the operating system.

A leaf module (no cryospin imports): the streaming loader calls it after each chunk, the
trainer at the phase boundaries of a run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["return_free_memory"]


def return_free_memory() -> None:
    """Hand the C heap's free memory back to the operating system (glibc ``malloc_trim(0)``,
    every arena); a no-op where there is no glibc.

    glibc keeps freed blocks of its heaps (one per thread that allocated) for reuse, so a
    process that allocates and frees large temporaries batch after batch, and a prefetch
    thread that builds chunks in its own arena, keep resident memory that nothing uses. Called
    after each streamed chunk and at the phase boundaries of a run, it keeps the resident set
    near what :func:`cryospin.train.memory.plan_memory` predicts. Its cost did not show in an
    A/B of streamed epochs with and without it (40,000 particles, 64 px; benchmarks/RESULTS.md
    "Scale").
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (looked up once), or None without glibc."""
    name = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn
