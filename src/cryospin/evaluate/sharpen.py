"""Map sharpening: a map's Guinier plot, the B-factor fitted to it, and the post-processed map.

A map's amplitudes fall with spatial frequency ``q`` (Å⁻¹) as ``exp(−B q² / 4)`` over the range
where they carry signal (the envelope of the microscope, the particles' flexibility and the pose
errors together; Rosenthal & Henderson 2003). The **Guinier plot** is the logarithm of a shell's
mean amplitude against ``q²``; a straight line fitted to it between ``GUINIER_LOW_ANGSTROM`` (10 Å)
and the map's resolution has the slope ``−B / 4``, so ``B = −4 · slope``. RELION's
``postprocess --auto_bfac`` reports and applies ``B_used = 4 · slope`` (negative for a map whose
amplitudes fall), multiplying every Fourier coefficient by ``exp(−B_used q² / 4)``, which
restores the fitted fall-off; cryospin follows that sign (``postprocess.star``'s
``rlnBfactorUsedForSharpening``).

Conventions (``docs/conventions.md``, "Gold standard"): maps are `(L, L, L)` indexed
``[z, y, x]``; a voxel's frequency is ``|k| / (L · pixel size)`` Å⁻¹ with ``k`` in cycles per
box on the uncentred FFT grid; shells ``s = round(|k|)``, ``0 … L//2``, as
:mod:`cryospin.evaluate.fsc`. The B-factor and low-pass filters use the exact ``|k|`` of each
voxel; the FSC weights are per shell.

The post-processed map (:func:`postprocess_map`) is that of RELION's ``postprocess``: the
average of the halves weighted per shell by ``sqrt(2 FSC / (1 + FSC))``
(:func:`cryospin.evaluate.gold_standard.fsc_weighted_average`, the input here), the Guinier line
fitted to the weighted map within the mask, ``exp(−B_used q² / 4)`` applied, and a raised-cosine
low-pass at the final resolution (``LOWPASS_EDGE_SHELLS`` shells wide, centred on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin.evaluate.fsc import frequency_radius, shell_index

__all__ = [
    "GUINIER_LOW_ANGSTROM",
    "LOWPASS_EDGE_SHELLS",
    "MIN_GUINIER_SHELLS",
    "GuinierFit",
    "Guinier",
    "PostProcessed",
    "shell_amplitudes",
    "guinier_plot",
    "fit_guinier",
    "apply_bfactor",
    "lowpass",
    "postprocess_map",
]

#: Low-resolution end of the Guinier fit, Å (RELION's ``--autob_lowres`` default).
GUINIER_LOW_ANGSTROM = 10.0
#: Fewest shells a Guinier line is fitted to; fewer, and no B-factor is fitted.
MIN_GUINIER_SHELLS = 3
#: Width of the low-pass filter's raised-cosine edge, shells (RELION's ``--filter_edge_width``).
LOWPASS_EDGE_SHELLS = 2.0


@dataclass(frozen=True)
class GuinierFit:
    """A straight line ``ln A = intercept + slope · q²`` fitted to a Guinier plot.

    Attributes
    ----------
    slope_a2 : float
        Slope, Å² (``ln`` amplitude per Å⁻²).
    intercept : float
        ``ln`` amplitude at ``q = 0``.
    correlation : float
        Pearson correlation of ``q²`` and ``ln A`` over the fitted shells (−1: a perfect fall).
    low_angstrom, high_angstrom : float
        Resolution range fitted, Å (``low ≥ high``).
    shells : int
        Number of shells fitted.
    """

    slope_a2: float
    intercept: float
    correlation: float
    low_angstrom: float
    high_angstrom: float
    shells: int

    @property
    def bfactor_a2(self) -> float:
        """``B_used = 4 · slope`` (Å²): negative for a map whose amplitudes fall, and what
        :func:`apply_bfactor` takes to restore them (RELION's sign)."""
        return 4.0 * self.slope_a2

    @classmethod
    def from_dict(cls, d: dict) -> GuinierFit:
        """Inverse of :meth:`to_dict` (its ``bfactor_a2`` is derived, not read)."""
        return cls(slope_a2=float(d["slope_a2"]), intercept=float(d["intercept"]),
                   correlation=float(d["correlation"]), low_angstrom=float(d["low_angstrom"]),
                   high_angstrom=float(d["high_angstrom"]), shells=int(d["shells"]))

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"slope_a2": self.slope_a2, "intercept": self.intercept,
                "correlation": self.correlation, "low_angstrom": self.low_angstrom,
                "high_angstrom": self.high_angstrom, "shells": self.shells,
                "bfactor_a2": self.bfactor_a2}


@dataclass(frozen=True)
class Guinier:
    """A map's Guinier plot: ``ln`` of each shell's mean amplitude against ``q²``.

    Attributes
    ----------
    q2_per_a2 : `(L//2,)` float64
        ``q²`` of shells ``1 … L//2``, Å⁻² (``q = s / (L · pixel size)``).
    log_amplitude : `(L//2,)` float64
        ``ln`` of the shell's mean ``|F|``; ``-inf`` for a shell of zero amplitude.
    """

    q2_per_a2: np.ndarray
    log_amplitude: np.ndarray


@dataclass(frozen=True)
class PostProcessed:
    """The post-processed map and what made it (:func:`postprocess_map`).

    Attributes
    ----------
    volume : `(L, L, L)`
        FSC-weighted map, sharpened by ``bfactor_a2`` and low-passed at the resolution; the
        dtype of the input.
    bfactor_a2 : float
        B-factor applied, Å² (``B_used``; the given one, or 0 when none could be fitted).
    fit : GuinierFit or None
        The fitted line; ``None`` when a B-factor was given or too few shells lie between
        10 Å and the resolution (``reason`` says which).
    reason : str or None
        Why no B-factor was fitted (``None`` when one was).
    weighted, sharpened : Guinier
        Guinier plots of the masked weighted map and of the masked post-processed map.
    resolution_angstrom : float
        Resolution the map was low-passed at (Å; pixels without a pixel size).
    """

    volume: Tensor
    bfactor_a2: float
    fit: GuinierFit | None
    reason: str | None
    weighted: Guinier
    sharpened: Guinier
    resolution_angstrom: float


def _check_cubic(volume: Tensor) -> int:
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"expected a cubic (L, L, L) map, got {tuple(volume.shape)}")
    return int(volume.shape[-1])


def _filtered(volume: Tensor, gain: Tensor) -> Tensor:
    """``volume`` with its Fourier coefficients multiplied by the real, even ``gain``."""
    out = torch.fft.ifftn(torch.fft.fftn(volume.detach().to(torch.float64)) * gain).real
    return out.to(volume.dtype)


def shell_amplitudes(volume: Tensor) -> Tensor:
    """Mean ``|F|`` of each shell ``0 … L//2`` of a real map, `(L//2 + 1,)` float64.

    ``F`` is the unnormalised 3D DFT (``torch.fft.fftn``); the corners beyond Nyquist are left
    out.
    """
    L = _check_cubic(volume)
    amplitude = torch.fft.fftn(volume.detach().to(torch.float64)).abs().reshape(-1)
    shells = shell_index(L, device=volume.device).reshape(-1)
    inside = shells <= L // 2
    total = torch.zeros(L // 2 + 1, dtype=torch.float64, device=volume.device)
    total.index_add_(0, shells[inside], amplitude[inside])
    counts = torch.bincount(shells[inside], minlength=L // 2 + 1).clamp(min=1)
    return total / counts


def guinier_plot(volume: Tensor, pixel_size_angstrom: float) -> Guinier:
    """The Guinier plot of a map, shells ``1 … L//2`` (module docstring).

    Parameters
    ----------
    volume : `(L, L, L)`
        Real map.
    pixel_size_angstrom : float
        Voxel size, Å (1 for a map in pixels: ``q`` is then in px⁻¹).
    """
    L = _check_cubic(volume)
    amplitude = shell_amplitudes(volume)[1:].cpu().numpy()
    q = np.arange(1, L // 2 + 1, dtype=np.float64) / (L * pixel_size_angstrom)
    with np.errstate(divide="ignore"):
        log_amplitude = np.log(amplitude)
    return Guinier(q2_per_a2=q * q, log_amplitude=log_amplitude)


def fit_guinier(plot: Guinier, *, low_angstrom: float, high_angstrom: float) -> GuinierFit | None:
    """Least-squares line through the Guinier plot's shells with resolution in
    ``[high_angstrom, low_angstrom]`` (Å; ``1/low² ≤ q² ≤ 1/high²``) and a finite amplitude.

    Returns
    -------
    GuinierFit or None
        ``None`` when fewer than ``MIN_GUINIER_SHELLS`` shells lie in the range.
    """
    if not (high_angstrom > 0 and low_angstrom > 0):
        raise ValueError(f"the fit range must be positive, got {low_angstrom} to "
                         f"{high_angstrom} Å")
    q2, y = plot.q2_per_a2, plot.log_amplitude
    tolerance = 1e-9 * float(q2.max(initial=0.0))  # a shell exactly at a bound is inside
    keep = ((q2 >= 1.0 / low_angstrom**2 - tolerance) & (q2 <= 1.0 / high_angstrom**2 + tolerance)
            & np.isfinite(y))
    if int(keep.sum()) < MIN_GUINIER_SHELLS:
        return None
    x, y = q2[keep], y[keep]
    dx, dy = x - x.mean(), y - y.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return GuinierFit(slope_a2=slope, intercept=float(y.mean() - slope * x.mean()),
                      correlation=float((dx * dy).sum() / denom) if denom > 0 else 0.0,
                      low_angstrom=float(low_angstrom), high_angstrom=float(high_angstrom),
                      shells=int(keep.sum()))


def apply_bfactor(volume: Tensor, bfactor_a2: float, pixel_size_angstrom: float) -> Tensor:
    """``volume`` with every Fourier coefficient multiplied by ``exp(−B q² / 4)``.

    Parameters
    ----------
    volume : `(L, L, L)`
        Real map.
    bfactor_a2 : float
        ``B``, Å²: negative sharpens (RELION's ``B_used``), positive blurs.
    pixel_size_angstrom : float
        Voxel size, Å (``q = |k| / (L · pixel size)``, the voxel's exact frequency).

    Returns
    -------
    `(L, L, L)`, the dtype of ``volume``.
    """
    L = _check_cubic(volume)
    q = frequency_radius(L, device=volume.device) / (L * pixel_size_angstrom)
    return _filtered(volume, torch.exp(-0.25 * bfactor_a2 * q * q))


def lowpass(volume: Tensor, resolution_angstrom: float, pixel_size_angstrom: float, *,
            edge_shells: float = LOWPASS_EDGE_SHELLS) -> Tensor:
    """``volume`` low-passed at ``resolution_angstrom`` with a raised-cosine edge.

    The gain is 1 below ``|k| = s_c − w/2`` and 0 above ``s_c + w/2``, with ``s_c = L · pixel
    size / resolution`` (cycles per box) and ``w = edge_shells``; in between
    ``(1 + cos(π (|k| − s_c + w/2) / w)) / 2``.

    Returns
    -------
    `(L, L, L)`, the dtype of ``volume``.
    """
    L = _check_cubic(volume)
    if not resolution_angstrom > 0:
        raise ValueError(f"the low-pass resolution must be positive, got {resolution_angstrom}")
    cutoff = L * pixel_size_angstrom / resolution_angstrom
    r = frequency_radius(L, device=volume.device)
    if edge_shells > 0:
        t = ((r - cutoff + 0.5 * edge_shells) / edge_shells).clamp(0.0, 1.0)
        gain = 0.5 * (1.0 + torch.cos(math.pi * t))
    else:
        gain = (r <= cutoff).to(torch.float64)
    return _filtered(volume, gain)


def postprocess_map(
    weighted: Tensor,
    mask: Tensor,
    *,
    resolution_angstrom: float,
    pixel_size_angstrom: float | None,
    low_angstrom: float = GUINIER_LOW_ANGSTROM,
    bfactor_a2: float | None = None,
) -> PostProcessed:
    """Sharpen an FSC-weighted map by its Guinier B-factor and low-pass it at its resolution.

    Parameters
    ----------
    weighted : `(L, L, L)`
        The FSC-weighted average of two aligned half maps
        (:func:`cryospin.evaluate.gold_standard.fsc_weighted_average`).
    mask : `(L, L, L)`
        Soft mask in ``[0, 1]``: the Guinier plots are of the masked maps (the solvent's noise
        left out); the post-processed map itself is unmasked.
    resolution_angstrom : float
        The final resolution (corrected FSC at 0.143), Å (pixels without a pixel size); the
        high end of the fit and the low-pass. Not finite: the map is returned unfiltered.
    pixel_size_angstrom : float or None
        Voxel size. ``None``: nothing is fitted (the 10 Å bound has no meaning in pixels) and
        the low-pass is in pixels.
    low_angstrom : float
        Low end of the fit, Å.
    bfactor_a2 : float, optional
        A B-factor to apply instead of fitting one (Å², RELION's sign: negative sharpens;
        RELION's ``--adhoc_bfac``).

    Returns
    -------
    PostProcessed
    """
    L = _check_cubic(weighted)
    if tuple(mask.shape) != tuple(weighted.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from map shape "
                         f"{tuple(weighted.shape)}")
    apix = 1.0 if pixel_size_angstrom is None else float(pixel_size_angstrom)
    m = mask.to(device=weighted.device, dtype=weighted.dtype)
    weighted_plot = guinier_plot(weighted * m, apix)
    fit: GuinierFit | None = None
    reason: str | None
    if bfactor_a2 is not None:
        reason = "given, not fitted"
    elif pixel_size_angstrom is None:
        reason = "no pixel size: the Guinier fit's 10 Å bound has no meaning in pixels"
    elif not math.isfinite(resolution_angstrom):
        reason = "no resolution (the corrected FSC never reached 0.143)"
    elif resolution_angstrom >= low_angstrom:
        reason = (f"the resolution ({resolution_angstrom:.1f} Å) is not better than the "
                  f"Guinier fit's low end ({low_angstrom:g} Å)")
    else:
        fit = fit_guinier(weighted_plot, low_angstrom=low_angstrom,
                          high_angstrom=resolution_angstrom)
        reason = None if fit is not None else (
            f"fewer than {MIN_GUINIER_SHELLS} shells between {low_angstrom:g} Å and "
            f"{resolution_angstrom:.2f} Å at {apix:g} Å per voxel in a {L}-voxel box")
    bfactor = bfactor_a2 if bfactor_a2 is not None else 0.0 if fit is None else fit.bfactor_a2
    volume = apply_bfactor(weighted, bfactor, apix) if bfactor != 0.0 else weighted
    if math.isfinite(resolution_angstrom) and resolution_angstrom > 0:
        volume = lowpass(volume, resolution_angstrom, apix)
        low_passed_at = float(resolution_angstrom)
    else:
        low_passed_at = math.inf
    return PostProcessed(volume=volume, bfactor_a2=bfactor, fit=fit, reason=reason,
                         weighted=weighted_plot, sharpened=guinier_plot(volume * m, apix),
                         resolution_angstrom=low_passed_at)
