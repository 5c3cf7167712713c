"""cryoDRGN pickles: ``ctf.pkl`` and ``pose.pkl``, read and written at the edge.

``ctf.pkl`` is an `(N, 9)` float32 array with columns
``[D (box px), Apix (Å), dfU (Å), dfV (Å), dfang (°), kV, Cs (mm), w, phase (°)]``; the
parameters mean the same as cryospin's :class:`~cryospin.forward.ctf.CTFParams` (only the sign
of the CTF *function* differs, see ``docs/conventions.md``, "Contrast"); it has no B-factor
column (read as 0, dropped on write).

``pose.pkl`` is a tuple ``(rot (N, 3, 3), trans (N, 2))``. cryoDRGN's ``rot`` equals cryospin's
``R`` (both sample the volume at ``k @ R``); ``trans`` is a fraction of the box with the sign
of RELION's origin: cryoDRGN centres an image by translating it by ``+trans·D``, so
``shift_px = −trans · D``.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from cryospin.atomic import atomic_write_bytes
from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams

__all__ = [
    "safe_load_pickle",
    "read_cryodrgn_ctf",
    "write_cryodrgn_ctf",
    "ctf_params_from_cryodrgn_array",
    "cryodrgn_array_from_ctf_params",
    "read_cryodrgn_poses",
    "write_cryodrgn_poses",
    "shift_px_from_cryodrgn_trans",
    "cryodrgn_trans_from_shift_px",
    "write_indices_pkl",
]


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only callables a cryoDRGN pickle may name: numpy's array/scalar rebuilders, under
    both the numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) module names."""
    reconstruct = np.zeros(1).__reduce__()[0]  # ndarray rebuilder, protocols <= 4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5
    scalar = np.float64(1.0).__reduce__()[0]  # numpy scalars
    out: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
    }
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{core}.multiarray", "scalar")] = scalar
        out[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only numpy arrays/scalars and builtin containers: any other
    global (``os.system``, ``builtins.eval``, a class...) is refused before it is called."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__(fh)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} (only numpy arrays, tuples, lists and "
                f"dicts are allowed)"
            ) from None


def safe_load_pickle(path: str | Path) -> object:
    """Unpickle ``path`` allowing only numpy arrays/scalars, tuples, lists, dicts, numbers and
    strings -- never arbitrary code (a pickle naming any other callable is refused).

    Raises
    ------
    InputError
        Missing file, truncated/corrupt pickle, or a pickle referring to anything else.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found" if not p.exists() else "not a file", p)
    try:
        with open(p, "rb") as fh:
            return _NumpyOnlyUnpickler(fh).load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
        msg = " ".join(str(exc).split())[:300]
        raise InputError(f"cannot read pickle ({type(exc).__name__}: {msg})", p) from None


_load_pickle = safe_load_pickle


def _float_array(obj: object, what: str, path: str | Path) -> np.ndarray:
    """``obj`` as a float64 array, or InputError saying what it was."""
    if isinstance(obj, (dict, str, bytes)) or obj is None:
        raise InputError(f"{what} is a {type(obj).__name__}, not a numeric array", path)
    try:
        arr = np.asarray(obj)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"dtype {arr.dtype}")
        return arr.astype(np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise InputError(f"{what} is not a numeric array ({msg})", path) from None


def _dump_pickle(path: str | Path, obj: object) -> None:
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=4)
    atomic_write_bytes(path, buf.getvalue())


def ctf_params_from_cryodrgn_array(arr: np.ndarray) -> CTFParams:
    """`(N, 9)` cryoDRGN CTF array -> float64 :class:`CTFParams` (an `(N, 8)` array, without
    the phase-shift column, reads with phase shift 0)."""
    a = torch.as_tensor(np.asarray(arr, dtype=np.float64))
    return CTFParams(
        defocus_u_angstrom=a[:, 2].clone(),
        defocus_v_angstrom=a[:, 3].clone(),
        defocus_angle_deg=a[:, 4].clone(),
        voltage_kv=a[:, 5].clone(),
        cs_mm=a[:, 6].clone(),
        amplitude_contrast=a[:, 7].clone(),
        phase_shift_deg=a[:, 8].clone() if a.shape[1] > 8 else torch.zeros_like(a[:, 0]),
        bfactor_a2=torch.zeros_like(a[:, 0]),
    )


def cryodrgn_array_from_ctf_params(
    ctf: CTFParams, box_px: int, pixel_size_angstrom: float
) -> np.ndarray:
    """:class:`CTFParams` -> cryoDRGN `(N, 9)` float32 array (the B-factor is dropped)."""
    n = len(ctf)
    cols = [
        np.full(n, float(box_px)),
        np.full(n, float(pixel_size_angstrom)),
        *(
            getattr(ctf, f).detach().cpu().double().expand(n).numpy()
            for f in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg",
                      "voltage_kv", "cs_mm", "amplitude_contrast", "phase_shift_deg")
        ),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def read_cryodrgn_ctf(path: str | Path) -> tuple[CTFParams, int, float]:
    """Read a cryoDRGN ``ctf.pkl``.

    Returns
    -------
    ctf : CTFParams (float64, `(N,)` fields)
    box_px : int
        Column ``D`` (must be the same for all rows).
    pixel_size_angstrom : float
        Column ``Apix`` (must be the same for all rows).
    """
    arr = _float_array(_load_pickle(path), "CTF pickle content", path)
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise InputError(f"not a cryoDRGN CTF array: expected (N, 9), got {arr.shape}", path)
    if arr.shape[0] == 0:
        raise InputError("CTF pickle has no rows", path)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(1))[0])
        raise InputError(f"CTF parameters contain NaN/Inf (row {bad})", path)
    boxes = np.unique(arr[:, 0])
    apix = np.unique(np.round(arr[:, 1], 5))
    if boxes.size != 1:
        raise InputError(f"CTF pickle mixes box sizes {boxes[:6].tolist()}", path)
    if apix.size != 1:
        raise InputError(f"conflicting pixel sizes in CTF pickle {apix[:6].tolist()} Å", path)
    if boxes[0] <= 0 or boxes[0] != round(boxes[0]):
        raise InputError(f"CTF pickle box size (column D) is {boxes[0]:g}, not a positive "
                         f"integer", path)
    if arr[0, 1] <= 0:
        raise InputError(f"CTF pickle pixel size (column Apix) is {arr[0, 1]:g} Å", path)
    return ctf_params_from_cryodrgn_array(arr), int(boxes[0]), float(arr[0, 1])


def write_cryodrgn_ctf(
    path: str | Path, ctf: CTFParams, box_px: int, pixel_size_angstrom: float
) -> None:
    """Write :class:`CTFParams` as a cryoDRGN ``ctf.pkl`` `(N, 9)` float32, atomically."""
    _dump_pickle(path, cryodrgn_array_from_ctf_params(ctf, box_px, pixel_size_angstrom))


def shift_px_from_cryodrgn_trans(trans: Tensor | ArrayLike, box_px: int) -> Tensor:
    """cryoDRGN ``trans`` `(N, 2)` (fraction of box) -> cryospin ``shift_px = −trans·D``."""
    return -torch.as_tensor(np.asarray(trans, dtype=np.float64)) * float(box_px)


def cryodrgn_trans_from_shift_px(shift_px: Tensor | ArrayLike, box_px: int) -> np.ndarray:
    """cryospin ``shift_px`` `(N, 2)` -> cryoDRGN ``trans = −shift_px / D`` (float64)."""
    t = torch.as_tensor(shift_px).detach().cpu().double().numpy()
    return -t / float(box_px)


def read_cryodrgn_poses(path: str | Path, box_px: int) -> tuple[Tensor, Tensor]:
    """Read a cryoDRGN ``pose.pkl``.

    Accepts ``(rot, trans)``, ``(rot,)`` or a bare ``rot`` array (shifts are then 0).

    Returns
    -------
    rotations : `(N, 3, 3)` float64
        cryospin rotations (= cryoDRGN's ``rot``).
    shifts_px : `(N, 2)` float64
        ``−trans · box_px``.
    """
    obj = _load_pickle(path)
    if isinstance(obj, (tuple, list)):
        parts = list(obj)
    else:
        parts = [obj]
    if not parts or len(parts) > 3:
        raise InputError("not a cryoDRGN pose pickle: expected (rot, trans)", path)
    rot = _float_array(parts[0], "pose pickle rotations", path)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(f"pose pickle rotations have shape {rot.shape}, expected (N, 3, 3)",
                         path)
    n = rot.shape[0]
    if n == 0:
        raise InputError("pose pickle has no rows", path)
    if len(parts) >= 2 and parts[1] is not None:
        trans = _float_array(parts[1], "pose pickle translations", path)
        if trans.shape != (n, 2):
            raise InputError(f"pose pickle translations have shape {trans.shape}, "
                             f"expected ({n}, 2)", path)
    else:
        trans = np.zeros((n, 2))
    if not (np.isfinite(rot).all() and np.isfinite(trans).all()):
        raise InputError("pose pickle contains NaN/Inf", path)
    det = np.linalg.det(rot)
    orthogonality = np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max()
    if np.abs(det - 1).max() > 1e-3 or orthogonality > 1e-3:
        raise InputError("pose pickle rotations are not rotation matrices", path)
    return torch.from_numpy(rot), shift_px_from_cryodrgn_trans(trans, box_px)


def write_cryodrgn_poses(
    path: str | Path, rotations: Tensor | ArrayLike, shifts_px: Tensor | ArrayLike, box_px: int
) -> None:
    """Write ``(rot, trans)`` as a cryoDRGN ``pose.pkl`` (float64), atomically.

    ``rot = rotations`` `(N, 3, 3)`; ``trans = −shifts_px / box_px`` `(N, 2)`.
    """
    rot = torch.as_tensor(rotations).detach().cpu().double().numpy()
    trans = cryodrgn_trans_from_shift_px(shifts_px, box_px)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or trans.shape != (rot.shape[0], 2):
        raise ValueError(f"rotations {rot.shape} / shifts {trans.shape} must be (N,3,3) / (N,2)")
    _dump_pickle(path, (rot, trans))


def write_indices_pkl(path: str | Path, indices: ArrayLike) -> None:
    """Write 0-based particle indices `(n,)` as an int64 array pickle (cryoDRGN's ``--ind``
    file; also read by ``cryospin reconstruct --ind``), atomically."""
    arr = np.asarray(indices)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"indices must be a 1D integer array, got {arr.dtype} {arr.shape}")
    _dump_pickle(path, arr.astype(np.int64))
