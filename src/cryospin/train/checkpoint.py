"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a dict saved with :func:`torch.save` through :func:`cryospin.atomic.atomic_path`
(temporary file in the same folder, fsync, rename), so the previous checkpoint stays intact until
the new one is complete; a crash or Ctrl-C during the write leaves the last good one usable.

Contents written by :func:`cryospin.train.fit.fit` (keys): ``format``, ``cryospin_version``,
``config`` (nested dict), ``stage`` (``"autoencode"`` | ``"autodecode"``), ``epoch`` (last
completed epoch, from 1), ``volume``, ``encoder`` (or None after the switch), ``pose_table``
(or None before), ``optimizers`` (name -> state dict), ``rng`` (see :func:`capture_rng_state`),
``data`` (normalisation facts) and ``extra`` (small JSON-like values).

Only tensors, numbers, strings, lists, tuples and dicts are stored, so checkpoints load with
``torch.load(..., weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryospin.atomic import atomic_path
from cryospin.errors import InputError

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

#: Version of the checkpoint layout; bumped when keys change incompatibly.
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (the old file survives any failure).

    ``format`` is added when missing. Raises :class:`cryospin.errors.OutputError` (one line
    naming ``path`` and the reason) if the folder is not writable, the disk is full or the
    file-size limit is reached; the temporary file is removed and the previous checkpoint is
    left as it was.
    """
    state = dict(state)
    state.setdefault("format", CHECKPOINT_FORMAT)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # through a Python file object, so that a failed write (ENOSPC, EFBIG) raises an
        # OSError that atomic_path reports, not only torch's opaque "unexpected pos" error
        torch.save(state, fh)


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    InputError
        When the file is missing, unreadable, not a checkpoint, or of an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found (nothing to resume)", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"not a readable cryospin checkpoint ({first})", path) from None
    if not isinstance(state, dict) or "format" not in state:
        raise InputError("not a cryospin checkpoint", path)
    if state["format"] != CHECKPOINT_FORMAT:
        raise InputError(
            f"checkpoint format {state['format']} is not supported "
            f"(this cryospin reads format {CHECKPOINT_FORMAT})",
            path,
        )
    return state


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """States of the torch (CPU and CUDA), NumPy and Python generators, and of ``generator``."""
    np_state = np.random.get_state()  # noqa: NPY002 (the global state is what is restored)
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": list(py_state[1]),
            "gauss_next": py_state[2],
        },
        "generator": None if generator is None else generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (sets the global generators and ``generator``)."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (restores the global state captured above)
        (
            npst["kind"],
            npst["keys"].cpu().numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
