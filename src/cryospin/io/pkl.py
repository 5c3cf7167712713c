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

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cryospin.atomic import atomic_write_bytes
from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams

__all__ = [
    "read_cryodrgn_ctf",
    "write_cryodrgn_ctf",
    "ctf_params_from_cryodrgn_array",
    "cryodrgn_array_from_ctf_params",
    "read_cryodrgn_poses",
    "write_cryodrgn_poses",
    "shift_px_from_cryodrgn_trans",
    "cryodrgn_trans_from_shift_px",
]


def _load_pickle(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", p)
    try:
        with open(p, "rb") as fh:
            return pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
        raise InputError(f"cannot read pickle ({type(exc).__name__}: {exc})", p) from None


def _dump_pickle(path: str | Path, obj: Any) -> None:
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=4)
    atomic_write_bytes(path, buf.getvalue())


def ctf_params_from_cryodrgn_array(arr: np.ndarray) -> CTFParams:
    """`(N, 9)` or `(N, 8)`-plus cryoDRGN CTF array -> float64 :class:`CTFParams`."""
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
    arr = _load_pickle(path)
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] < 8 or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"not a cryoDRGN CTF array: expected (N, 9), got {arr.shape}", path)
    if not np.isfinite(arr).all():
        raise InputError("CTF parameters contain NaN/Inf", path)
    boxes = np.unique(arr[:, 0])
    apix = np.unique(np.round(arr[:, 1].astype(np.float64), 5))
    if boxes.size != 1:
        raise InputError(f"CTF pickle mixes box sizes {boxes.tolist()}", path)
    if apix.size != 1:
        raise InputError(f"conflicting pixel sizes in CTF pickle {apix.tolist()} Å", path)
    return ctf_params_from_cryodrgn_array(arr), int(boxes[0]), float(arr[0, 1])


def write_cryodrgn_ctf(
    path: str | Path, ctf: CTFParams, box_px: int, pixel_size_angstrom: float
) -> None:
    """Write :class:`CTFParams` as a cryoDRGN ``ctf.pkl`` `(N, 9)` float32, atomically."""
    _dump_pickle(path, cryodrgn_array_from_ctf_params(ctf, box_px, pixel_size_angstrom))


def shift_px_from_cryodrgn_trans(trans: Any, box_px: int) -> Tensor:
    """cryoDRGN ``trans`` `(N, 2)` (fraction of box) -> cryospin ``shift_px = −trans·D``."""
    return -torch.as_tensor(np.asarray(trans, dtype=np.float64)) * float(box_px)


def cryodrgn_trans_from_shift_px(shift_px: Any, box_px: int) -> np.ndarray:
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
    rot = np.asarray(parts[0], dtype=np.float64)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(f"pose pickle rotations have shape {rot.shape}, expected (N, 3, 3)",
                         path)
    n = rot.shape[0]
    if len(parts) >= 2 and parts[1] is not None:
        trans = np.asarray(parts[1], dtype=np.float64)
        if trans.shape != (n, 2):
            raise InputError(f"pose pickle translations have shape {trans.shape}, "
                             f"expected ({n}, 2)", path)
    else:
        trans = np.zeros((n, 2))
    if not (np.isfinite(rot).all() and np.isfinite(trans).all()):
        raise InputError("pose pickle contains NaN/Inf", path)
    det = np.linalg.det(rot)
    if np.abs(det - 1).max() > 1e-3 or np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max() > 1e-3:
        raise InputError("pose pickle rotations are not rotation matrices", path)
    return torch.from_numpy(rot), shift_px_from_cryodrgn_trans(trans, box_px)


def write_cryodrgn_poses(
    path: str | Path, rotations: Any, shifts_px: Any, box_px: int
) -> None:
    """Write ``(rot, trans)`` as a cryoDRGN ``pose.pkl`` (float64), atomically.

    ``rot = rotations`` `(N, 3, 3)`; ``trans = −shifts_px / box_px`` `(N, 2)`.
    """
    rot = torch.as_tensor(rotations).detach().cpu().double().numpy()
    trans = cryodrgn_trans_from_shift_px(shifts_px, box_px)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or trans.shape != (rot.shape[0], 2):
        raise ValueError(f"rotations {rot.shape} / shifts {trans.shape} must be (N,3,3) / (N,2)")
    _dump_pickle(path, (rot, trans))
