"""`ParticleSet`: the one particle container, and `load_particles` reading it from any format.

A `ParticleSet` holds metadata only (where each image lives, CTF, poses, optics); images are
read lazily from memory-mapped stacks by :meth:`ParticleSet.images`. Poses follow cryospin's
conventions (``docs/conventions.md``): ``rotations`` `(N, 3, 3)` left-multiply xyz column
vectors and the central slice samples the volume at ``k @ R``; ``shifts_px`` `(N, 2)` are
``(tx, ty)`` pixels with ``image(r) = P(r − t)``. Readers convert RELION/cryoSPARC/cryoDRGN
conventions at the edge (:mod:`cryospin.io.star`, :mod:`cryospin.io.cs`, :mod:`cryospin.io.pkl`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io.mrc import looks_like_3d_map, open_stack, read_header

__all__ = [
    "ParticleSet",
    "load_particles",
    "load_indices",
    "write_particles_star",
    "write_cryodrgn_poses",
    "write_cryodrgn_ctf",
]


def _as_index_array(indices: Any, n: int) -> np.ndarray:
    """0-based particle indices `(m,)` int64 from int/sequence/array/tensor/slice/bool mask."""
    if isinstance(indices, slice):
        return np.arange(n, dtype=np.int64)[indices]
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.atleast_1d(np.asarray(indices))
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean mask of shape {idx.shape} for {n} particles")
        return np.flatnonzero(idx).astype(np.int64)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise IndexError(f"particle indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False).ravel()
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"particle index out of range for {n} particles")
    return np.where(idx < 0, idx + n, idx)


@dataclass(frozen=True, eq=False)
class ParticleSet:
    """Particle metadata with lazy access to the images.

    Attributes
    ----------
    source : Path
        The metadata file it was read from.
    stack_paths : tuple[Path, ...]
        Image stacks (``.mrcs``), resolved.
    stack_index : `(N,)` int64
        Which of ``stack_paths`` holds each particle.
    image_index : `(N,)` int64
        0-based index of each particle within its stack.
    box_px : int
        Image side ``L`` (pixels); images are `(L, L)` indexed ``[y, x]``.
    pixel_size_angstrom : float
        Pixel size (Å).
    ctf : CTFParams or None
        float64 `(N,)` fields; None when loaded with ``no_ctf``.
    rotations : `(N, 3, 3)` float64 or None
        cryospin rotations (left-multiply xyz columns; slice samples the volume at ``k @ R``).
    shifts_px : `(N, 2)` float64 or None
        ``(tx, ty)`` pixels, ``image(r) = P(r − t)``.
    optics_group : `(N,)` int64
        RELION optics group of each particle (1 when unknown).
    optics : pandas.DataFrame or None
        The RELION optics table for writing back, as text (every value as the input file
        wrote it): the input star's ``data_optics``, or one group per cryoSPARC exposure group
        of a ``.cs``; None for RELION 3.0 stars and plain stacks.
    random_subset : `(N,)` int or None
        Half-set 1/2 (``rlnRandomSubset``), when known.
    names : tuple[str, ...] or None
        Original image names (``"idx@path"``, the path as the input wrote it), when known.
    star_table : pandas.DataFrame or None
        Per-particle RELION columns to carry into written star files, as text, one row per
        particle (index ``0..N-1``): the input star's whole particle table in its column
        order, or the columns a ``.cs`` adds (``rlnMicrographName``, ``rlnCoordinateX/Y``,
        ``rlnCtfScalefactor``). :func:`cryospin.io.star.write_relion_star` writes them back.
    cs_table : `(N,)` structured array or None
        The input ``.cs`` rows (every field), for writing a ``.cs`` back
        (:func:`cryospin.io.cs.write_cryosparc`).
    """

    source: Path
    stack_paths: tuple[Path, ...]
    stack_index: np.ndarray
    image_index: np.ndarray
    box_px: int
    pixel_size_angstrom: float
    ctf: CTFParams | None
    rotations: Tensor | None
    shifts_px: Tensor | None
    optics_group: np.ndarray
    optics: pd.DataFrame | None = None
    random_subset: np.ndarray | None = None
    names: tuple[str, ...] | None = None
    star_table: pd.DataFrame | None = None
    cs_table: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = int(np.shape(self.stack_index)[0])
        for name in ("stack_index", "image_index", "optics_group"):
            arr = getattr(self, name)
            if np.shape(arr) != (n,):
                raise ValueError(f"ParticleSet.{name} has shape {np.shape(arr)}, expected ({n},)")
        if self.ctf is not None and len(self.ctf) != n:
            raise ValueError(f"ParticleSet.ctf has {len(self.ctf)} rows, expected {n}")
        if self.rotations is not None and tuple(self.rotations.shape) != (n, 3, 3):
            raise ValueError(f"rotations shape {tuple(self.rotations.shape)} != ({n}, 3, 3)")
        if self.shifts_px is not None and tuple(self.shifts_px.shape) != (n, 2):
            raise ValueError(f"shifts_px shape {tuple(self.shifts_px.shape)} != ({n}, 2)")
        if self.random_subset is not None and np.shape(self.random_subset) != (n,):
            raise ValueError(f"random_subset shape {np.shape(self.random_subset)} != ({n},)")
        if self.names is not None and len(self.names) != n:
            raise ValueError(f"names has {len(self.names)} entries, expected {n}")
        if self.star_table is not None and len(self.star_table) != n:
            raise ValueError(f"star_table has {len(self.star_table)} rows, expected {n}")
        if self.cs_table is not None and np.shape(self.cs_table) != (n,):
            raise ValueError(f"cs_table shape {np.shape(self.cs_table)} != ({n},)")
        if n and (self.stack_index.min() < 0 or self.stack_index.max() >= len(self.stack_paths)):
            raise ValueError("stack_index refers to a stack outside stack_paths")

    def __len__(self) -> int:
        return int(self.stack_index.shape[0])

    def __repr__(self) -> str:
        return (
            f"ParticleSet(source={str(self.source)!r}, n={len(self)}, box_px={self.box_px}, "
            f"pixel_size_angstrom={self.pixel_size_angstrom:g}, stacks={len(self.stack_paths)}, "
            f"ctf={'yes' if self.ctf is not None else 'no'}, "
            f"poses={'yes' if self.rotations is not None else 'no'})"
        )

    # ------------------------------------------------------------------ images
    def images_numpy(self, indices: Any = None) -> np.ndarray:
        """Like :meth:`images` but returns a float32 numpy array `(n, L, L)`."""
        idx = _as_index_array(slice(None) if indices is None else indices, len(self))
        L = self.box_px
        out = np.empty((idx.size, L, L), np.float32)
        if idx.size == 0:
            return out
        stacks = self.stack_index[idx]
        for s in np.unique(stacks).tolist():
            rows = np.flatnonzero(stacks == s)
            stack = open_stack(self.stack_paths[s])
            if stack.box_px != L:
                raise InputError(
                    f"images are {stack.box_px} px but the particle set says {L} px",
                    stack.path,
                )
            out[rows] = stack.read(self.image_index[idx[rows]])  # sorted + coalesced inside
        return out

    def release_pages(self, indices: Any) -> None:
        """Hand back the resident memory-mapped pages of the stacks holding ``indices``
        (:meth:`cryospin.io.mrc.ImageStack.release`): a pass over more images than fit in RAM
        keeps its resident memory bounded."""
        idx = _as_index_array(indices, len(self))
        if idx.size == 0:
            return
        stacks, images = self.stack_index[idx], self.image_index[idx]
        for s in np.unique(stacks).tolist():
            rows = images[stacks == s]
            open_stack(self.stack_paths[s]).release(int(rows.min()), int(rows.max()) + 1)

    def images(self, indices: Any = None) -> Tensor:
        """Images of the particles at 0-based ``indices`` (None = all), in the requested order.

        Reads are grouped by stack and sorted within each stack for contiguous memory-mapped
        reads; nothing else is read.

        Returns
        -------
        `(n, L, L)` float32 tensor, indexed ``[y, x]``.
        """
        return torch.from_numpy(self.images_numpy(indices))

    # ------------------------------------------------------------------ derived sets
    def subset(self, indices: Any) -> ParticleSet:
        """The particles at ``indices`` (int array/tensor/list/slice/bool mask), in that order."""
        idx = _as_index_array(indices, len(self))
        tidx = torch.from_numpy(idx)
        return dataclasses.replace(
            self,
            stack_index=self.stack_index[idx],
            image_index=self.image_index[idx],
            ctf=None if self.ctf is None else self.ctf[tidx],
            rotations=None if self.rotations is None else self.rotations[tidx],
            shifts_px=None if self.shifts_px is None else self.shifts_px[tidx],
            optics_group=self.optics_group[idx],
            random_subset=None if self.random_subset is None else self.random_subset[idx],
            names=None if self.names is None else tuple(self.names[i] for i in idx.tolist()),
            star_table=(None if self.star_table is None
                        else self.star_table.iloc[idx].reset_index(drop=True)),
            cs_table=None if self.cs_table is None else self.cs_table[idx],
        )

    def with_poses(self, rotations: Tensor | None, shifts_px: Tensor | None) -> ParticleSet:
        """A copy with new poses: rotations `(N, 3, 3)`, shifts_px `(N, 2)` (stored float64)."""
        rot = None if rotations is None else torch.as_tensor(rotations).detach().to(
            device="cpu", dtype=torch.float64)
        sh = None if shifts_px is None else torch.as_tensor(shifts_px).detach().to(
            device="cpu", dtype=torch.float64)
        return dataclasses.replace(self, rotations=rot, shifts_px=sh)

    def with_ctf(self, ctf: CTFParams | None) -> ParticleSet:
        """A copy with new CTF parameters (stored as float64 on the CPU)."""
        return dataclasses.replace(
            self, ctf=None if ctf is None else ctf.to(device="cpu", dtype=torch.float64)
        )

    # ------------------------------------------------------------------ checks
    def check_finite(self, batch_size: int = 512) -> None:
        """Stream through the images in chunks of ``batch_size`` and reject NaN/Inf pixels.

        Constant images (zero variance, e.g. blank boxes) are allowed but warned about
        (:class:`UserWarning` naming how many and the first few particle indices).

        Raises
        ------
        InputError
            Naming the number of non-finite pixels, of images holding them, and the first few
            particle indices.
        """
        n = len(self)
        # visit particles in storage order (contiguous reads), report dataset indices
        order = np.lexsort((self.image_index, self.stack_index))
        bad_idx: list[np.ndarray] = []
        flat_idx: list[np.ndarray] = []
        bad_pixels = 0
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            imgs = self.images_numpy(rows).reshape(len(rows), -1)
            self.release_pages(rows)  # a stack larger than RAM stays out of resident memory
            nonfinite = ~np.isfinite(imgs)
            if nonfinite.any():
                per_image = nonfinite.sum(1)
                bad_pixels += int(per_image.sum())
                bad_idx.append(rows[per_image > 0])
            if imgs.shape[1]:
                flat_idx.append(rows[(imgs == imgs[:, :1]).all(1)])
        if bad_pixels:
            bad = np.sort(np.concatenate(bad_idx))
            first = ", ".join(str(i) for i in bad[:5].tolist())
            more = ", ..." if bad.size > 5 else ""
            stacks = sorted({str(self.stack_paths[s]) for s in self.stack_index[bad].tolist()})
            raise InputError(
                f"{bad_pixels} NaN/Inf pixels in {bad.size} of {n} images "
                f"(particles {first}{more}; stack {stacks[0]}"
                f"{f' and {len(stacks) - 1} more' if len(stacks) > 1 else ''})",
                self.source,
            )
        flat = np.sort(np.concatenate(flat_idx)) if flat_idx else np.empty(0, np.int64)
        if flat.size:
            # legal (blank boxes happen) but they carry no signal, and any per-image
            # normalisation by the standard deviation would divide by zero
            first = ", ".join(str(i) for i in flat[:5].tolist())
            warnings.warn(
                f"{self.source}: {flat.size} of {n} images are constant (zero variance; "
                f"particles {first}{', ...' if flat.size > 5 else ''})", stacklevel=2,
            )


# ---------------------------------------------------------------------------- loading
def load_indices(ind: Any, n: int | None = None) -> np.ndarray:
    """0-based particle indices from a ``.pkl``/``.npy``/``.txt`` file or an int array `(m,)`."""
    if isinstance(ind, (str, Path)):
        p = Path(ind)
        if not p.is_file():
            raise InputError("index file not found", p)
        try:
            if p.suffix == ".pkl":
                from cryospin.io.pkl import safe_load_pickle

                arr = np.asarray(safe_load_pickle(p))  # numpy/containers only, never code
            elif p.suffix == ".npy":
                arr = np.load(p, allow_pickle=False)
            else:
                arr = np.loadtxt(p, dtype=np.int64, ndmin=1)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
            msg = " ".join(str(exc).split())[:300]
            raise InputError(f"cannot read particle indices ({msg})", p) from None
        where: Any = p
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
    ind: Any = None,
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
        from cryospin.io.star import read_relion_star_group

        ps, rows, n_rows = read_relion_star_group(
            path, datadir=datadir, no_ctf=not need_ctf, metadata_only=metadata_only,
            box_px=box_px, defaults=defaults, optics_group=optics_group,
        )
    elif suffix == ".cs":
        from cryospin.io.cs import read_cryosparc

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
        from cryospin.io.pkl import read_cryodrgn_ctf

        ctf, pkl_box, pkl_apix = read_cryodrgn_ctf(ctf_pkl)
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
        from cryospin.io.pkl import read_cryodrgn_poses

        rot, shift = read_cryodrgn_poses(poses_pkl, ps.box_px)
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
    for stack in stacks:  # a map read as a stack would train on its z-sections
        if looks_like_3d_map(stack.path):
            raise InputError(f"looks like a 3D map (space group {read_header(stack.path).ispg}, "
                             f"{stack.box_px}³), not a particle stack; pass the particles' "
                             ".mrcs/.star", stack.path)
    boxes = {s.box_px for s in stacks}
    if len(boxes) > 1:
        raise InputError(f"stacks have different boxes {sorted(boxes)} px", path)
    sizes = {round(s.pixel_size_angstrom, 4) for s in stacks if s.pixel_size_angstrom > 0}
    if len(sizes) > 1:
        raise InputError(f"conflicting pixel sizes in stack headers {sorted(sizes)} Å", path)
    counts = [len(s) for s in stacks]
    n = sum(counts)
    return ParticleSet(
        source=path,
        stack_paths=tuple(s.path for s in stacks),
        stack_index=np.repeat(np.arange(len(stacks), dtype=np.int64), counts),
        image_index=np.concatenate([np.arange(c, dtype=np.int64) for c in counts]),
        box_px=boxes.pop(),
        pixel_size_angstrom=float(sizes.pop()) if sizes else 0.0,
        ctf=None,
        rotations=None,
        shifts_px=None,
        optics_group=np.ones(n, dtype=np.int64),
    )


# ---------------------------------------------------------------------------- writing
def write_particles_star(path: str | Path, particles: ParticleSet, *,
                         relative_to: str | Path | None = None) -> None:
    """Write ``particles`` as a RELION 3.1 star file, carrying the input's columns and image
    paths (see :func:`cryospin.io.star.write_relion_star`)."""
    from cryospin.io.star import write_relion_star

    write_relion_star(path, particles, relative_to=relative_to)


def write_cryodrgn_poses(
    path: str | Path, rotations: Tensor, shifts_px: Tensor, box_px: int
) -> None:
    """Write a cryoDRGN ``pose.pkl`` (see :func:`cryospin.io.pkl.write_cryodrgn_poses`)."""
    from cryospin.io.pkl import write_cryodrgn_poses as _write

    _write(path, rotations, shifts_px, box_px)


def write_cryodrgn_ctf(path: str | Path, particles: ParticleSet) -> None:
    """Write the particles' CTF as a cryoDRGN ``ctf.pkl`` `(N, 9)`."""
    from cryospin.io.pkl import write_cryodrgn_ctf as _write

    if particles.ctf is None:
        raise ValueError("the particle set has no CTF parameters to write")
    _write(path, particles.ctf, particles.box_px, particles.pixel_size_angstrom)
