"""Reading RELION ``.star`` particle files (3.0, 3.1, 5); the RELION <-> cryospin pose conventions.

Conventions (proven against cryoDRGN's parses in the tests; see ``docs/conventions.md``,
"RELION and cryoSPARC"):

* Rotation: cryospin's ``R`` equals RELION's Euler matrix
  ``A = Rz(psi)·Ry(tilt)·Rz(rot)`` (passive ZYZ,
  :func:`cryospin.rotations.relion_matrix_from_euler`).
  RELION's projector samples the map at ``Aᵀ (kx, ky, 0)ᵀ = k @ A``, exactly cryospin's slice.
* Shift: RELION's origin is the translation that *centres* the image (RELION translates the
  image by ``+origin``), so ``shift_px = −origin_px``; ``origin_px = rlnOriginX/Y`` (3.0) or
  ``rlnOriginX/YAngst / pixel size`` (3.1+).
* CTF parameters map one to one (``rlnDefocusU/V`` Å, ``rlnDefocusAngle`` °, ``rlnVoltage`` kV,
  ``rlnSphericalAberration`` mm, ``rlnAmplitudeContrast``, ``rlnPhaseShift`` °, ``rlnCtfBfactor``
  Å²).
* ``rlnImageName = "idx@path"`` with a 1-based ``idx``; paths relative to the star's folder (or
  ``datadir``).
* Round trip: the reader keeps the particle and optics tables as text
  (``ParticleSet.star_table``, ``ParticleSet.optics``); the writer
  (:mod:`cryospin.io.star_write`) gives back every column in the input's order and text, with
  the poses (and whatever else the particle set changed) replaced.

The text tables themselves (blocks, optics groups, loops) are :mod:`cryospin.io.star_tables`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io._paths import resolve_stack_path
from cryospin.io.particle_set import ParticleSet
from cryospin.io.stack_check import check_stacks
from cryospin.io.star_tables import (
    finite_column,
    merge_optics,
    numeric_table,
    pixel_sizes_angstrom,
    read_star_tables,
    select_optics_group,
)
from cryospin.rotations import relion_euler_from_matrix, relion_matrix_from_euler

__all__ = [
    "CTF_COLUMNS",
    "rotation_from_relion_euler",
    "relion_euler_from_rotation",
    "shift_px_from_relion_origin",
    "relion_origin_from_shift_px",
    "read_relion_star",
    "read_relion_star_group",
]

#: CTF columns a particle star must have (after merging optics); phase shift and B-factor
#: default to 0 when absent.
CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
_MAX_IMAGE_INDEX = 2**62  # far beyond any stack; keeps indices inside int64
#: numeric columns checked up front (finite numbers) when present; value: (integer, positive)
_CHECKED_COLUMNS = {
    "rlnImagePixelSize": (False, False),
    "rlnPixelSize": (False, False),
    "rlnDetectorPixelSize": (False, False),
    "rlnMagnification": (False, False),
    "rlnImageSize": (True, True),
    "rlnRandomSubset": (True, False),
}


# ---------------------------------------------------------------------------- conventions
def rotation_from_relion_euler(
    rot_deg: Tensor | ArrayLike, tilt_deg: Tensor | ArrayLike, psi_deg: Tensor | ArrayLike
) -> Tensor:
    """RELION Euler angles (degrees, `(N,)`) -> cryospin rotations `(N, 3, 3)`.

    ``R = A = Rz(psi)·Ry(tilt)·Rz(rot)`` (RELION's ``Euler_angles2matrix``); equal to cryoDRGN's
    ``utils.R_from_relion``. Follows the input dtype (float64 for numpy/lists).
    """
    return relion_matrix_from_euler(_tensor(rot_deg), _tensor(tilt_deg), _tensor(psi_deg))


def relion_euler_from_rotation(R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """cryospin rotations `(..., 3, 3)` -> RELION ``(rot, tilt, psi)`` in degrees, each `(...)`.

    cryospin's ``R`` is RELION's Euler matrix ``A`` (docs/conventions.md), so this is
    :func:`cryospin.rotations.relion_euler_from_matrix`.
    """
    return relion_euler_from_matrix(R)


def shift_px_from_relion_origin(origin_px: Tensor | ArrayLike) -> Tensor:
    """RELION origin `(N, 2)` ``(rlnOriginX, rlnOriginY)`` in pixels -> ``shift_px = −origin``."""
    return -_tensor(origin_px)


def relion_origin_from_shift_px(shift_px: Tensor | ArrayLike) -> Tensor:
    """cryospin ``shift_px`` `(N, 2)` -> RELION origin in pixels ``= −shift_px``."""
    return -_tensor(shift_px)


def _tensor(x: Tensor | ArrayLike) -> Tensor:
    """``x`` itself when a tensor, else as a float64 tensor."""
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))


def _parse_image_names(names: pd.Series, path: Path) -> tuple[np.ndarray, list[str]]:
    """``"idx@path"`` -> 0-based indices `(N,)` and the raw paths."""
    idx = np.empty(len(names), dtype=np.int64)
    paths: list[str] = []
    missing = np.flatnonzero(names.isna().to_numpy())
    if missing.size:
        raise InputError(f"row {int(missing[0]) + 1}: missing rlnImageName (short row?)", path)
    for i, name in enumerate(names.astype(str).tolist()):
        num, sep, p = name.partition("@")
        if not sep:  # a single-image file
            idx[i] = 0
            paths.append(name.strip())
            continue
        num = num.strip()
        if not (num.isascii() and num.lstrip("-").isdigit()):
            raise InputError(f"row {i + 1}: bad rlnImageName {name!r} (expected idx@path)",
                             path)
        k = int(num)
        if k > _MAX_IMAGE_INDEX:
            raise InputError(f"row {i + 1}: image index {k} in rlnImageName is too large",
                             path)
        if k <= 0:
            raise InputError(
                f"row {i + 1}: image index {k} in rlnImageName {name!r}; RELION indices "
                f"are 1-based", path,
            )
        idx[i] = k - 1
        paths.append(p.strip())
    return idx, paths


def _unique_value(values: np.ndarray, what: str, path: Path, rel: float = 1e-4) -> float:
    vals = np.unique(values[np.isfinite(values)])
    if vals.size == 0:
        return math.nan
    if (vals.max() - vals.min()) > rel * abs(vals.max()):
        shown = ", ".join(f"{v:g}" for v in vals[:6])
        raise InputError(f"conflicting {what} ({shown}); select one optics group with "
                         f"--optics-group N or NAME", path)
    return float(vals[0])


def read_relion_star(
    path: str | Path,
    *,
    datadir: str | Path | None = None,
    no_ctf: bool = False,
    metadata_only: bool = False,
    box_px: int | None = None,
    defaults: Mapping[str, float] | None = None,
    optics_group: int | str | None = None,
) -> ParticleSet:
    """Read a RELION 3.0/3.1/5 particle star file into a :class:`ParticleSet`.

    Parameters
    ----------
    path : the ``.star`` file.
    datadir : folder to look for the stacks in first (else the star's folder).
    no_ctf : do not require (nor read) CTF columns.
    metadata_only : do not open the stacks (box from ``rlnImageSize`` or ``box_px``).
    box_px : box size when neither the star nor (unopened) stacks give it.
    defaults : values for columns missing from the star, e.g. ``{"rlnAmplitudeContrast": 0.1}``.
    optics_group : read only this optics group's particles (number or name; see
        :func:`select_optics_group`); the optics table keeps only that group. None: all.

    Raises
    ------
    InputError
        Missing file or stacks, rows past the end of a stack, index ≤ 0, missing CTF columns
        (named), conflicting pixel sizes or boxes, non-square images, an unknown optics group.
    """
    return read_relion_star_group(
        path, datadir=datadir, no_ctf=no_ctf, metadata_only=metadata_only, box_px=box_px,
        defaults=defaults, optics_group=optics_group,
    )[0]


def read_relion_star_group(
    path: str | Path,
    *,
    datadir: str | Path | None = None,
    no_ctf: bool = False,
    metadata_only: bool = False,
    box_px: int | None = None,
    defaults: Mapping[str, float] | None = None,
    optics_group: int | str | None = None,
) -> tuple[ParticleSet, np.ndarray | None, int]:
    """:func:`read_relion_star`, also returning which of the file's rows were read.

    Returns
    -------
    particles : ParticleSet
    rows : `(n,)` int64 or None
        With ``optics_group``: the 0-based rows of the file's particle table that were read
        (to align files that describe every row, such as a cryoDRGN ``ctf.pkl``); else None.
    n_rows : int
        Number of rows of the file's particle table.
    """
    path = Path(path)
    particles_text, optics_text = read_star_tables(path, as_text=True)
    optics = None if optics_text is None else numeric_table(optics_text)
    df = merge_optics(numeric_table(particles_text), optics, path)
    n_rows = len(df)
    selected = None
    if optics_group is not None:
        selected, number = select_optics_group(df, optics, optics_group, path)
        df = df.iloc[selected].reset_index(drop=True)
        particles_text = particles_text.iloc[selected].reset_index(drop=True)
        assert optics_text is not None  # select_optics_group refuses a star without optics
        keep = (pd.to_numeric(optics_text["rlnOpticsGroup"], errors="coerce") == number)
        optics_text = optics_text[keep.to_numpy()].reset_index(drop=True)
    for col, value in (defaults or {}).items():
        if col not in df.columns:
            df[col] = value
    _check_particle_columns(df, path)
    image_index, raw_paths = _parse_image_names(df["rlnImageName"], path)
    codes, uniques = pd.factorize(pd.Series(raw_paths))
    ddir = None if datadir is None else Path(datadir)
    stack_paths = tuple(
        resolve_stack_path(u, base_dir=path.parent, datadir=ddir, must_exist=not metadata_only,
                           source=path)
        for u in uniques.tolist()
    )
    stack_index = codes.astype(np.int64)
    apix_per = pixel_sizes_angstrom(df)
    box, pixel_size = _box_and_pixel_size(df, apix_per, stack_paths, stack_index, image_index,
                                          path, box_px=box_px, metadata_only=metadata_only)
    ctf = None if no_ctf else _ctf_from_table(df, path)
    rotations, shifts = _poses_from_table(df, apix_per, pixel_size, path)
    return ParticleSet(
        source=path,
        stack_paths=stack_paths,
        stack_index=stack_index,
        image_index=image_index,
        box_px=box,
        pixel_size_angstrom=pixel_size,
        ctf=ctf,
        rotations=rotations,
        shifts_px=shifts,
        optics_group=(df["rlnOpticsGroup"].to_numpy(np.int64) if "rlnOpticsGroup" in df.columns
                      else np.ones(len(df), np.int64)),
        optics=optics_text,
        random_subset=(df["rlnRandomSubset"].to_numpy(np.int64)
                       if "rlnRandomSubset" in df.columns else None),
        names=tuple(df["rlnImageName"].astype(str).tolist()),
        star_table=particles_text.reset_index(drop=True),
    ), selected, n_rows


def _check_particle_columns(df: pd.DataFrame, path: Path) -> None:
    """In place on ``df``: a non-empty table with ``rlnImageName``, the numeric columns of
    ``_CHECKED_COLUMNS`` parsed to finite numbers, pixel sizes not negative."""
    if len(df) == 0:
        raise InputError("the particle table is empty", path)
    if "rlnImageName" not in df.columns:
        raise InputError("no rlnImageName column", path)
    for col, (integer, positive) in _CHECKED_COLUMNS.items():
        if col in df.columns:
            df[col] = finite_column(df, col, path, "particle", integer=integer,
                                    positive=positive)
    for col in ("rlnImagePixelSize", "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification"):
        if col in df.columns and (df[col] < 0).any():
            k = int(np.flatnonzero(df[col].to_numpy() < 0)[0])
            raise InputError(f"{col} in particle row {k + 1} is negative", path)


def _box_and_pixel_size(
    df: pd.DataFrame, apix_per: np.ndarray, stack_paths: tuple[Path, ...],
    stack_index: np.ndarray, image_index: np.ndarray, path: Path, *, box_px: int | None,
    metadata_only: bool,
) -> tuple[int, float]:
    """The box (px) and pixel size (Å) the star and the stacks agree on (the stacks checked
    unless ``metadata_only``); pixel size 0 with a warning when neither gives one."""
    pixel_size = _unique_value(apix_per, "pixel sizes (Å)", path)
    star_box = math.nan
    if "rlnImageSize" in df.columns:
        star_box = _unique_value(df["rlnImageSize"].to_numpy(np.float64), "boxes (px)", path, 0)
    image_names = df["rlnImageName"]
    box, pixel_size = check_stacks(
        stack_paths, stack_index, image_index, source=path, box_field="rlnImageSize",
        metadata_box_px=None if math.isnan(star_box) else int(star_box),
        metadata_pixel_size_angstrom=pixel_size, fallback_box_px=box_px,
        open_stacks=not metadata_only, row_name=lambda row: f"{row + 1} ({image_names.iloc[row]})",
    )
    if math.isnan(pixel_size):
        warnings.warn(f"{path}: no pixel size in the star file or stack headers; using 0",
                      stacklevel=3)
        pixel_size = 0.0
    return int(box), float(pixel_size)


def _column(df: pd.DataFrame, col: str, path: Path) -> Tensor:
    try:
        v = np.array(pd.to_numeric(df[col], errors="raise"), dtype=np.float64, copy=True)
    except (ValueError, TypeError):
        raise InputError(f"column {col} is not numeric", path) from None
    if not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise InputError(f"column {col} has a missing/non-finite value in row {bad + 1}", path)
    return torch.from_numpy(v)


def _ctf_from_table(df: pd.DataFrame, path: Path) -> CTFParams:
    missing = [c for c in CTF_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"missing CTF columns {', '.join(missing)} (supply them, or use --no-ctf to "
            f"proceed without CTF)", path,
        )
    n = len(df)

    def opt(col: str) -> Tensor:
        return _column(df, col, path) if col in df.columns else torch.zeros(n, dtype=torch.float64)

    return CTFParams(
        defocus_u_angstrom=_column(df, "rlnDefocusU", path),
        defocus_v_angstrom=_column(df, "rlnDefocusV", path),
        defocus_angle_deg=_column(df, "rlnDefocusAngle", path),
        voltage_kv=_column(df, "rlnVoltage", path),
        cs_mm=_column(df, "rlnSphericalAberration", path),
        amplitude_contrast=_column(df, "rlnAmplitudeContrast", path),
        phase_shift_deg=opt("rlnPhaseShift"),
        bfactor_a2=opt("rlnCtfBfactor"),
    )


def _poses_from_table(
    df: pd.DataFrame, apix_per: np.ndarray, pixel_size: float, path: Path
) -> tuple[Tensor | None, Tensor | None]:
    angle_cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    rotations = None
    if all(c in df.columns for c in angle_cols):
        rotations = rotation_from_relion_euler(*(_column(df, c, path) for c in angle_cols))
    shifts = None
    if "rlnOriginXAngst" in df.columns and "rlnOriginYAngst" in df.columns:
        apix = np.where(np.isfinite(apix_per), apix_per, pixel_size)
        if not (apix > 0).all():
            raise InputError("rlnOriginXAngst/YAngst need a pixel size (rlnImagePixelSize)", path)
        origin_a = torch.stack([_column(df, "rlnOriginXAngst", path),
                                _column(df, "rlnOriginYAngst", path)], dim=1)
        shifts = shift_px_from_relion_origin(origin_a / torch.from_numpy(apix)[:, None])
    elif "rlnOriginX" in df.columns and "rlnOriginY" in df.columns:
        origin = torch.stack([_column(df, "rlnOriginX", path),
                              _column(df, "rlnOriginY", path)], dim=1)
        shifts = shift_px_from_relion_origin(origin)
    elif rotations is not None:
        shifts = torch.zeros(len(df), 2, dtype=torch.float64)
    return rotations, shifts
