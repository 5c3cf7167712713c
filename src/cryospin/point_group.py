"""Point-group symbols: :class:`PointGroup` and :func:`parse_point_group` (``"D7"`` ->
``PointGroup("D", 7)``).

Text only, no torch: the configuration checks (and so the CLI's start-up) parse
``--symmetry`` with it. The groups' rotations are :mod:`cryospin.symmetry`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryospin.errors import InputError

__all__ = ["PointGroup", "parse_point_group"]

_SYMBOL = re.compile(r"^\s*(?:([CcDd])\s*(\d+)|([TtOo])|([Ii])\s*([1-4])?)\s*$")

@dataclass(frozen=True)
class PointGroup:
    """A point group parsed from its symbol (:func:`parse_point_group`).

    Attributes
    ----------
    kind : str
        ``"C"``, ``"D"``, ``"T"``, ``"O"`` or ``"I"``.
    n : int
        Order of the principal axis: ``n`` of Cn and Dn; 3 for T, 4 for O, 5 for I.
    setting : int
        RELION's icosahedral setting 1–4 (``I`` is 2); 0 for the other groups.
    """

    kind: str
    n: int
    setting: int = 0

    @property
    def symbol(self) -> str:
        """The canonical symbol: ``"C4"``, ``"D7"``, ``"T"``, ``"O"``, ``"I2"``."""
        if self.kind in "CD":
            return f"{self.kind}{self.n}"
        return f"I{self.setting}" if self.kind == "I" else self.kind

    @property
    def order(self) -> int:
        """Number of rotations ``|G|``: n, 2n, 12, 24 or 60."""
        return {"C": self.n, "D": 2 * self.n, "T": 12, "O": 24, "I": 60}[self.kind]


def parse_point_group(symbol: str) -> PointGroup:
    """``"D7"`` -> ``PointGroup("D", 7)``; accepts Cn (n >= 1), Dn (n >= 2), T, O, I and
    I1–I4 (RELION's icosahedral settings; ``I`` = ``I2``), any case.

    Raises
    ------
    InputError
        For anything else (the message names the accepted forms).
    """
    m = _SYMBOL.match(str(symbol))
    if m is None:
        raise InputError(f"unknown symmetry {symbol!r}: expected Cn, Dn, T, O, I or I1..I4, "
                         "e.g. C1, C4, D7, O, I")
    if m.group(3):
        kind = m.group(3).upper()
        return PointGroup(kind, 3 if kind == "T" else 4)
    if m.group(4):
        return PointGroup("I", 5, int(m.group(5) or 2))
    kind, n = m.group(1).upper(), int(m.group(2))
    if n < 1 or (kind == "D" and n < 2):
        raise InputError(f"unknown symmetry {symbol!r}: expected C1..Cn or D2..Dn")
    return PointGroup(kind, n)
