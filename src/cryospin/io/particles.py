"""The one loader: `load_particles` reads a :class:`ParticleSet` from any supported format.

The format modules read and write their files (:mod:`cryospin.io.star`, :mod:`cryospin.io.cs`,
:mod:`cryospin.io.pkl`; plain stacks here), all checking their stacks with
:func:`cryospin.io.stack_check.check_stacks`; this module picks the reader by suffix, applies
cryoDRGN CTF and pose pickles and an index selection, and scans the images. ``ParticleSet``
(:mod:`cryospin.io.particle_set`) is re-exported here, its usual import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.io import pkl
from cryospin.io.cs import read_cryosparc
from cryospin.io.mrc import open_stack
from cryospin.io.particle_set import ParticleSet
from cryospin.io.stack_check import check_stacks
from cryospin.io.star import read_relion_star_group
from cryospin.io.star_write import write_relion_star

__all__ = [
    "ParticleSet",
    "load_particles",
    "load_indices",
    "write_particles_star",
    "write_cryodrgn_poses",
    "write_cryodrgn_ctf",
]


# ---------------------------------------------------------------------------- loading
def load_indices(ind: str | Path | Sequence[int] | np.ndarray | Tensor, n: int | None = None
                 ) -> np.ndarray:
    """0-based particle indices from a ``.pkl``/``.npy``/``.txt`` file or an int array `(m,)`."""
    if isinstance(ind, (str, Path)):
        p = Path(ind)
        if not p.is_file():
            raise InputError("index file not found", p)
        try:
            if p.suffix == ".pkl":
                arr = np.asarray(pkl.safe_load_pickle(p))  # numpy/containers only, never code
            elif p.suffix == ".npy":
                arr = np.load(p, allow_pickle=False)
            else:
                arr = np.loadtxt(p, dtype=np.int64, ndmin=1)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
            msg = " ".join(str(exc).split())[:300]
            raise InputError(f"cannot read particle indices ({msg})", p) from None
        where: Path | None = p
    else:
        arr = ind.detach().cpu().numpy() if isinstance(ind, Tensor) else np.asarray(ind)
        where = None
    arr = np.atleast_1d(arr)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"particle indices must be a 1D integer array, got {arr.dtype}"
                         f" of shape {arr.shape}", where)
    arr = arr.astype(np.int64)
    if n is not None and arr.size and (arr.min() < 0 or arr.max() >= n):
        raise InputError(
            f"particle index {int(arr.min() if arr.min() < 0 else arr.max())} out of range "
            f"for {n} particles (0-based)", where,
        )
    return arr


def load_particles(
    path: str | Path,
    *,
    ctf_pkl: str | Path | None = None,
    poses_pkl: str | Path | None = None,
    ind: str | Path | Sequence[int] | np.ndarray | Tensor | None = None,
    datadir: str | Path | None = None,
    no_ctf: bool = False,
    check_finite: bool = True,
    metadata_only: bool = False,
    box_px: int | None = None,
    defaults: Mapping[str, float] | None = None,
    optics_group: int | str | None = None,
) -> ParticleSet:
    """Load particles from ``.star`` (RELION 3.0/3.1/5), ``.cs`` (cryoSPARC), ``.txt`` (a list
    of stacks, one per line, relative to the txt's folder) or ``.mrcs``/``.mrc`` (one stack).

    Parameters
    ----------
    path : metadata file.
    ctf_pkl : cryoDRGN ``ctf.pkl`` `(N, 9)`; replaces the file's CTF (required for plain stacks
        unless ``no_ctf``).
    poses_pkl : cryoDRGN ``pose.pkl``; replaces the file's poses.
    ind : 0-based indices (``.pkl``/``.npy``/``.txt`` file or int array) selecting particles,
        applied after ``ctf_pkl``/``poses_pkl`` (which describe the full set).
    datadir : folder holding the stacks, when the paths in the metadata do not resolve.
    no_ctf : proceed without CTF parameters.
    check_finite : scan the selected images for NaN/Inf (streamed in chunks); constant
        (zero-variance) images give a warning.
    metadata_only : do not open any stack (the box must then be known from the metadata or
        ``box_px``); for inspecting files whose images are absent.
    box_px : box size to use when the metadata does not give it and stacks are not opened.
    defaults : values for missing columns, keyed by RELION column name (``.star`` only), e.g.
        ``{"rlnAmplitudeContrast": 0.1}``.
    optics_group : ``.star`` only: keep the particles of this optics group (its
        ``rlnOpticsGroup`` number or ``rlnOpticsGroupName``), e.g. one pixel size of a star
        that mixes several. ``ctf_pkl`` and ``poses_pkl`` describe every row of the file (the
        group's rows are taken from them); ``ind`` indexes the group's particles.

    Raises
    ------
    InputError
        Missing/unreadable files, missing CTF (naming the columns), bad indices, NaN/Inf pixels,
        conflicting pixel sizes or boxes.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    suffix = path.suffix.lower()
    need_ctf = not no_ctf and ctf_pkl is None
    rows: np.ndarray | None = None  # the file's rows read (an optics group), None: all
    if optics_group is not None and suffix != ".star":
        raise InputError("--optics-group selects from a RELION .star's optics groups; this "
                         "file is not a .star", path)
    if suffix == ".star":
        ps, rows, n_rows = read_relion_star_group(
            path, datadir=datadir, no_ctf=not need_ctf, metadata_only=metadata_only,
            box_px=box_px, defaults=defaults, optics_group=optics_group,
        )
    elif suffix == ".cs":
        ps = read_cryosparc(
            path, datadir=datadir, no_ctf=not need_ctf, metadata_only=metadata_only,
            box_px=box_px,
        )
    elif suffix in (".txt", ".mrcs", ".mrc"):
        if need_ctf:
            raise InputError(
                "a plain image stack has no CTF parameters: give them with --ctf ctf.pkl, or "
                "use --no-ctf", path
            )
        ps = _read_plain_stacks(path, datadir=datadir)
    else:
        raise InputError(
            f"unknown particle file type {path.suffix!r} (expected .star, .cs, .txt, .mrcs)",
            path,
        )
    if ctf_pkl is not None:
        ctf, pkl_box, pkl_apix = pkl.read_cryodrgn_ctf(ctf_pkl)
        n_file = len(ps) if rows is None else n_rows
        if len(ctf) != n_file:
            raise InputError(f"CTF pickle has {len(ctf)} rows but {path} has {n_file} particles",
                             ctf_pkl)
        if rows is not None:
            ctf = ctf[torch.from_numpy(rows)]
        if pkl_box != ps.box_px and ps.box_px > 0:
            raise InputError(f"CTF pickle says box {pkl_box} px but the images are "
                             f"{ps.box_px} px", ctf_pkl)
        replace: dict[str, Any] = {"ctf": ctf}
        if ps.pixel_size_angstrom <= 0:
            replace["pixel_size_angstrom"] = pkl_apix
        elif abs(ps.pixel_size_angstrom - pkl_apix) > 1e-3 * pkl_apix:
            raise InputError(
                f"conflicting pixel sizes: CTF pickle {pkl_apix:g} Å, {path.name} "
                f"{ps.pixel_size_angstrom:g} Å", ctf_pkl,
            )
        ps = dataclasses.replace(ps, **replace)
    if poses_pkl is not None:
        rot, shift = pkl.read_cryodrgn_poses(poses_pkl, ps.box_px)
        n_file = len(ps) if rows is None else n_rows
        if rot.shape[0] != n_file:
            raise InputError(f"pose pickle has {rot.shape[0]} rows but {path} has {n_file} "
                             f"particles", poses_pkl)
        if rows is not None:
            rot, shift = rot[torch.from_numpy(rows)], shift[torch.from_numpy(rows)]
        ps = ps.with_poses(rot, shift)
    if ind is not None:
        ps = ps.subset(load_indices(ind, len(ps)))
    if check_finite and not metadata_only:
        ps.check_finite()
    return ps


def _read_plain_stacks(path: Path, *, datadir: str | Path | None) -> ParticleSet:
    if path.suffix.lower() == ".txt":
        if not path.is_file():  # a directory, or a FIFO that would block the read forever
            raise InputError("not a regular file", path)
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read stack list ({exc})", path) from None
        base = Path(datadir) if datadir is not None else path.parent
        stack_paths = []
        line_no = []
        for k, ln in enumerate(lines, start=1):
            if not ln or ln.startswith("#"):
                continue
            p = Path(ln)
            stack_paths.append(p if p.is_absolute() else base / p)
            line_no.append(k)
        if not stack_paths:
            raise InputError("stack list is empty", path)
        stacks = []
        for k, p in zip(line_no, stack_paths, strict=True):
            try:
                stacks.append(open_stack(p))
            except InputError as exc:  # name the list and the line, then the stack's problem
                problem = str(exc)
                if exc.path and problem.startswith(f"{exc.path}: "):
                    problem = problem[len(exc.path) + 2:]
                raise InputError(f"line {k}: stack {p}: {problem}", path) from None
    else:
        stacks = [open_stack(path)]
    counts = [len(s) for s in stacks]
    n = sum(counts)
    opened = tuple(s.path for s in stacks)
    stack_index = np.repeat(np.arange(len(stacks), dtype=np.int64), counts)
    image_index = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    box, pixel_size = check_stacks(opened, stack_index, image_index, source=path,
                                   box_field="box", metadata_box_px=None)
    return ParticleSet(
        source=path,
        stack_paths=opened,
        stack_index=stack_index,
        image_index=image_index,
        box_px=box,
        pixel_size_angstrom=0.0 if np.isnan(pixel_size) else pixel_size,
        ctf=None,
        rotations=None,
        shifts_px=None,
        optics_group=np.ones(n, dtype=np.int64),
    )


# ---------------------------------------------------------------------------- writing
def write_particles_star(path: str | Path, particles: ParticleSet, *,
                         relative_to: str | Path | None = None,
                         columns: Mapping[str, np.ndarray] | None = None) -> None:
    """Write ``particles`` as a RELION 3.1 star file, carrying the input's columns and image
    paths, with ``columns`` `(N,)` set by name (see
    :func:`cryospin.io.star_write.write_relion_star`)."""
    write_relion_star(path, particles, relative_to=relative_to, columns=columns)


def write_cryodrgn_poses(
    path: str | Path, rotations: Tensor, shifts_px: Tensor, box_px: int
) -> None:
    """Write a cryoDRGN ``pose.pkl`` (see :func:`cryospin.io.pkl.write_cryodrgn_poses`)."""
    pkl.write_cryodrgn_poses(path, rotations, shifts_px, box_px)


def write_cryodrgn_ctf(path: str | Path, particles: ParticleSet) -> None:
    """Write the particles' CTF as a cryoDRGN ``ctf.pkl`` `(N, 9)`."""
    if particles.ctf is None:
        raise ValueError("the particle set has no CTF parameters to write")
    pkl.write_cryodrgn_ctf(path, particles.ctf, particles.box_px, particles.pixel_size_angstrom)
