"""Fourier shell correlation (FSC) of two maps, and the resolution where it crosses a threshold.

Shells follow ``docs/conventions.md``: the frequency of a voxel is ``k = i − L//2`` cycles per box
on the centred grid (equivalently ``torch.fft.fftfreq(L) · L`` on the uncentred one); a voxel
belongs to shell ``s = round(|k|)``; shells ``0 … L//2`` are reported (the corners beyond Nyquist
are left out). In shell ``s``

    FSC(s) = Re Σ F_a(k) conj F_b(k) / sqrt(Σ |F_a(k)|² · Σ |F_b(k)|²).

Spatial frequency of shell ``s`` is ``s / L`` cycles per pixel, i.e. ``s / (L · pixel_size)`` Å⁻¹,
and its resolution ``L · pixel_size / s`` Å.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin.atomic import atomic_write_text

__all__ = ["FSCResult", "fsc", "fsc_curve", "frequency_radius", "shell_index", "resolution_at",
           "write_fsc_json"]


def frequency_radius(box_px: int, *, ndim: int = 3,
                     device: torch.device | str | None = None) -> Tensor:
    """``|k|`` in cycles per box of every voxel of the *uncentred* FFT grid, `(L,)*ndim`
    float64."""
    k = torch.fft.fftfreq(box_px, d=1.0 / box_px, dtype=torch.float64, device=device)  # (L,)
    grids = torch.meshgrid(*([k] * ndim), indexing="ij")
    return torch.sqrt(reduce(operator.add, (g * g for g in grids)))


def shell_index(box_px: int, *, ndim: int = 3, device: torch.device | str | None = None) -> Tensor:
    """Shell number ``round(|k|)`` of every voxel of the *uncentred* FFT grid, `(L,)*ndim` int64.

    Values above ``L//2`` mark the corners beyond Nyquist.
    """
    return torch.round(frequency_radius(box_px, ndim=ndim, device=device)).to(torch.int64)


def fsc_curve(map_a: Tensor, map_b: Tensor) -> tuple[Tensor, Tensor]:
    """FSC per shell ``0 … L//2`` between two real maps (no mask, no units).

    Parameters
    ----------
    map_a, map_b : `(L, L, L)`
        Real maps on the same grid.

    Returns
    -------
    fsc_values : `(L//2 + 1,)`
        FSC of each shell, in the dtype of the inputs (float64 for float64 maps). A shell where
        either map has no power gets 0.
    voxel_counts : `(L//2 + 1,)` int64
        Number of voxels in each shell.
    """
    if map_a.shape != map_b.shape:
        raise ValueError(f"maps differ in shape: {tuple(map_a.shape)} vs {tuple(map_b.shape)}")
    if map_a.ndim != 3 or len(set(map_a.shape)) != 1:
        raise ValueError(f"expected a cubic (L, L, L) map, got {tuple(map_a.shape)}")
    L = map_a.shape[-1]
    n_shells = L // 2 + 1
    fa = torch.fft.fftn(map_a)
    fb = torch.fft.fftn(map_b.to(map_a.dtype))
    shells = shell_index(L, device=map_a.device).reshape(-1)
    inside = shells < n_shells
    idx = shells[inside]
    fa, fb = fa.reshape(-1)[inside], fb.reshape(-1)[inside]
    real_dtype = fa.real.dtype
    cross = torch.zeros(n_shells, dtype=real_dtype, device=map_a.device)
    pa = torch.zeros_like(cross)
    pb = torch.zeros_like(cross)
    cross.index_add_(0, idx, (fa * fb.conj()).real)
    pa.index_add_(0, idx, fa.abs() ** 2)
    pb.index_add_(0, idx, fb.abs() ** 2)
    counts = torch.bincount(idx, minlength=n_shells)
    denom = torch.sqrt(pa * pb)
    values = torch.where(denom > 0, cross / torch.where(denom > 0, denom, 1), 0)
    return values, counts


@dataclass(frozen=True)
class FSCResult:
    """An FSC curve with its frequencies and the resolutions at 0.5 and 0.143.

    Attributes
    ----------
    shells : `(S,)` float64 numpy array
        Shell frequency in cycles per box, ``0 … L//2``.
    fsc : `(S,)` float64 numpy array
        FSC of each shell.
    voxel_counts : `(S,)` int64 numpy array
        Voxels per shell.
    box_px : int
        Box size ``L``.
    pixel_size_angstrom : float or None
        Voxel size; ``None`` means unknown, and resolutions are then in pixels.
    """

    shells: np.ndarray
    fsc: np.ndarray
    voxel_counts: np.ndarray
    box_px: int
    pixel_size_angstrom: float | None
    meta: dict = field(default_factory=dict)

    @property
    def frequency_per_angstrom(self) -> np.ndarray | None:
        """Shell frequencies in Å⁻¹ (``None`` without a pixel size)."""
        if self.pixel_size_angstrom is None:
            return None
        return self.shells / (self.box_px * self.pixel_size_angstrom)

    @property
    def frequency_per_px(self) -> np.ndarray:
        """Shell frequencies in cycles per pixel (Nyquist = 0.5)."""
        return self.shells / self.box_px

    def resolution(self, threshold: float) -> float:
        """Resolution (Å, or px without a pixel size) at the first crossing of ``threshold``."""
        return resolution_at(self, threshold)

    def to_dict(self) -> dict:
        """JSON-ready summary: resolutions at 0.5 and 0.143 and the curve."""
        unit = "angstrom" if self.pixel_size_angstrom is not None else "px"
        freq = self.frequency_per_angstrom
        out = {
            "box_px": self.box_px,
            "pixel_size_angstrom": self.pixel_size_angstrom,
            f"resolution_0.5_{unit}": _finite_or_none(self.resolution(0.5)),
            f"resolution_0.143_{unit}": _finite_or_none(self.resolution(0.143)),
            "shells_cycles_per_box": self.shells.tolist(),
            "frequency_per_px": self.frequency_per_px.tolist(),
            "frequency_per_angstrom": None if freq is None else freq.tolist(),
            "fsc": self.fsc.tolist(),
            "voxel_counts": self.voxel_counts.tolist(),
        }
        out.update(self.meta)
        return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def fsc(
    map_a: Tensor | np.ndarray,
    map_b: Tensor | np.ndarray,
    *,
    mask: Tensor | np.ndarray | None = None,
    pixel_size_angstrom: float | None = None,
) -> FSCResult:
    """Fourier shell correlation between two maps.

    Parameters
    ----------
    map_a, map_b : `(L, L, L)`
        Real maps on the same grid, indexed ``[z, y, x]``. Computed in float64.
    mask : `(L, L, L)`, optional
        Real-space mask (binary or soft) multiplied into both maps first.
    pixel_size_angstrom : float, optional
        Voxel size; when given, frequencies are also in Å⁻¹ and resolutions in Å.

    Returns
    -------
    FSCResult
    """
    a = torch.as_tensor(map_a).to(torch.float64)
    b = torch.as_tensor(map_b).to(torch.float64)
    if mask is not None:
        m = torch.as_tensor(mask).to(torch.float64)
        if m.shape != a.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} differs from map shape {tuple(a.shape)}")
        a, b = a * m, b * m
    values, counts = fsc_curve(a, b)
    L = a.shape[-1]
    return FSCResult(
        shells=np.arange(L // 2 + 1, dtype=np.float64),
        fsc=values.cpu().numpy(),
        voxel_counts=counts.cpu().numpy(),
        box_px=L,
        pixel_size_angstrom=None if pixel_size_angstrom is None else float(pixel_size_angstrom),
    )


def resolution_at(result: FSCResult, threshold: float) -> float:
    """Resolution at the first crossing of ``threshold``, by linear interpolation in frequency.

    The curve is scanned from shell 1 outwards; at the first shell ``s`` with
    ``FSC(s) < threshold`` the crossing frequency is interpolated linearly between shells
    ``s − 1`` and ``s``. If the curve never drops below the threshold the Nyquist resolution
    (2 pixels) is returned — the true resolution is at least that good.

    Returns
    -------
    float
        ``L · pixel_size / s_cross`` in Å (in pixels without a pixel size); ``inf`` when the
        crossing is at zero frequency.
    """
    values = np.asarray(result.fsc, dtype=np.float64)
    shells = np.asarray(result.shells, dtype=np.float64)
    scale = result.box_px * (result.pixel_size_angstrom or 1.0)
    s_cross = shells[-1]
    for s in range(1, len(values)):
        if values[s] < threshold:
            f0, f1 = values[s - 1], values[s]
            frac = 1.0 if f0 == f1 else float(np.clip((f0 - threshold) / (f0 - f1), 0.0, 1.0))
            s_cross = shells[s - 1] + frac * (shells[s] - shells[s - 1])
            break
    return math.inf if s_cross <= 0 else float(scale / s_cross)


def write_fsc_json(result: FSCResult, path: str | Path, **extra: object) -> None:
    """Write :meth:`FSCResult.to_dict` (plus ``extra`` keys) as JSON, atomically."""
    data = result.to_dict()
    data.update(extra)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
