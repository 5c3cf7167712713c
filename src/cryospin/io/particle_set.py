"""`ParticleSet`: the one particle container (metadata + lazy memory-mapped images).

A `ParticleSet` holds metadata only (where each image lives, CTF, poses, optics); images are
read lazily from memory-mapped stacks by :meth:`ParticleSet.images`. Poses follow cryospin's
conventions (``docs/conventions.md``): ``rotations`` `(N, 3, 3)` left-multiply xyz column
vectors and the central slice samples the volume at ``k @ R``; ``shifts_px`` `(N, 2)` are
``(tx, ty)`` pixels with ``image(r) = P(r − t)``. The format readers build it
(:mod:`cryospin.io.star`, :mod:`cryospin.io.cs`, and :mod:`cryospin.io.particles` for plain
stacks), converting RELION/cryoSPARC/cryoDRGN conventions at the edge;
:func:`cryospin.io.particles.load_particles` reads any of them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io.mrc import open_stack

__all__ = ["ParticleSet", "ParticleIndices"]

#: 0-based particle indices: an int, a sequence, array or tensor of ints, a slice, or a boolean
#: mask over all the particles.
ParticleIndices = int | Sequence[int] | np.ndarray | Tensor | slice


def _as_index_array(indices: ParticleIndices, n: int) -> np.ndarray:
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
        ``rlnCtfScalefactor``). :func:`cryospin.io.star_write.write_relion_star` writes them back.
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
    def images_numpy(self, indices: ParticleIndices | None = None) -> np.ndarray:
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

    def release_pages(self, indices: ParticleIndices) -> None:
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

    def images(self, indices: ParticleIndices | None = None) -> Tensor:
        """Images of the particles at 0-based ``indices`` (None = all), in the requested order.

        Reads are grouped by stack and sorted within each stack for contiguous memory-mapped
        reads; nothing else is read.

        Returns
        -------
        `(n, L, L)` float32 tensor, indexed ``[y, x]``.
        """
        return torch.from_numpy(self.images_numpy(indices))

    # ------------------------------------------------------------------ derived sets
    def subset(self, indices: ParticleIndices) -> ParticleSet:
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
