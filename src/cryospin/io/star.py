"""RELION ``.star`` particle files (3.0, 3.1, 5) and the RELION <-> cryospin pose conventions.

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
  (``ParticleSet.star_table``, ``ParticleSet.optics``); the writer gives back every column in
  the input's order and text, with the poses (and whatever else the particle set changed)
  replaced.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile
import torch
from torch import Tensor

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io._paths import resolve_stack_path
from cryospin.io.particle_set import ParticleSet
from cryospin.io.stack_check import check_stacks
from cryospin.rotations import relion_euler_from_matrix, relion_matrix_from_euler

__all__ = [
    "CTF_COLUMNS",
    "rotation_from_relion_euler",
    "relion_euler_from_rotation",
    "shift_px_from_relion_origin",
    "relion_origin_from_shift_px",
    "read_star_tables",
    "merge_optics",
    "pixel_sizes_angstrom",
    "read_relion_star",
    "read_relion_star_group",
    "select_optics_group",
    "write_relion_star",
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
_OPTICS_COLUMNS_FROM_CTF = {
    "rlnVoltage": "voltage_kv",
    "rlnSphericalAberration": "cs_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
}


# ---------------------------------------------------------------------------- conventions
def rotation_from_relion_euler(rot_deg: Any, tilt_deg: Any, psi_deg: Any) -> Tensor:
    """RELION Euler angles (degrees, `(N,)`) -> cryospin rotations `(N, 3, 3)`.

    ``R = A = Rz(psi)·Ry(tilt)·Rz(rot)`` (RELION's ``Euler_angles2matrix``); equal to cryoDRGN's
    ``utils.R_from_relion``. Follows the input dtype (float64 for numpy/lists).
    """
    def t(x: Any) -> Tensor:
        return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))

    return relion_matrix_from_euler(t(rot_deg), t(tilt_deg), t(psi_deg))


def relion_euler_from_rotation(R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """cryospin rotations `(..., 3, 3)` -> RELION ``(rot, tilt, psi)`` in degrees, each `(...)`.

    cryospin's ``R`` is RELION's Euler matrix ``A`` (docs/conventions.md), so this is
    :func:`cryospin.rotations.relion_euler_from_matrix`.
    """
    return relion_euler_from_matrix(R)


def shift_px_from_relion_origin(origin_px: Any) -> Tensor:
    """RELION origin `(N, 2)` ``(rlnOriginX, rlnOriginY)`` in pixels -> ``shift_px = −origin``."""
    o = origin_px if isinstance(origin_px, Tensor) else torch.as_tensor(
        np.asarray(origin_px, dtype=np.float64))
    return -o


def relion_origin_from_shift_px(shift_px: Any) -> Tensor:
    """cryospin ``shift_px`` `(N, 2)` -> RELION origin in pixels ``= −shift_px``."""
    s = shift_px if isinstance(shift_px, Tensor) else torch.as_tensor(
        np.asarray(shift_px, dtype=np.float64))
    return -s


# ---------------------------------------------------------------------------- reading tables
def read_star_tables(
    path: str | Path, *, as_text: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The particle table and the optics table (None for RELION 3.0) of a star file.

    The particle table is the block named ``particles`` (3.1+), else the first loop holding
    ``rlnImageName`` (3.0: ``data_images``, ``data_``, ...). Block order does not matter.
    Columns that hold only numbers are read as numbers; with ``as_text`` every value is the
    text the file holds (what a writer needs to give it back unchanged).
    """
    particles, optics = _read_text_tables(Path(path))
    if as_text:
        return particles, optics
    return _numeric_table(particles), None if optics is None else _numeric_table(optics)


def _star_labels(path: Path) -> list[str]:
    """Every loop label (``_rlnX ...`` line) of a star file."""
    labels: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("_"):
                labels.add(line.split()[0][1:])
    return sorted(labels)


def _numeric_table(df: pd.DataFrame) -> pd.DataFrame:
    """A text table with each column of numbers parsed (as ``starfile`` parses them); other
    columns stay text."""
    out = df.copy()
    for col in out.columns:
        try:
            out[col] = pd.to_numeric(out[col])
        except (ValueError, TypeError):
            pass
    return out


def _read_text_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The particle and optics tables of :func:`read_star_tables`, every value as text."""
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", path)
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=_star_labels(path))
    except Exception as exc:  # noqa: BLE001 - parser errors are bad input
        raise InputError(f"cannot parse STAR file ({type(exc).__name__}: "
                         f"{_one_line(str(exc))})", path) from None
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    for name, df in tables.items():
        dup = sorted(set(df.columns[df.columns.duplicated()].tolist()))
        if dup:
            raise InputError(f"column {', '.join(map(str, dup))} appears more than once in "
                             f"data_{name}", path)
    particles = tables.get("particles")
    if particles is None:
        for name, df in tables.items():
            if name != "optics" and "rlnImageName" in df.columns:
                particles = df
                break
    if particles is None:
        raise InputError("no particle table (a loop with rlnImageName) in the STAR file", path)
    optics = tables.get("optics")
    return particles, optics


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _finite_column(df: pd.DataFrame, col: str, path: str | Path | None, what: str,
                   *, integer: bool = False, positive: bool = False) -> np.ndarray:
    """Column ``col`` of ``df`` as float64 `(N,)`, rejecting non-numeric or non-finite values
    (and, when asked, non-integers or values <= 0) with an InputError naming the row."""
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num)
    if integer:
        bad |= np.isfinite(num) & (num != np.round(num))
    if positive:
        bad |= np.isfinite(num) & (num <= 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        need = ("a positive " if positive else "an " if integer else "a ") + (
            "integer" if integer else "number")
        raise InputError(f"{col} in {what} row {k + 1} is {raw.iloc[k]!r}, not {need}", path)
    return num


def merge_optics(
    particles: pd.DataFrame, optics: pd.DataFrame | None, path: str | Path | None = None
) -> pd.DataFrame:
    """Copy each particle's optics-group columns into the particle table (new DataFrame).

    Columns present in both tables keep the particle's value.
    """
    df = particles.copy()
    if "rlnOpticsGroup" in df.columns:
        df["rlnOpticsGroup"] = _finite_column(df, "rlnOpticsGroup", path, "the particle table",
                                              integer=True).astype(np.int64)
    if optics is None or len(optics) == 0:
        return df
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError("optics table has no rlnOpticsGroup column", path)
    optics = optics.copy()
    optics["rlnOpticsGroup"] = _finite_column(optics, "rlnOpticsGroup", path, "data_optics",
                                              integer=True).astype(np.int64)
    if optics["rlnOpticsGroup"].duplicated().any():
        dup = sorted(set(optics["rlnOpticsGroup"][optics["rlnOpticsGroup"].duplicated()]
                         .tolist()))
        raise InputError(f"optics group {dup} defined more than once in data_optics", path)
    if "rlnOpticsGroup" not in df.columns:
        if len(optics) != 1:
            raise InputError("particles lack rlnOpticsGroup but there are several optics "
                             "groups", path)
        df["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    table = optics.set_index("rlnOpticsGroup")
    groups = df["rlnOpticsGroup"].to_numpy()
    missing = sorted(set(groups.tolist()) - set(table.index.tolist()))
    if missing:
        raise InputError(f"particles refer to optics groups {missing} absent from data_optics",
                         path)
    for col in table.columns:
        if col not in df.columns:
            df[col] = table[col].reindex(groups).to_numpy()
    return df


def pixel_sizes_angstrom(df: pd.DataFrame) -> np.ndarray:
    """Per-particle pixel size (Å) `(N,)` from a merged table; NaN where unknown.

    Precedence: ``rlnImagePixelSize`` (3.1+), ``rlnPixelSize``, then
    ``rlnDetectorPixelSize [µm] · 1e4 / rlnMagnification`` (3.0). Values <= 0 or non-numeric
    are unknown (NaN); :func:`read_relion_star` rejects non-numeric ones before this.
    """
    n = len(df)

    def col(name: str) -> np.ndarray:
        return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)

    if "rlnImagePixelSize" in df.columns:
        v = col("rlnImagePixelSize")
    elif "rlnPixelSize" in df.columns:
        v = col("rlnPixelSize")
    elif "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        det, mag = col("rlnDetectorPixelSize"), col("rlnMagnification")
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(mag > 0, det * 1e4 / mag, np.nan)
    else:
        return np.full(n, np.nan)
    with np.errstate(invalid="ignore"):
        return np.where(v > 0, v, np.nan)  # 0 (or junk) means unknown


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


def select_optics_group(
    particles: pd.DataFrame, optics: pd.DataFrame | None, group: int | str,
    path: str | Path | None = None,
) -> tuple[np.ndarray, int]:
    """Rows of the particles in optics group ``group`` and that group's number.

    Parameters
    ----------
    particles : the particle table (after :func:`merge_optics`: it has ``rlnOpticsGroup``).
    optics : the optics table (numbers or text), None for RELION 3.0.
    group : the group's number (``rlnOpticsGroup``; an int or a string of digits) or its
        name (``rlnOpticsGroupName``).

    Returns
    -------
    rows : `(n,)` int64, increasing
        0-based rows of ``particles`` in the group.
    number : int
        The group's ``rlnOpticsGroup``.

    Raises
    ------
    InputError
        No optics table, an unknown group (the message lists the groups), an empty group.
    """
    if optics is None or len(optics) == 0 or "rlnOpticsGroup" not in optics.columns:
        raise InputError("--optics-group: this star has no data_optics table (RELION 3.0 "
                         "style: one optics group)", path)
    numbers = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce").to_numpy(np.float64)
    names = (optics["rlnOpticsGroupName"].astype(str).str.strip().tolist()
             if "rlnOpticsGroupName" in optics.columns else [""] * len(optics))
    key = str(group).strip()
    if key.isdigit():
        hit = [i for i, n in enumerate(numbers) if n == int(key)]
    else:
        hit = [i for i, n in enumerate(names) if n == key]
    if not hit:
        known = ", ".join(f"{int(n)}" + (f" ({nm})" if nm else "")
                          for n, nm in zip(numbers, names, strict=True) if np.isfinite(n))
        raise InputError(f"--optics-group {key}: no such optics group (the star has {known})",
                         path)
    number = int(numbers[hit[0]])
    rows = np.flatnonzero(particles["rlnOpticsGroup"].to_numpy(np.float64) == number)
    if rows.size == 0:
        raise InputError(f"--optics-group {key}: no particle is in optics group {number}", path)
    return rows.astype(np.int64), number


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
    particles = _numeric_table(particles_text)
    optics = None if optics_text is None else _numeric_table(optics_text)
    df = merge_optics(particles, optics, path)
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
    n = len(df)
    if n == 0:
        raise InputError("the particle table is empty", path)
    if "rlnImageName" not in df.columns:
        raise InputError("no rlnImageName column", path)
    for col, (integer, positive) in _CHECKED_COLUMNS.items():
        if col in df.columns:
            df[col] = _finite_column(df, col, path, "particle", integer=integer,
                                     positive=positive)
    for col in ("rlnImagePixelSize", "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification"):
        if col in df.columns and (df[col] < 0).any():
            k = int(np.flatnonzero(df[col].to_numpy() < 0)[0])
            raise InputError(f"{col} in particle row {k + 1} is negative", path)
    image_index, raw_paths = _parse_image_names(df["rlnImageName"], path)
    codes, uniques = pd.factorize(pd.Series(raw_paths))
    base = path.parent
    ddir = None if datadir is None else Path(datadir)
    stack_paths = tuple(
        resolve_stack_path(u, base_dir=base, datadir=ddir, must_exist=not metadata_only,
                           source=path)
        for u in uniques.tolist()
    )
    stack_index = codes.astype(np.int64)

    # pixel size
    apix_per = pixel_sizes_angstrom(df)
    pixel_size = _unique_value(apix_per, "pixel sizes (Å)", path)

    # box
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
                      stacklevel=2)
        pixel_size = 0.0

    ctf = None if no_ctf else _ctf_from_table(df, path)
    rotations, shifts = _poses_from_table(df, apix_per, pixel_size, path)
    group_of_row = (
        df["rlnOpticsGroup"].to_numpy(np.int64) if "rlnOpticsGroup" in df.columns
        else np.ones(n, np.int64)
    )
    random_subset = (
        df["rlnRandomSubset"].to_numpy(np.int64) if "rlnRandomSubset" in df.columns else None
    )
    return ParticleSet(
        source=path,
        stack_paths=stack_paths,
        stack_index=stack_index,
        image_index=image_index,
        box_px=int(box),
        pixel_size_angstrom=float(pixel_size),
        ctf=ctf,
        rotations=rotations,
        shifts_px=shifts,
        optics_group=group_of_row,
        optics=optics_text,
        random_subset=random_subset,
        names=tuple(df["rlnImageName"].astype(str).tolist()),
        star_table=particles_text.reset_index(drop=True),
    ), selected, n_rows


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


# ---------------------------------------------------------------------------- writing
def _star_image_path(stack: Path, out_dir: Path) -> str:
    try:
        return os.path.relpath(Path(stack).resolve(), out_dir.resolve())
    except ValueError:  # different drive (Windows)
        return str(Path(stack).resolve())


def _optics_tables(ps: ParticleSet) -> tuple[pd.DataFrame, np.ndarray]:
    """New optics table and per-particle group ids: one group per distinct
    (original group, kV, Cs, w), carrying the original group's other columns."""
    n = len(ps)
    keys = [ps.optics_group.astype(np.float64)]
    if ps.ctf is not None:
        for f in _OPTICS_COLUMNS_FROM_CTF.values():
            keys.append(getattr(ps.ctf, f).detach().cpu().double().expand(n).numpy())
    key_arr = np.stack(keys, axis=1) if n else np.zeros((0, len(keys)))
    uniq, inverse = np.unique(key_arr, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    orig = None
    if ps.optics is not None and "rlnOpticsGroup" in ps.optics.columns:
        ids = pd.to_numeric(ps.optics["rlnOpticsGroup"], errors="coerce")  # text or numbers
        orig = ps.optics.drop(columns="rlnOpticsGroup").set_index(ids)
    rows = []
    split_count: dict[int, int] = {}
    for g, key in enumerate(uniq):
        og = int(key[0])
        split_count[og] = split_count.get(og, 0) + 1
        row: dict[str, Any] = {}
        if orig is not None and og in orig.index:
            row.update(orig.loc[og].to_dict())
        name = str(row.get("rlnOpticsGroupName", f"opticsGroup{og}"))
        row["rlnOpticsGroupName"] = name
        row["rlnOpticsGroup"] = g + 1
        if ps.ctf is not None:
            for (col, _), v in zip(_OPTICS_COLUMNS_FROM_CTF.items(), key[1:], strict=True):
                row[col] = float(v)
        row["rlnImagePixelSize"] = float(ps.pixel_size_angstrom)
        row["rlnImageSize"] = int(ps.box_px)
        row["rlnImageDimensionality"] = 2
        rows.append(row)
    # groups split into several get distinct names
    names_seen: dict[str, int] = {}
    for row in rows:
        nm = row["rlnOpticsGroupName"]
        names_seen[nm] = names_seen.get(nm, 0) + 1
        if names_seen[nm] > 1:
            row["rlnOpticsGroupName"] = f"{nm}_{names_seen[nm]}"
    first = ["rlnOpticsGroupName", "rlnOpticsGroup"]
    table = pd.DataFrame(rows)
    table = table[first + [c for c in table.columns if c not in first]]
    return table, (inverse + 1).astype(np.int64)


def write_relion_star(
    path: str | Path, particles: ParticleSet, *, relative_to: str | Path | None = None
) -> None:
    """Write a RELION 3.1 star (``data_optics`` + ``data_particles``), atomically.

    A round trip of the input: every column of ``particles.star_table`` (the input star's
    particle table, or the columns a ``.cs`` gave) is written in the input's order and, where
    the particle set holds the same value, as the input's text. Written from the particle set:

    * ``rlnAngleRot/Tilt/Psi`` and ``rlnOriginXAngst/YAngst`` (``= −shift_px · pixel size``)
      when poses are known; RELION 3.0 ``rlnOriginX/Y`` (pixels) are replaced by the Å ones.
    * ``rlnImageName``: the input's names as they were (RELION resolves them from its project
      folder); with ``relative_to``, their relative paths rebased onto that folder (absolute
      ones kept). Without input names (plain stacks, ``downsample``): 1-based ``idx@path``
      with the path relative to ``relative_to`` or the star's folder.
    * ``rlnDefocusU/V/Angle``, ``rlnPhaseShift``, ``rlnCtfBfactor`` (when the input had it or
      any is nonzero), ``rlnOpticsGroup``, ``rlnRandomSubset`` when known; input columns that
      no longer hold (per-particle ``rlnVoltage``, ``rlnImagePixelSize``, ...) are updated,
      RELION 3.0 ``rlnDetectorPixelSize``/``rlnMagnification`` dropped when they no longer
      give the pixel size.

    The optics table is the input's (``particles.optics``, text), its ``rlnImagePixelSize``,
    ``rlnImageSize`` and per-group ``rlnVoltage``, ``rlnSphericalAberration``,
    ``rlnAmplitudeContrast`` updated where the particle set differs; when there is none (RELION
    3.0, plain stacks) or a group's particles no longer share those values, a new table with
    one group per distinct (group, kV, Cs, w), carrying the input group's other columns.
    """
    path = Path(path)
    ps = particles
    n = len(ps)
    out_dir = path.parent if str(path.parent) else Path(".")
    carried = ps.star_table
    optics, group = _output_optics(ps)
    new: dict[str, list[str]] = {"rlnImageName": _image_names(ps, out_dir, relative_to)}
    renamed: dict[str, str] = {}  # input column -> the column written in its place
    dropped: set[str] = set()
    if ps.rotations is not None:
        R = ps.rotations.detach().cpu().double()
        angles = relion_euler_from_rotation(R)
        same = None  # keep the input's angles where they give the same rotation
        if carried is not None and all(c in carried.columns for c in _ANGLE_COLUMNS):
            old = [_numbers(carried[c]) for c in _ANGLE_COLUMNS]
            diff = (rotation_from_relion_euler(*old) - R).abs().amax(dim=(1, 2)).numpy()
            same = diff <= 1e-9  # NaN (unreadable input) -> False
        for col, v in zip(_ANGLE_COLUMNS, angles, strict=True):
            new[col] = _merged(carried, col, v.numpy(), same=same)
    if ps.shifts_px is not None:
        if ps.pixel_size_angstrom <= 0:
            raise ValueError("cannot write rlnOriginXAngst/YAngst without a pixel size")
        # in Å of the pixel size the written optics table gives (what a reader divides by)
        apix_written = torch.from_numpy(_written_pixel_sizes(optics, group, ps))
        origin_a = (relion_origin_from_shift_px(ps.shifts_px.detach().cpu().double())
                    * apix_written[:, None])  # (N, 2)
        for k, col in enumerate(_ORIGIN_COLUMNS):
            new[col] = _merged(carried, col, origin_a[:, k].numpy(), rtol=1e-9, atol=1e-9)
        renamed = dict(zip(_ORIGIN_PX_COLUMNS, _ORIGIN_COLUMNS, strict=True))
    if ps.ctf is not None:
        def ctf_values(f: str) -> np.ndarray:
            return getattr(ps.ctf, f).detach().cpu().double().expand(n).numpy()

        for col, f in _CTF_PARTICLE_COLUMNS.items():
            per_particle = ctf_values(f)
            had = carried is not None and col in carried.columns
            if col == "rlnCtfBfactor" and not had and not np.any(per_particle != 0):
                continue
            new[col] = _merged(carried, col, per_particle)
        for col, f in _OPTICS_COLUMNS_FROM_CTF.items():  # per particle in RELION 3.0 stars
            if carried is not None and col in carried.columns:
                new[col] = _merged(carried, col, ctf_values(f))
    new["rlnOpticsGroup"] = _merged(carried, "rlnOpticsGroup", group, integer=True)
    if ps.random_subset is not None:
        new["rlnRandomSubset"] = _merged(carried, "rlnRandomSubset",
                                         np.asarray(ps.random_subset), integer=True)
    if carried is not None:
        apix, box = float(ps.pixel_size_angstrom), int(ps.box_px)
        for col, value in (("rlnImagePixelSize", apix), ("rlnPixelSize", apix),
                           ("rlnImageSize", box)):
            if col in carried.columns:
                new[col] = _merged(carried, col, np.full(n, value),
                                   integer=col == "rlnImageSize", rtol=1e-4)
        if "rlnDetectorPixelSize" in carried.columns and "rlnMagnification" in carried.columns:
            with np.errstate(divide="ignore", invalid="ignore"):
                apix_30 = (_numbers(carried["rlnDetectorPixelSize"]) * 1e4
                           / _numbers(carried["rlnMagnification"]))
            if not np.allclose(apix_30, apix, rtol=1e-4, atol=0):
                dropped |= {"rlnDetectorPixelSize", "rlnMagnification"}

    columns: dict[str, list[Any]] = {}
    kept = pd.DataFrame() if carried is None else carried
    for col in kept.columns:
        target = renamed.get(col, col)
        if col in dropped:
            continue
        if target in new:
            columns[target] = new.pop(target)
        elif target == col:  # carried as it is (a replaced column already placed is dropped)
            columns[col] = kept[col].tolist()
    columns.update(new)
    text = ("# version 30001\n" + _loop_text("optics", {c: optics[c].tolist() for c in optics})
            + "# version 30001\n" + _loop_text("particles", columns))
    atomic_write_text(path, text)


#: pose columns written from the particle set
_ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst")
#: RELION 3.0 origins (pixels), replaced by the Å ones
_ORIGIN_PX_COLUMNS = ("rlnOriginX", "rlnOriginY")
#: per-particle CTF columns and their :class:`CTFParams` fields
_CTF_PARTICLE_COLUMNS = {
    "rlnDefocusU": "defocus_u_angstrom",
    "rlnDefocusV": "defocus_v_angstrom",
    "rlnDefocusAngle": "defocus_angle_deg",
    "rlnPhaseShift": "phase_shift_deg",
    "rlnCtfBfactor": "bfactor_a2",
}
#: values within this relative difference count as unchanged: float32 sources (.cs, ctf.pkl)
#: keep the input's text
_SAME_RTOL = 1e-6


def _numbers(text: pd.Series) -> np.ndarray:
    """A text (or number) column as float64 `(N,)` (a new, writable array); NaN where not a
    number."""
    return np.array(pd.to_numeric(text, errors="coerce"), dtype=np.float64, copy=True)


def _written_pixel_sizes(optics: pd.DataFrame, group: np.ndarray, ps: ParticleSet) -> np.ndarray:
    """Each particle's pixel size (Å) `(N,)` as the optics table to be written gives it (its
    group's ``rlnImagePixelSize``), else the particle set's."""
    apix = np.full(len(group), float(ps.pixel_size_angstrom))
    if "rlnImagePixelSize" in optics.columns and "rlnOpticsGroup" in optics.columns:
        table = pd.Series(_numbers(optics["rlnImagePixelSize"]),
                          index=_numbers(optics["rlnOpticsGroup"]))
        table = table[~table.index.duplicated()]
        written = table.reindex(group.astype(np.float64)).to_numpy(np.float64)
        ok = np.isfinite(written) & (written > 0)
        apix[ok] = written[ok]
    return apix


def _format_number(value: Any, integer: bool = False) -> str:
    return str(int(value)) if integer else f"{float(value):.12g}"


def _merged(
    carried: pd.DataFrame | None,
    col: str,
    values: np.ndarray,
    *,
    integer: bool = False,
    same: np.ndarray | None = None,
    rtol: float = _SAME_RTOL,
    atol: float = 0.0,
) -> list[str]:
    """Column ``col`` as text `(N,)`: the input's text where it holds the same value (``same``,
    or equal within ``rtol``/``atol``), else ``values`` formatted."""
    new = [_format_number(v, integer) for v in np.asarray(values).tolist()]
    if carried is None or col not in carried.columns:
        return new
    if same is None:
        with np.errstate(invalid="ignore"):
            same = np.isclose(_numbers(carried[col]), np.asarray(values, np.float64),
                              rtol=rtol, atol=atol)
    old = carried[col].tolist()
    return [o if k else v for o, v, k in zip(old, new, same.tolist(), strict=True)]


def _image_names(ps: ParticleSet, out_dir: Path, relative_to: str | Path | None) -> list[str]:
    """``rlnImageName`` per particle (see :func:`write_relion_star`)."""
    if ps.names is not None and relative_to is None:
        return list(ps.names)
    base = Path(relative_to) if relative_to is not None else out_dir
    rel = [_star_image_path(p, base) for p in ps.stack_paths]
    stacks = ps.stack_index.tolist()
    if ps.names is None:
        return [f"{i + 1:06d}@{rel[s]}" for i, s in
                zip(ps.image_index.tolist(), stacks, strict=True)]
    out = []
    for name, s in zip(ps.names, stacks, strict=True):
        num, sep, raw = name.partition("@")
        if Path((raw if sep else num).strip()).is_absolute():
            out.append(name)
        else:
            out.append(f"{num}@{rel[s]}" if sep else rel[s])
    return out


def _output_optics(ps: ParticleSet) -> tuple[pd.DataFrame, np.ndarray]:
    """The optics table to write and each particle's group in it `(N,)`."""
    kept = _kept_optics(ps)
    if kept is not None:
        return kept, ps.optics_group.astype(np.int64)
    return _optics_tables(ps)


def _kept_optics(ps: ParticleSet) -> pd.DataFrame | None:
    """The input's optics table (all rows, its text) with the pixel size, box and per-group
    kV/Cs/w of the particle set written where they differ; None when there is no input table
    or it cannot describe the particles (a group whose particles differ in kV/Cs/w, a group
    missing, a column missing while other groups' values are unknown)."""
    if ps.optics is None or len(ps.optics) == 0 or "rlnOpticsGroup" not in ps.optics.columns:
        return None
    table = ps.optics.copy()
    ids = _numbers(table["rlnOpticsGroup"])
    used = np.unique(ps.optics_group).tolist()
    row_of: dict[int, int] = {}
    for g in used:
        rows = np.flatnonzero(ids == g)
        if rows.size != 1:
            return None
        row_of[g] = int(rows[0])
    values: dict[str, dict[int, float]] = {
        "rlnImagePixelSize": dict.fromkeys(used, float(ps.pixel_size_angstrom)),
        "rlnImageSize": dict.fromkeys(used, float(ps.box_px)),
    }
    if ps.ctf is not None:
        for col, f in _OPTICS_COLUMNS_FROM_CTF.items():
            if ps.star_table is not None and col in ps.star_table.columns:
                continue  # per particle (RELION 3.0 style): written there
            v = getattr(ps.ctf, f).detach().cpu().double().expand(len(ps)).numpy()
            per: dict[int, float] = {}
            for g in used:
                vals = v[ps.optics_group == g]
                if not np.allclose(vals, vals[0], rtol=1e-9, atol=0):
                    return None
                per[g] = float(vals[0])
            values[col] = per
    for col, per in values.items():
        integer = col == "rlnImageSize"
        if col not in table.columns:
            if len(used) != len(table):
                return None
            table[col] = [_format_number(per[int(g)], integer) for g in ids.tolist()]
            continue
        old = _numbers(table[col])
        rtol = 1e-4 if col == "rlnImagePixelSize" else _SAME_RTOL
        cells = table[col].tolist()
        for g, r in row_of.items():
            if not np.isclose(old[r], per[g], rtol=rtol, atol=0):
                cells[r] = _format_number(per[g], integer)
        table[col] = cells
    if "rlnImageDimensionality" not in table.columns:
        table["rlnImageDimensionality"] = "2"
    return table


def _star_cell(value: Any) -> str:
    """One STAR value: text as it is (quoted when empty or holding whitespace), integers as
    they are, other numbers ``%.12g``."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, np.bool_)):
        text = str(int(value))
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = f"{float(value):.12g}"
    else:
        text = str(value)
    if not text or _WHITESPACE.search(text):
        return '"' + text + '"'
    return text


_WHITESPACE = re.compile(r"\s")


def _loop_text(name: str, columns: Mapping[str, list[Any]]) -> str:
    """A STAR ``data_<name>`` loop block."""
    lines = ["", f"data_{name}", "", "loop_"]
    lines += [f"_{col} #{k}" for k, col in enumerate(columns, start=1)]
    cells = [[_star_cell(v) for v in values] for values in columns.values()]
    lines += [" ".join(row) for row in zip(*cells, strict=True)]
    return "\n".join(lines) + "\n\n"
