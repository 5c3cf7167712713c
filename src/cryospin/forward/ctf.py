"""Contrast transfer function (CTF) in the RELION/cryoDRGN convention.

See ``docs/conventions.md`` (section CTF) for the formula, units and sign.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CTFParams"]


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
