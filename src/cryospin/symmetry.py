"""Point-group symmetry: the rotations of the cyclic (Cn) and dihedral (Dn) groups.

Convention (``docs/conventions.md``, "Symmetry"): the symmetry axis is ``z``; for Dn the
two-fold axes lie in the ``xy`` plane, one of them along ``x`` (RELION's convention for Dn).
A map is symmetric when ``V(g r) = V(r)`` for every ``g`` of the group; poses ``R`` and
``R g`` then give identical images (``P(x, y) = ∫ V(Rᵀ r) dz`` and ``V((R g)ᵀ r) = V(gᵀ Rᵀ r)
= V(Rᵀ r)`` since ``gᵀ = g⁻¹`` is in the group), so pose errors of a symmetric particle are
taken as the minimum over the group.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from cryospin.errors import InputError

__all__ = ["parse_point_group", "point_group_rotations"]

_SYMBOL = re.compile(r"^\s*([CcDd])\s*(\d+)\s*$")


def parse_point_group(symbol: str) -> tuple[str, int]:
    """``"D7"`` -> ``("D", 7)``; accepts C1, Cn (n >= 1) and Dn (n >= 2), any case.

    Raises
    ------
    InputError
        For anything else (the message names the accepted forms).
    """
    m = _SYMBOL.match(str(symbol))
    if m is None:
        raise InputError(f"unknown symmetry {symbol!r}: expected Cn or Dn, e.g. C1, C4, D7")
    kind, n = m.group(1).upper(), int(m.group(2))
    if n < 1 or (kind == "D" and n < 2):
        raise InputError(f"unknown symmetry {symbol!r}: expected C1..Cn or D2..Dn")
    return kind, n


def _rot_z(angle_rad: float) -> Tensor:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def point_group_rotations(symbol: str) -> Tensor:
    """The group's rotation matrices, `(G, 3, 3)` float64, identity first.

    ``Cn``: rotations by ``2πk/n`` about ``z`` (``G = n``). ``Dn``: those and the same composed
    with the two-fold ``diag(1, −1, −1)`` about ``x`` (``G = 2n``).
    """
    kind, n = parse_point_group(symbol)
    cyclic = [_rot_z(2.0 * math.pi * k / n) for k in range(n)]
    out = list(cyclic)
    if kind == "D":
        flip_x = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
        out += [c @ flip_x for c in cyclic]
    return torch.stack(out)
