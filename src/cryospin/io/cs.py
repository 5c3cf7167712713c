"""cryoSPARC ``.cs`` particle files (numpy structured arrays) and their pose conventions.

Conventions (proven against cryoDRGN's parses in the tests; see ``docs/conventions.md``,
"RELION and cryoSPARC"):

* ``alignments3D/pose`` is an axis-angle rotation vector ``ω`` (radians) of the *inverse* of
  cryospin's rotation: ``R = exp([ω]×)ᵀ = exp(−[ω]×)``, i.e. ``ω = −log R``.
* ``alignments3D/shift`` (pixels of ``alignments3D/psize_A``) has the sign of RELION's origin:
  ``shift_px = −shift · psize_alignments / psize_blob``.
* ``ctf/df1_A``, ``ctf/df2_A`` = defocus U, V (Å); ``ctf/df_angle_rad`` = defocus angle (rad);
  ``ctf/phase_shift_rad`` (rad); ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
  ``ctf/bfactor`` (Å²).
* ``blob/idx`` is 0-based; ``blob/path`` is relative to the cryoSPARC project folder (often
  ``J24/...``; a leading ``>`` marks imported paths and is dropped).

When ``alignments3D/*`` is absent the ab-initio fields ``alignments_class_0/*`` are used.

For writing a RELION star the reader also gives the RELION view of each row
(``ParticleSet.star_table``: ``rlnMicrographName`` from ``location/micrograph_path``,
``rlnCoordinateX/Y = location/center_x_frac · width, center_y_frac · height`` with
``location/micrograph_shape = (height, width)`` in pixels, ``rlnCtfScalefactor`` from
``ctf/scale``, the CTF columns) and an optics table (one group per ``ctf/exp_group_id``);
:func:`write_cryosparc` writes new poses back into the ``.cs`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from cryospin.atomic import atomic_path
from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io._paths import resolve_stack_path
from cryospin.io.particle_set import ParticleSet
from cryospin.io.stack_check import check_stacks
from cryospin.rotations import so3_exp, so3_log

__all__ = [
    "CS_CTF_FIELDS",
    "rotation_from_cryosparc_pose",
    "cryosparc_pose_from_rotation",
    "shift_px_from_cryosparc_shift",
    "cryosparc_shift_from_shift_px",
    "read_cs_table",
    "read_cryosparc",
    "write_cryosparc",
]

#: CTF fields a .cs must have (bfactor and phase shift default to 0 when absent).
CS_CTF_FIELDS = (
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)
_ALIGNMENT_PREFIXES = ("alignments3D", "alignments_class_0")


def rotation_from_cryosparc_pose(pose: Tensor | ArrayLike) -> Tensor:
    """cryoSPARC axis-angle ``pose`` `(N, 3)` (radians) -> cryospin rotations ``exp([ω]×)ᵀ``."""
    return so3_exp(_tensor(pose)).transpose(-1, -2)


def cryosparc_pose_from_rotation(R: Tensor) -> Tensor:
    """cryospin rotations `(N, 3, 3)` -> cryoSPARC axis-angle ``pose = log(Rᵀ)`` `(N, 3)`."""
    return so3_log(R.transpose(-1, -2))


def shift_px_from_cryosparc_shift(
    shift: Tensor | ArrayLike, scale: Tensor | ArrayLike = 1.0
) -> Tensor:
    """cryoSPARC ``alignments3D/shift`` `(N, 2)` -> ``shift_px = −shift · scale``.

    ``scale = alignments psize_A / blob psize_A`` converts alignment pixels into image pixels.
    """
    s, sc = _tensor(shift), _tensor(scale)
    if sc.ndim == 1:
        sc = sc[:, None]
    return -s * sc


def cryosparc_shift_from_shift_px(shift_px: Tensor | ArrayLike) -> Tensor:
    """cryospin ``shift_px`` `(N, 2)` -> cryoSPARC shift (image pixels) ``= −shift_px``."""
    return -_tensor(shift_px)


def _tensor(x: Tensor | ArrayLike) -> Tensor:
    """``x`` itself when a tensor, else as a float64 tensor."""
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, np.float64))


def read_cs_table(path: str | Path) -> np.ndarray:
    """The structured array `(N,)` of a ``.cs`` file (metadata only, nothing else opened)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", path)
    _check_npy_size(path)
    try:
        table = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        msg = " ".join(str(exc).split())[:300]
        raise InputError(f"cannot read cryoSPARC .cs ({type(exc).__name__}: {msg})",
                         path) from None
    if not isinstance(table, np.ndarray) or table.dtype.names is None or table.ndim != 1:
        raise InputError("not a cryoSPARC .cs file (expected a 1D structured array)", path)
    return table


def _check_npy_size(path: Path) -> None:
    """Refuse a ``.npy`` whose header announces more data than the file holds (a truncated
    or forged file), before numpy tries to allocate it."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except Exception:  # noqa: BLE001 - not an .npy at all: np.load reports it
        return
    if any(int(d) < 0 for d in shape):
        raise InputError(f"not a cryoSPARC .cs file (array shape {shape})", path)
    count = math.prod(int(d) for d in shape)
    need = offset + count * dtype.itemsize
    size = path.stat().st_size
    if dtype.hasobject:
        return  # np.load(allow_pickle=False) refuses it with a clear message
    if size < need:
        raise InputError(f"truncated cryoSPARC .cs: the header announces {count} rows "
                         f"({need} bytes) but the file has {size} bytes", path)


def _field(table: np.ndarray, field: str, path: Path, tail: tuple[int, ...] = (),
           *, integer: bool = False) -> np.ndarray:
    """Numeric field as float64 `(N, *tail)`; InputError when it is not numbers of that shape,
    holds NaN/Inf or (``integer``) non-integers."""
    raw = np.asarray(table[field])
    if raw.dtype.kind not in "biuf":
        raise InputError(f"{field} is not numeric (dtype {raw.dtype})", path)
    if raw.shape != (len(table), *tail):
        want = ", ".join(["N", *map(str, tail)])
        raise InputError(f"{field} has shape {raw.shape[1:] or '()'} per row; expected "
                         f"({want})", path)
    v = raw.astype(np.float64)
    if not np.isfinite(v).all():
        k = int(np.flatnonzero(~np.isfinite(v).reshape(len(v), -1).all(1))[0])
        raise InputError(f"{field} has a non-finite value in row {k}", path)
    if integer and (v != np.round(v)).any():
        k = int(np.flatnonzero((v != np.round(v)).reshape(len(v), -1).any(1))[0])
        raise InputError(f"{field} in row {k} is {raw[k]}, not an integer", path)
    return v


def _decode_paths(raw: np.ndarray) -> list[str]:
    out = []
    for p in raw.tolist():
        s = p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p)
        out.append(s.lstrip(">").strip())
    return out


def read_cryosparc(
    path: str | Path,
    *,
    datadir: str | Path | None = None,
    no_ctf: bool = False,
    metadata_only: bool = False,
    box_px: int | None = None,
) -> ParticleSet:
    """Read a cryoSPARC ``.cs`` particle file into a :class:`ParticleSet`.

    Parameters
    ----------
    path : the ``.cs`` file.
    datadir : folder to look for the stacks in first (else the ``.cs`` folder); leading job
        folders (``J24/...``) are stripped one at a time until a file is found.
    no_ctf : do not require (nor read) ``ctf/*`` fields.
    metadata_only : do not open the stacks (box from ``blob/shape`` or ``box_px``).
    box_px : box size when neither ``blob/shape`` nor (unopened) stacks give it.

    Raises
    ------
    InputError
        Missing file or stacks (naming the paths tried), rows past the end of a stack,
        missing CTF fields (named), conflicting pixel sizes or boxes, non-square images.
    """
    path = Path(path)
    table = read_cs_table(path)
    names = set(table.dtype.names or ())
    raw_paths, image_index = _image_locations(table, names, path)
    uniq, codes = np.unique(np.asarray(raw_paths, dtype=object), return_inverse=True)
    stack_index = np.asarray(codes, dtype=np.int64).reshape(-1)
    ddir = None if datadir is None else Path(datadir)
    stack_paths = tuple(
        resolve_stack_path(u, base_dir=path.parent, datadir=ddir, must_exist=not metadata_only,
                           source=path)
        for u in uniq.tolist()
    )
    blob_pixel_size = _blob_pixel_size(table, names, path)
    blob_box = _blob_box_px(table, names, path)
    box, pixel_size = check_stacks(
        stack_paths, stack_index, image_index, source=path, box_field="blob/shape",
        metadata_box_px=blob_box, metadata_pixel_size_angstrom=blob_pixel_size,
        fallback_box_px=box_px, open_stacks=not metadata_only,
        row_name=lambda row: f"{row} (blob/idx {image_index[row]})",
    )
    if math.isnan(pixel_size):
        pixel_size = 0.0

    ctf = None
    if not no_ctf:
        missing = [f for f in CS_CTF_FIELDS if f not in names]
        if missing:
            raise InputError(
                f"missing CTF fields {', '.join(missing)} (use --no-ctf to proceed without "
                f"CTF)", path,
            )
        ctf = _ctf_from_cs(table, names, path)
    rotations, shifts = _poses_from_cs(table, names, float(pixel_size), path)
    optics_group = (
        np.unique(np.asarray(table["ctf/exp_group_id"]), return_inverse=True)[1]
        .reshape(-1).astype(np.int64) + 1
        if "ctf/exp_group_id" in names else np.ones(len(table), np.int64)
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
        optics_group=optics_group,
        optics=_relion_optics(optics_group, ctf, float(pixel_size), int(box)),
        random_subset=None if rotations is None else _random_subset(table, names, path),
        # RELION-style names, 1-based
        names=tuple(f"{i + 1:06d}@{p}"
                    for i, p in zip(image_index.tolist(), raw_paths, strict=True)),
        star_table=_relion_columns(table, names, ctf),
        cs_table=table,
    )


def _image_locations(table: np.ndarray, names: set[str], path: Path
                     ) -> tuple[list[str], np.ndarray]:
    """Each particle's stack path as written (``blob/path``) and 0-based image index
    (``blob/idx``) `(N,)` int64, checked."""
    if len(table) == 0:
        raise InputError("the .cs file has no particles", path)
    if "blob/path" not in names or "blob/idx" not in names:
        raise InputError("no blob/path and blob/idx fields (not a particle .cs)", path)
    if np.asarray(table["blob/path"]).dtype.kind not in "SU" or table["blob/path"].ndim != 1:
        raise InputError(f"blob/path is not a text field (dtype {table.dtype['blob/path']})",
                         path)
    raw_paths = _decode_paths(table["blob/path"])
    idx_f = _field(table, "blob/idx", path, integer=True)
    if idx_f.min() < 0:
        raise InputError(f"negative blob/idx {int(idx_f.min())}", path)
    if idx_f.max() >= 2.0**62:
        raise InputError(f"blob/idx {np.asarray(table['blob/idx']).max()} is too large", path)
    image_index = (np.asarray(table["blob/idx"]).astype(np.int64) if
                   np.asarray(table["blob/idx"]).dtype.kind in "iu" else idx_f.astype(np.int64))
    return raw_paths, image_index


def _blob_pixel_size(table: np.ndarray, names: set[str], path: Path) -> float:
    """The one pixel size (Å) of ``blob/psize_A``; NaN when absent or 0 (unknown)."""
    if "blob/psize_A" not in names:
        return math.nan
    psize = _field(table, "blob/psize_A", path)
    if psize.min() < 0:
        raise InputError(f"negative pixel size in blob/psize_A ({psize.min():g} Å)", path)
    ps = np.unique(np.round(psize, 4))
    if ps.size > 1:
        raise InputError(f"conflicting pixel sizes in blob/psize_A ({ps[:6].tolist()} Å)",
                         path)
    return float(psize[0]) if psize[0] > 0 else math.nan  # 0 = unknown


def _blob_box_px(table: np.ndarray, names: set[str], path: Path) -> int | None:
    """The one square box (px) of ``blob/shape``; None when absent."""
    if "blob/shape" not in names:
        return None
    shapes = _field(table, "blob/shape", path, (2,), integer=True).astype(np.int64)
    if (shapes <= 0).any():
        bad = shapes[np.flatnonzero((shapes <= 0).any(1))[0]]
        raise InputError(f"invalid image shape in blob/shape {bad.tolist()}", path)
    if (shapes[:, 0] != shapes[:, 1]).any():
        bad = shapes[np.flatnonzero(shapes[:, 0] != shapes[:, 1])[0]]
        raise InputError(f"images are not square (blob/shape {bad.tolist()})", path)
    boxes = np.unique(shapes[:, 0])
    if boxes.size > 1:
        raise InputError(f"different boxes in blob/shape {boxes.tolist()} px", path)
    return int(boxes[0])


def _poses_from_cs(table: np.ndarray, names: set[str], pixel_size: float, path: Path
                   ) -> tuple[Tensor | None, Tensor | None]:
    """Rotations `(N, 3, 3)` and shifts (px) `(N, 2)` of the first alignment group present
    (``alignments3D``, then ``alignments_class_0``); ``(None, None)`` without one."""
    for prefix in _ALIGNMENT_PREFIXES:
        if f"{prefix}/pose" not in names:
            continue
        rotations = rotation_from_cryosparc_pose(_field(table, f"{prefix}/pose", path, (3,)))
        if f"{prefix}/shift" not in names:
            return rotations, torch.zeros(len(table), 2, dtype=torch.float64)
        scale: float | np.ndarray = 1.0
        if f"{prefix}/psize_A" in names and pixel_size > 0:
            align_psize = _field(table, f"{prefix}/psize_A", path)
            scale = np.where(align_psize > 0, align_psize / pixel_size, 1.0)
        return rotations, shift_px_from_cryosparc_shift(
            _field(table, f"{prefix}/shift", path, (2,)), scale)
    return None, None


def _random_subset(table: np.ndarray, names: set[str], path: Path) -> np.ndarray | None:
    """RELION's half set (1 or 2) `(N,)` from ``alignments3D/split`` (0 or 1); None without."""
    if "alignments3D/split" not in names:
        return None
    split = _field(table, "alignments3D/split", path, integer=True)
    if not np.isin(split, (0, 1)).all():
        bad = split[~np.isin(split, (0, 1))][0]
        raise InputError(f"alignments3D/split holds {bad:g}; expected 0 or 1", path)
    return split.astype(np.int64) + 1


def _text(values: Tensor | ArrayLike) -> list[str]:
    """Numbers from float32 fields as text with the digits float32 holds."""
    return [f"{v:.7g}" for v in np.asarray(values, np.float64).tolist()]


def _relion_columns(table: np.ndarray, names: set[str], ctf: CTFParams | None) -> pd.DataFrame:
    """The RELION columns of each row that a :class:`ParticleSet` does not hold otherwise
    (micrograph, coordinates, CTF scale factor) and the CTF columns, as text `(N rows)`."""
    n = len(table)
    cols: dict[str, list[str]] = {}
    if "location/micrograph_path" in names:
        mic = _decode_paths(table["location/micrograph_path"])
        if any(mic):
            cols["rlnMicrographName"] = mic
    shape_field, x_field, y_field = ("location/micrograph_shape", "location/center_x_frac",
                                     "location/center_y_frac")
    if {shape_field, x_field, y_field} <= names:
        shape = np.asarray(table[shape_field], np.float64)  # (N, 2): (height, width) px
        if shape.shape == (n, 2) and (shape > 0).all():
            x = np.asarray(table[x_field], np.float64) * shape[:, 1]
            y = np.asarray(table[y_field], np.float64) * shape[:, 0]
            cols["rlnCoordinateX"] = [f"{v:.2f}" for v in x.tolist()]
            cols["rlnCoordinateY"] = [f"{v:.2f}" for v in y.tolist()]
    if ctf is not None:
        cols["rlnDefocusU"] = _text(ctf.defocus_u_angstrom)
        cols["rlnDefocusV"] = _text(ctf.defocus_v_angstrom)
        cols["rlnDefocusAngle"] = _text(ctf.defocus_angle_deg)
        cols["rlnPhaseShift"] = _text(ctf.phase_shift_deg)
        if "ctf/bfactor" in names:
            cols["rlnCtfBfactor"] = _text(ctf.bfactor_a2)
    if "ctf/scale" in names and np.asarray(table["ctf/scale"]).shape == (n,):
        cols["rlnCtfScalefactor"] = _text(table["ctf/scale"])
    return pd.DataFrame(cols, index=pd.RangeIndex(n))


def _relion_optics(
    group: np.ndarray, ctf: CTFParams | None, pixel_size: float, box: int
) -> pd.DataFrame:
    """A RELION optics table (text), one row per optics group `(N,)` (values of its first
    particle; the star writer checks them against every particle)."""
    rows = []
    for g in np.unique(group).tolist():
        first = int(np.flatnonzero(group == g)[0])
        row = {"rlnOpticsGroupName": f"opticsGroup{g}", "rlnOpticsGroup": str(g)}
        if ctf is not None:
            row["rlnVoltage"] = _text([float(ctf.voltage_kv[first])])[0]
            row["rlnSphericalAberration"] = _text([float(ctf.cs_mm[first])])[0]
            row["rlnAmplitudeContrast"] = _text([float(ctf.amplitude_contrast[first])])[0]
        row["rlnImagePixelSize"] = _text([pixel_size])[0]
        row["rlnImageSize"] = str(box)
        row["rlnImageDimensionality"] = "2"
        rows.append(row)
    return pd.DataFrame(rows)


def write_cryosparc(path: str | Path, particles: ParticleSet, *,
                    fields: Mapping[str, np.ndarray] | None = None) -> None:
    """Write the particles' poses into their input ``.cs`` rows, atomically (for cryoSPARC's
    "Import Particle Stack", or any ``.cs`` reader).

    Every field of ``particles.cs_table`` is kept, in its order; these are set (and added,
    float32/uint32 as cryoSPARC stores them, when absent): ``alignments3D/pose`` (axis-angle,
    radians, ``log(Rᵀ)``), ``alignments3D/shift`` (``−shift_px``, pixels),
    ``alignments3D/psize_A`` (the image pixel size, so the shift is in image pixels) and, when
    the half sets are known, ``alignments3D/split`` (``rlnRandomSubset − 1``); and each of
    ``fields`` (name -> one number per particle `(N,)`, stored float32), e.g. the particles'
    scores. Reading the file back with :func:`read_cryosparc` gives the poses to float32
    precision.

    Raises
    ------
    ValueError
        The particles did not come from a ``.cs`` (no ``cs_table``), or have no poses, or a
        field does not hold one number per particle.
    """
    ps = particles
    if ps.cs_table is None:
        raise ValueError("the particles were not read from a .cs file: no rows to write into")
    if ps.rotations is None:
        raise ValueError("the particle set has no poses to write")
    n = len(ps)
    R = ps.rotations.detach().cpu().double()
    shifts_px = (torch.zeros(n, 2, dtype=torch.float64) if ps.shifts_px is None
                 else ps.shifts_px.detach().cpu().double())
    values: dict[str, tuple[np.ndarray, np.dtype]] = {
        "alignments3D/pose": (cryosparc_pose_from_rotation(R).numpy(), np.dtype(("<f4", (3,)))),
        "alignments3D/shift": (cryosparc_shift_from_shift_px(shifts_px).numpy(),
                               np.dtype(("<f4", (2,)))),
        "alignments3D/psize_A": (np.full(n, float(ps.pixel_size_angstrom)), np.dtype("<f4")),
    }
    rs = ps.random_subset
    if rs is not None and np.isin(rs, (1, 2)).all():
        values["alignments3D/split"] = (np.asarray(rs, np.int64) - 1, np.dtype("<u4"))
    for name, given in (fields or {}).items():
        column = np.asarray(given)
        if column.shape != (n,):
            raise ValueError(f"field {name} has shape {column.shape}; expected ({n},)")
        values[name] = (column, np.dtype("<f4"))
    old = ps.cs_table
    layout = [(name, old.dtype[name]) for name in old.dtype.names or ()]
    layout += [(name, dtype) for name, (_, dtype) in values.items()
               if name not in (old.dtype.names or ())]
    table = np.zeros(n, dtype=np.dtype(layout))
    for name in old.dtype.names or ():
        table[name] = old[name]
    for name, (v, _) in values.items():
        table[name] = v
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, table, allow_pickle=False)


def _ctf_from_cs(table: np.ndarray, names: set[str], path: Path) -> CTFParams:
    def f(field: str) -> Tensor:
        return torch.from_numpy(_field(table, field, path))

    n = len(table)
    zeros = torch.zeros(n, dtype=torch.float64)
    return CTFParams(
        defocus_u_angstrom=f("ctf/df1_A"),
        defocus_v_angstrom=f("ctf/df2_A"),
        defocus_angle_deg=torch.rad2deg(f("ctf/df_angle_rad")),
        voltage_kv=f("ctf/accel_kv"),
        cs_mm=f("ctf/cs_mm"),
        amplitude_contrast=f("ctf/amp_contrast"),
        phase_shift_deg=(torch.rad2deg(f("ctf/phase_shift_rad"))
                         if "ctf/phase_shift_rad" in names else zeros),
        bfactor_a2=f("ctf/bfactor") if "ctf/bfactor" in names else zeros.clone(),
    )
