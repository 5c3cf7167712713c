"""Writing a :class:`ParticleSet` as a RELION 3.1 ``.star`` file (``data_optics`` +
``data_particles``), giving back the input's columns and text where the values still hold.

Conventions as :mod:`cryospin.io.star` reads them (``docs/conventions.md``, "RELION and
cryoSPARC"); the loops are written by :func:`cryospin.io.star_tables.loop_text`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryospin.atomic import atomic_write_text
from cryospin.io.particle_set import ParticleSet
from cryospin.io.star import (
    relion_euler_from_rotation,
    relion_origin_from_shift_px,
    rotation_from_relion_euler,
)
from cryospin.io.star_tables import format_number, loop_text, numbers

__all__ = ["write_relion_star"]

#: optics columns that hold a CTF field
_OPTICS_COLUMNS_FROM_CTF = {
    "rlnVoltage": "voltage_kv",
    "rlnSphericalAberration": "cs_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
}


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
        row: dict[str, object] = {}
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
        nm = str(row["rlnOpticsGroupName"])
        names_seen[nm] = names_seen.get(nm, 0) + 1
        if names_seen[nm] > 1:
            row["rlnOpticsGroupName"] = f"{nm}_{names_seen[nm]}"
    first = ["rlnOpticsGroupName", "rlnOpticsGroup"]
    table = pd.DataFrame(rows)
    table = table[first + [c for c in table.columns if c not in first]]
    return table, (inverse + 1).astype(np.int64)


def write_relion_star(
    path: str | Path, particles: ParticleSet, *, relative_to: str | Path | None = None,
    columns: Mapping[str, np.ndarray] | None = None,
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

    * ``columns``: per-particle values `(N,)` by RELION column name (e.g. a score), written
      in place of an input column of the same name or after the others.

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
            old = [numbers(carried[c]) for c in _ANGLE_COLUMNS]
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
                apix_30 = (numbers(carried["rlnDetectorPixelSize"]) * 1e4
                           / numbers(carried["rlnMagnification"]))
            if not np.allclose(apix_30, apix, rtol=1e-4, atol=0):
                dropped |= {"rlnDetectorPixelSize", "rlnMagnification"}

    for col, values in (columns or {}).items():
        given = np.asarray(values, dtype=np.float64)
        if given.shape != (n,):
            raise ValueError(f"column {col}: expected ({n},) values, got {given.shape}")
        new[col] = [format_number(x) for x in given.tolist()]
    written: dict[str, Sequence[object]] = {}
    kept = pd.DataFrame() if carried is None else carried
    for col in kept.columns:
        target = renamed.get(col, col)
        if col in dropped:
            continue
        if target in new:
            written[target] = new.pop(target)
        elif target == col:  # carried as it is (a replaced column already placed is dropped)
            written[col] = kept[col].tolist()
    written.update(new)
    text = ("# version 30001\n" + loop_text("optics", {c: optics[c].tolist() for c in optics})
            + "# version 30001\n" + loop_text("particles", written))
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


def _written_pixel_sizes(optics: pd.DataFrame, group: np.ndarray, ps: ParticleSet) -> np.ndarray:
    """Each particle's pixel size (Å) `(N,)` as the optics table to be written gives it (its
    group's ``rlnImagePixelSize``), else the particle set's."""
    apix = np.full(len(group), float(ps.pixel_size_angstrom))
    if "rlnImagePixelSize" in optics.columns and "rlnOpticsGroup" in optics.columns:
        table = pd.Series(numbers(optics["rlnImagePixelSize"]),
                          index=numbers(optics["rlnOpticsGroup"]))
        table = table[~table.index.duplicated()]
        written = table.reindex(group.astype(np.float64)).to_numpy(np.float64)
        ok = np.isfinite(written) & (written > 0)
        apix[ok] = written[ok]
    return apix


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
    new = [format_number(v, integer) for v in np.asarray(values).tolist()]
    if carried is None or col not in carried.columns:
        return new
    if same is None:
        with np.errstate(invalid="ignore"):
            same = np.isclose(numbers(carried[col]), np.asarray(values, np.float64),
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
    ids = numbers(table["rlnOpticsGroup"])
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
            table[col] = [format_number(per[int(g)], integer) for g in ids.tolist()]
            continue
        old = numbers(table[col])
        rtol = 1e-4 if col == "rlnImagePixelSize" else _SAME_RTOL
        cells = table[col].tolist()
        for g, r in row_of.items():
            if not np.isclose(old[r], per[g], rtol=rtol, atol=0):
                cells[r] = format_number(per[g], integer)
        table[col] = cells
    if "rlnImageDimensionality" not in table.columns:
        table["rlnImageDimensionality"] = "2"
    return table
