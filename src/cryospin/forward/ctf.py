"""Contrast transfer function (CTF) in the RELION convention (the negative of cryoDRGN's).

See ``docs/conventions.md`` (section CTF) for the formula, units and sign. With spatial frequency
``s = (sx, sy)`` in 1/Å, ``α = atan2(sy, sx)`` (from the x axis, towards y) and

    df(α) = (dfU + dfV)/2 + (dfU − dfV)/2 · cos(2 (α − dfang))
    γ     = 2π (−0.5 df λ |s|² + 0.25 Cs λ³ |s|⁴) − phase_shift
    CTF   = −(√(1 − w²) sin γ − w cos γ) · exp(−B |s|²/4),

so ``CTF(0) = +w`` and positive-density (bright-particle) images are modelled directly.
All functions follow the dtype of the parameters and keep autograd intact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.forward.lattice import frequency_grid_2d

__all__ = ["CTFParams", "electron_wavelength_angstrom", "ctf_at", "compute_ctf"]


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters; every field is a tensor of shape `(N,)` (or broadcastable).

    Attributes
    ----------
    defocus_u_angstrom, defocus_v_angstrom : `(N,)`
        Defocus along the major/minor astigmatism axes, Å (underfocus positive).
    defocus_angle_deg : `(N,)`
        Angle of the U axis from the x axis, degrees, counter-clockwise.
    voltage_kv : `(N,)`
        Acceleration voltage, kV.
    cs_mm : `(N,)`
        Spherical aberration, mm.
    amplitude_contrast : `(N,)`
        Amplitude contrast fraction ``w`` in [0, 1).
    phase_shift_deg : `(N,)`
        Phase-plate shift, degrees.
    bfactor_a2 : `(N,)`
        Envelope B-factor, Å² (``exp(−B s²/4)``); 0 for none.
    """

    defocus_u_angstrom: Tensor
    defocus_v_angstrom: Tensor
    defocus_angle_deg: Tensor
    voltage_kv: Tensor
    cs_mm: Tensor
    amplitude_contrast: Tensor
    phase_shift_deg: Tensor
    bfactor_a2: Tensor

    def __len__(self) -> int:
        return int(self.defocus_u_angstrom.shape[0])

    def __getitem__(self, index: object) -> CTFParams:
        """Rows selected by ``index`` (int tensor, slice, bool mask) as a new `CTFParams`."""
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def to(self, *args: object, **kwargs: object) -> CTFParams:
        """Move/cast every field like :meth:`torch.Tensor.to`."""
        return CTFParams(
            **{f.name: getattr(self, f.name).to(*args, **kwargs) for f in dataclasses.fields(self)}
        )

    @staticmethod
    def cat(parts: list[CTFParams]) -> CTFParams:
        """Concatenate along the particle axis."""
        return CTFParams(
            **{
                f.name: torch.cat([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(CTFParams)
            }
        )


def electron_wavelength_angstrom(voltage_kv: Tensor | float) -> Tensor | float:
    """Relativistic electron wavelength in Å: ``12.2643247 / sqrt(V (1 + 0.978466e-6 V))``.

    ``V`` is the acceleration voltage in volts (``1000 · voltage_kv``); e.g. 300 kV -> 0.019687 Å.
    Accepts a float (returns a float) or a tensor of any shape.
    """
    volts = voltage_kv * 1000.0
    arg = volts * (1.0 + 0.978466e-6 * volts)
    if isinstance(arg, Tensor):
        return 12.2643247 / torch.sqrt(arg)
    return 12.2643247 / math.sqrt(arg)


def ctf_at(frequencies_per_angstrom: Tensor, params: CTFParams) -> Tensor:
    """Evaluate the CTF at arbitrary spatial frequencies.

    Parameters
    ----------
    frequencies_per_angstrom : `(..., 2)`
        Spatial frequencies ``(sx, sy)`` in 1/Å (x along image columns, y along rows).
    params : CTFParams
        Every field broadcastable against ``frequencies_per_angstrom.shape[:-1]`` (e.g. fields
        of shape `(N, 1)` with frequencies `(P, 2)` give `(N, P)`).

    Returns
    -------
    `(...)`
        CTF values (RELION sign, ``+w`` at ``s = 0``), times ``exp(−B s²/4)``.
    """
    if frequencies_per_angstrom.shape[-1] != 2:
        raise ValueError(
            f"frequencies must have shape (..., 2), got {tuple(frequencies_per_angstrom.shape)}"
        )
    sx, sy = frequencies_per_angstrom.unbind(-1)
    s2 = sx * sx + sy * sy
    alpha = torch.atan2(sy, sx)
    lam = electron_wavelength_angstrom(params.voltage_kv)
    cs_angstrom = params.cs_mm * 1e7
    dfang = torch.deg2rad(params.defocus_angle_deg)
    df = 0.5 * (params.defocus_u_angstrom + params.defocus_v_angstrom) + 0.5 * (
        params.defocus_u_angstrom - params.defocus_v_angstrom
    ) * torch.cos(2 * (alpha - dfang))
    gamma = 2 * math.pi * (
        -0.5 * df * lam * s2 + 0.25 * cs_angstrom * lam**3 * s2 * s2
    ) - torch.deg2rad(params.phase_shift_deg)
    w = params.amplitude_contrast
    ctf = w * torch.cos(gamma) - torch.sqrt(1 - w * w) * torch.sin(gamma)
    return ctf * torch.exp(-0.25 * params.bfactor_a2 * s2)


def compute_ctf(
    params: CTFParams,
    box_px: int,
    pixel_size_angstrom: float,
    *,
    frequencies: Tensor | None = None,
) -> Tensor:
    """CTF images of ``N`` particles on the centred grid (DC at index ``L//2``).

    Parameters
    ----------
    params : CTFParams
        Fields of shape `(N,)` (any common broadcast shape ``batch`` works).
    box_px : int
        Box size ``L`` in pixels.
    pixel_size_angstrom : float
        Pixel size, Å; frequency ``k`` cycles per box is ``k / (L · pixel_size)`` 1/Å.
    frequencies : `(P, 2)`, optional
        Frequencies ``(kx, ky)`` in cycles per box (e.g. the loss disc); default the full grid.

    Returns
    -------
    `(N, L, L)` or `(N, P)`
        In the dtype and on the device of ``params.defocus_u_angstrom``.
    """
    L = int(box_px)
    ref = params.defocus_u_angstrom
    if frequencies is None:
        k = frequency_grid_2d(L, dtype=ref.dtype, device=ref.device).reshape(L * L, 2)
    else:
        if frequencies.ndim != 2 or frequencies.shape[-1] != 2:
            raise ValueError(f"frequencies must have shape (P, 2), got {tuple(frequencies.shape)}")
        k = frequencies.to(dtype=ref.dtype, device=ref.device)
    s = k / (L * float(pixel_size_angstrom))  # (P, 2) in 1/Å
    expanded = CTFParams(
        **{f.name: getattr(params, f.name)[..., None] for f in dataclasses.fields(params)}
    )  # fields (..., 1)
    out = ctf_at(s, expanded)  # (..., P)
    if frequencies is None:
        out = out.reshape(*out.shape[:-1], L, L)
    return out
