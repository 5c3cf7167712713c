"""The identity of a particle set, recorded with a run so that ``--resume`` trains the same one.

A run's per-particle state (pose table, tracked particles, half split) belongs to its particles
by row number. Resuming with another particle file of the same box would silently attach the
old run's poses to the new particles; with another box it fails deep inside the model. So a run
records, at its start, ``particle_set.json``:

* ``num_particles`` and ``box_px`` (the original particles' box, before any ``--box`` crop);
* ``image_names_sha256``: a hash of every particle's image name, ``INDEX@STACK`` as in
  ``rlnImageName`` but with the stack's file name only (data moved to another folder still
  matches);
* ``end_pixels_sha256``: a hash of the first and the last image's pixels (float32, as stored).

:func:`check_same_particles` compares them on resume and names what differs in one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.io.particle_set import ParticleSet

__all__ = [
    "ParticleSetIdentity",
    "particle_set_identity",
    "identity_differences",
    "save_identity",
    "load_identity",
    "check_same_particles",
]


@dataclass(frozen=True)
class ParticleSetIdentity:
    """What identifies a particle set (see the module docstring).

    Attributes
    ----------
    num_particles : int
    box_px : int
    image_names_sha256 : str
    end_pixels_sha256 : str
    source : str
        The metadata file it was read from (informative only, never compared: data may move).
    """

    num_particles: int
    box_px: int
    image_names_sha256: str
    end_pixels_sha256: str
    source: str = ""


def _names_hash(particles: ParticleSet) -> str:
    """sha256 of the particles' ``INDEX@STACK_FILE_NAME`` sequence, computed on arrays: the
    stacks in order of first use, each particle's stack (renumbered so) and 0-based index."""
    stack_index = np.asarray(particles.stack_index, dtype=np.int64)
    image_index = np.asarray(particles.image_index, dtype=np.int64)
    used, first = np.unique(stack_index, return_index=True)
    order = used[np.argsort(first, kind="stable")]  # stacks in order of first use
    renumber = np.zeros(len(particles.stack_paths), dtype=np.int64)
    renumber[order] = np.arange(order.size, dtype=np.int64)
    h = hashlib.sha256()
    h.update(json.dumps([Path(particles.stack_paths[s]).name for s in order.tolist()]).encode())
    h.update(b"\0")
    h.update(renumber[stack_index].astype("<i8").tobytes())
    h.update(image_index.astype("<i8").tobytes())
    return h.hexdigest()


def particle_set_identity(particles: ParticleSet) -> ParticleSetIdentity:
    """The identity of ``particles`` (a :class:`~cryospin.io.particles.ParticleSet`); reads the
    first and the last image."""
    n = len(particles)
    pixels = hashlib.sha256()
    if n:
        ends = particles.images_numpy(np.array([0, n - 1], dtype=np.int64))  # (2, L, L)
        pixels.update(np.ascontiguousarray(ends, dtype="<f4").tobytes())
    return ParticleSetIdentity(
        num_particles=n,
        box_px=int(particles.box_px),
        image_names_sha256=_names_hash(particles),
        end_pixels_sha256=pixels.hexdigest(),
        source=str(getattr(particles, "source", "")),
    )


def identity_differences(recorded: ParticleSetIdentity,
                         current: ParticleSetIdentity) -> list[str]:
    """What differs, current against recorded: ``["count 100 vs 1500", "box 32 vs 16 px",
    "image names", "pixels of the first/last image"]`` ([] when the same set)."""
    out = []
    if current.num_particles != recorded.num_particles:
        out.append(f"count {current.num_particles} vs {recorded.num_particles}")
    if current.box_px != recorded.box_px:
        out.append(f"box {current.box_px} vs {recorded.box_px} px")
    if current.image_names_sha256 != recorded.image_names_sha256:
        out.append("image names")
    if current.end_pixels_sha256 != recorded.end_pixels_sha256:
        out.append("pixels of the first/last image")
    return out


def save_identity(path: str | Path, identity: ParticleSetIdentity) -> None:
    """Write ``identity`` as JSON to ``path``, atomically."""
    atomic_write_text(path, json.dumps(asdict(identity), indent=2) + "\n")


def load_identity(path: str | Path) -> ParticleSetIdentity | None:
    """The identity recorded at ``path``; None when there is no such file (a run made before
    cryospin recorded one).

    Raises
    ------
    InputError
        When the file exists but cannot be read or parsed.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ParticleSetIdentity(
            num_particles=int(raw["num_particles"]), box_px=int(raw["box_px"]),
            image_names_sha256=str(raw["image_names_sha256"]),
            end_pixels_sha256=str(raw["end_pixels_sha256"]), source=str(raw.get("source", "")),
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise InputError("unreadable record of the run's particles", path) from None


def check_same_particles(path: str | Path, particles: ParticleSet,
                         run_dir: str | Path) -> ParticleSetIdentity | None:
    """Refuse to resume the run in ``run_dir`` with particles other than those recorded at
    ``path``.

    Returns
    -------
    ParticleSetIdentity or None
        The particles' identity when it matches the record; None when there is no record (an
        old run: the caller warns and may record it now).

    Raises
    ------
    InputError
        ``RUN: these are not the particles the run started with (count 100 vs 1500, image
        names, ...); resume with the run's particles (FILE) or start a new run with -o``.
    """
    recorded = load_identity(path)
    if recorded is None:
        return None
    current = particle_set_identity(particles)
    diffs = identity_differences(recorded, current)
    if diffs:
        was = f" ({recorded.source})" if recorded.source else ""
        raise InputError(f"these are not the particles the run started with "
                         f"({', '.join(diffs)}); resume with the run's particles{was} or start "
                         "a new run with -o", run_dir)
    return current
