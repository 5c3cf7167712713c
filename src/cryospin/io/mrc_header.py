"""MRC headers: read and validated without reading the data (:func:`read_header`).

The checks that tell an MRC file from a text file (a STAR file where a map or stack was
expected), a truncated one, or one with a wrong machine stamp, and the facts cryospin uses
(:class:`MrcHeaderInfo`): shape, data type and byte order, axis order, voxel size, origin,
data offset. Reading and writing the data is :mod:`cryospin.io.mrc`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from cryospin.errors import InputError

__all__ = ["MrcHeaderInfo", "read_header"]

# MRC modes we read, and their numpy dtypes (little endian; byte order is fixed up below)
_MODES: dict[int, np.dtype] = {
    0: np.dtype(np.int8),
    1: np.dtype(np.int16),
    2: np.dtype(np.float32),
    6: np.dtype(np.uint16),
    12: np.dtype(np.float16),
}
_HEADER_BYTES = 1024
_TEXT_HINT = "the file is text, e.g. a STAR file where a map or stack is expected"


def _is_text(raw: bytes) -> bool:
    """Whether ``raw`` (a file's first bytes) is non-empty printable text (ASCII or UTF-8).

    No MRC header is: its first word, nx, is a binary integer.
    """
    if not raw:
        return False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end is still text
        if exc.start < len(raw) - 3:
            return False
        text = raw[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


@dataclass(frozen=True, slots=True)
class MrcHeaderInfo:
    """The validated facts of an MRC header that cryospin uses.

    Attributes
    ----------
    shape_file : tuple[int, int, int]
        ``(nz, ny, nx)`` = (sections, rows, columns) as stored.
    dtype : numpy.dtype
        Data type with the file's byte order.
    axis_order : tuple[int, int, int]
        ``(mapc, mapr, maps)``; 1/2/3 mean x/y/z.
    voxel_size_xyz_angstrom : tuple[float, float, float]
        ``cella / (mx, my, mz)`` (0 where the header says 0).
    nstart_xyz : tuple[int, int, int]
        ``(nxstart, nystart, nzstart)`` (in column/row/section order, as stored).
    has_map_id : bool
        Whether the bytes 208-211 hold ``"MAP "``.
    data_offset : int
        Byte offset of the first voxel (1024 + extended header).
    """

    path: Path
    shape_file: tuple[int, int, int]
    mode: int  # the MRC data mode
    dtype: np.dtype
    axis_order: tuple[int, int, int]
    voxel_size_xyz_angstrom: tuple[float, float, float]
    nstart_xyz: tuple[int, int, int]
    origin_xyz_angstrom: tuple[float, float, float]
    has_map_id: bool
    data_offset: int
    ispg: int  # space group: 0 for an image stack, 1-230 for a volume


def read_header(path: str | Path) -> MrcHeaderInfo:
    """Read and validate an MRC header (no data read).

    Raises
    ------
    InputError
        Missing or unreadable file, not an MRC file at all (text, or neither the ``"MAP "``
        word at byte 208 nor a known mode and positive dimensions), file shorter than the
        1024-byte header, bad dimensions or axis order, unsupported mode, or a data block
        shorter than the header announces (truncated file).

    Warns (``UserWarning``) when the file is longer than the header announces (trailing
    bytes, or a corrupted size/mode field) and when the cell size gives a negative or
    non-finite voxel size (then treated as unknown, 0). A machine stamp contradicting the
    mode is overridden by the byte order under which the mode and dimensions make sense.
    """
    path = Path(path)
    raw, size = _header_bytes(path)
    hdr, order = _decode_header(raw)
    nx, ny, nz = int(hdr["nx"]), int(hdr["ny"]), int(hdr["nz"])
    mode = int(hdr["mode"])
    if bytes(hdr["map"]) != b"MAP " and (mode not in _MODES or min(nx, ny, nz) <= 0):
        # old writers may omit the MAP word, but then mode and dimensions must still make
        # sense; a STAR file read as MRC gives a "mode" like 544499813 (four characters)
        reason = _TEXT_HINT if _is_text(raw) else (
            f'no "MAP " at byte 208, mode {mode}, dimensions {nx} x {ny} x {nz}')
        raise InputError(f"not an MRC file (no MRC header; {reason})", path)
    if mode not in _MODES:
        raise InputError(
            f"unsupported MRC mode {mode} (supported: 0 int8, 1 int16, 2 float32, "
            f"6 uint16, 12 float16)", path,
        )
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise InputError(f"invalid MRC dimensions nx={nx}, ny={ny}, nz={nz}", path)
    axis = (int(hdr["mapc"]), int(hdr["mapr"]), int(hdr["maps"]))
    if sorted(axis) != [1, 2, 3]:
        if axis == (0, 0, 0):  # some writers leave them unset: default order
            axis = (1, 2, 3)
        else:
            raise InputError(f"invalid MRC axis order mapc/mapr/maps = {axis}", path)
    nsymbt = int(hdr["nsymbt"])
    if nsymbt < 0:
        raise InputError(f"invalid MRC extended header size {nsymbt}", path)
    dtype = _MODES[mode].newbyteorder(order)
    data_offset = _HEADER_BYTES + nsymbt
    _check_data_size(path, size, data_offset + nx * ny * nz * dtype.itemsize,
                     f"{nx}x{ny}x{nz} mode {mode}")
    return MrcHeaderInfo(
        path=path,
        shape_file=(nz, ny, nx),
        mode=mode,
        dtype=dtype,
        axis_order=axis,
        voxel_size_xyz_angstrom=_voxel_size_angstrom(hdr, path),
        nstart_xyz=(int(hdr["nxstart"]), int(hdr["nystart"]), int(hdr["nzstart"])),
        origin_xyz_angstrom=(
            float(hdr["origin"]["x"]), float(hdr["origin"]["y"]), float(hdr["origin"]["z"])
        ),
        has_map_id=bytes(hdr["map"]) == b"MAP ",
        data_offset=data_offset,
        ispg=int(hdr["ispg"]),
    )


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """The first 1024 bytes of the file and its size in bytes; InputError when it is
    missing, unreadable, or shorter than a header (text named as such)."""
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a regular file", path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(_HEADER_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read MRC file ({exc.strerror})", path) from None
    if len(raw) < _HEADER_BYTES:
        if _is_text(raw):
            raise InputError(f"not an MRC file (no MRC header; {_TEXT_HINT})", path)
        raise InputError(
            f"truncated MRC: {len(raw)} bytes, shorter than the 1024-byte header", path
        )
    return raw, size


def _decode_header(raw: bytes) -> tuple[np.void, Literal["<", ">"]]:
    """The header record of ``raw`` (1024 bytes) and its byte order.

    Machine stamp 0x44 0x41 = little endian, 0x11 0x11 = big endian; when the stamp is
    missing, the order under which the mode is a known small number; when the stamp gives an
    unknown mode, the other order if it gives a known mode and positive dimensions.
    """
    hdr = np.frombuffer(raw, dtype=HEADER_DTYPE, count=1)[0]
    stamp = bytes(hdr["machst"])
    order: Literal["<", ">"]
    if stamp[:1] == b"\x11":
        order = ">"
    elif stamp[:1] in (b"\x44", b"\x41"):
        order = "<"
    else:
        order = "<" if int(hdr["mode"]) in _MODES else ">"
    if order == ">":
        hdr = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(">"), count=1)[0]
    if int(hdr["mode"]) not in _MODES:
        # a wrong machine stamp: trust the other order when it gives a known mode and
        # positive dimensions
        other: Literal["<", ">"] = "<" if order == ">" else ">"
        alt = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(other), count=1)[0]
        if int(alt["mode"]) in _MODES and min(int(alt["nx"]), int(alt["ny"]),
                                               int(alt["nz"])) > 0:
            order, hdr = other, alt
    return hdr, order


def _check_data_size(path: Path, size: int, expected: int, announced: str) -> None:
    """InputError when the file is shorter than the header announces (``expected`` bytes);
    a warning (for the caller of :func:`read_header`) when it is longer."""
    if size < expected:
        raise InputError(
            f"truncated MRC: header announces {announced} "
            f"({expected} bytes) but the file has {size} bytes", path,
        )
    if size > expected:  # readable, but a corrupted size/mode field would look like this
        warnings.warn(
            f"{path}: MRC file has {size - expected} bytes more than its header announces "
            f"({announced}); reading the announced data", stacklevel=3,
        )


def _voxel_size_angstrom(hdr: np.void, path: Path) -> tuple[float, float, float]:
    """``cella / (mx, my, mz)`` (Å); 0 where the header says 0 or gives a negative or
    non-finite size (with a warning for the caller of :func:`read_header`)."""
    mxyz = np.array([hdr["mx"], hdr["my"], hdr["mz"]], dtype=np.float64)
    cella = np.array([hdr["cella"]["x"], hdr["cella"]["y"], hdr["cella"]["z"]], np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        vox = np.where(mxyz > 0, cella / np.where(mxyz > 0, mxyz, 1), 0.0)
    bad_vox = ~np.isfinite(vox) | (vox < 0)
    if bad_vox.any():  # a corrupted cell size: the voxel size is unknown, never negative/NaN
        warnings.warn(
            f"{path}: invalid voxel size in the MRC header (cella {cella.tolist()}, "
            f"mx/my/mz {mxyz.tolist()}); treated as unknown (0)", stacklevel=3,
        )
        vox = np.where(bad_vox, 0.0, vox)
    return float(vox[0]), float(vox[1]), float(vox[2])
