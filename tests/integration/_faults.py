"""Run ``cryospin`` with faults injected, for the crash, kill and disk-full tests.

Usage::

    python _faults.py FAULTS_JSON cryospin-arg ...

``FAULTS_JSON`` is a JSON list of faults; each replaces one function, by its dotted name, with
a wrapper that counts the calls whose arguments match, and acts at the ``call``-th one:

``{"target": "os.fsync", "call": 2, "match": ".checkpoint.pt.tmp", "action": "kill"}``

* ``target``: ``"package.module.attr"`` (the attribute is replaced on that module/class, so
  code that looks it up at call time -- ``os.fsync(...)``, a module global -- sees the fault).
* ``match`` (optional): a substring that the text of one of the call's positional arguments
  must contain to count (an int argument is read as a file descriptor and shown as the path
  it points to).
* ``action``: ``"kill"`` (SIGKILL itself before the call), ``"kill_after"`` (after the call
  returns), ``"enospc"`` (raise ``OSError(ENOSPC)`` instead of the call), or
  ``"fsize"`` (set ``RLIMIT_FSIZE`` to ``limit`` bytes -- SIGXFSZ ignored, so writes beyond
  it fail with EFBIG -- then make the call), or ``"pause"`` (create the file ``marker``, then
  sleep ``seconds`` before the call: a point where the test signals the process from outside).

Always installed: the run report (matplotlib, seconds per run) is skipped, since the tests
here are about the training run's files. Nothing of this touches the production code.

Every replacement goes through ``_replace``, which refuses (exits with a message) a stand-in
whose parameters -- names, kinds, defaults -- differ from the real function's: a stand-in that
drifted from the code it replaces would otherwise fail (or pass) for the wrong reason.
"""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _resolve(dotted: str) -> tuple[object, str]:
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise SystemExit(f"_faults.py: cannot resolve {dotted!r}")


def _parameters(func: Callable[..., object]) -> list[tuple[str, object, object]] | None:
    """``func``'s parameters as (name, kind, default), or None where Python cannot tell them
    (some builtins)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def _replace(owner: object, name: str, stand_in: Callable[..., object]) -> None:
    """Set ``owner.name`` to ``stand_in`` after checking that it takes the same parameters as
    the real function; ``SystemExit`` with both signatures where it does not."""
    real = getattr(owner, name)
    expected = _parameters(real)
    if expected is not None and _parameters(stand_in) != expected:
        raise SystemExit(f"_faults.py: the stand-in for {name} takes {_parameters(stand_in)}, "
                         f"the real function {expected}")
    setattr(owner, name, stand_in)


def _no_report(run_dir: Path, *, halves: bool = False) -> None:
    """Stand-in for ``cryospin.cli.reconstruct._write_report``: no report."""


def _arg_text(arg: object) -> str:
    if isinstance(arg, int) and not isinstance(arg, bool):
        try:
            return os.readlink(f"/proc/self/fd/{arg}")
        except OSError:
            return str(arg)
    return str(arg)


def _install(fault: dict) -> None:
    owner, name = _resolve(fault["target"])
    real = getattr(owner, name)
    state = {"count": 0}
    match = fault.get("match")

    @functools.wraps(real)  # the wrapper passes every argument on: it shows the real signature
    def wrapper(*args, **kwargs):
        if match is None or any(match in _arg_text(a) for a in args):
            state["count"] += 1
            if state["count"] == int(fault.get("call", 1)):
                action = fault["action"]
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif action == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                elif action == "fsize":
                    limit = int(fault["limit"])
                    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
                elif action == "pause":
                    Path(fault["marker"]).touch()
                    time.sleep(float(fault["seconds"]))
                elif action == "kill_after":
                    out = real(*args, **kwargs)
                    os.kill(os.getpid(), signal.SIGKILL)
                    return out
                else:
                    raise SystemExit(f"_faults.py: unknown action {action!r}")
        return real(*args, **kwargs)

    _replace(owner, name, wrapper)


def main() -> int:
    faults = json.loads(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import cryospin.cli.reconstruct as reconstruct

    _replace(reconstruct, "_write_report", _no_report)
    for fault in faults:
        _install(fault)
    from cryospin.cli.main import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
