"""Convergence check of a plain run: the FSC between its final map and its trained volume.

A run without ``--halves`` ends with two maps of the same particles: ``map.mrc``, the Wiener
backprojection of the images from the final poses, and ``map_decoder.mrc``, the volume the
training learnt. Their FSC says how far the trained volume agrees with what its own poses
reconstruct, i.e. whether volume and poses have settled on each other. It is **not a
resolution**: both maps come from the same images, with poses refined against that same
volume, so their noise and their errors are shared and the curve stays high where neither map
is right. A resolution needs independent halves: ``cryospin reconstruct --halves``.

``RUN_DIR/convergence_fsc.json`` (:func:`write_convergence_json`) holds the curve, the shells
where it crosses 0.5 and 0.143 (labelled ``*_crossing_*``, never ``resolution``) and
``"is_resolution": false`` with the sentence above in ``note``. Shells are those of
:mod:`cryospin.evaluate.fsc`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin.atomic import atomic_write_text
from cryospin.evaluate.fsc import FSCResult, fsc
from cryospin.rundir import MAP, MAP_DECODER

__all__ = [
    "CONVERGENCE_NOTE",
    "ConvergenceCheck",
    "convergence_check",
    "write_convergence_json",
    "record_convergence_check",
]

log = logging.getLogger(__name__)

#: What the convergence FSC is and is not (written with it and shown with it).
CONVERGENCE_NOTE = (
    "a convergence check, NOT a resolution: both maps come from the same particles and poses; "
    "for a resolution run `cryospin reconstruct --halves`"
)


@dataclass(frozen=True)
class ConvergenceCheck:
    """FSC between a run's final map and its trained volume (module docstring).

    Attributes
    ----------
    fsc : FSCResult
        Unmasked FSC, final map vs trained volume.
    """

    fsc: FSCResult

    def crossing(self, threshold: float) -> float:
        """Where the curve first falls below ``threshold``: Å (px without a pixel size);
        ``inf`` at zero frequency, Nyquist when it never does (:func:`resolution_at`)."""
        return self.fsc.resolution(threshold)

    @property
    def unit(self) -> str:
        return "angstrom" if self.fsc.pixel_size_angstrom is not None else "px"

    def to_dict(self) -> dict:
        """JSON-ready: kind, ``is_resolution: false``, note, crossings and the curve."""
        unit = self.unit

        def finite(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        r = self.fsc
        return {
            "kind": "convergence check",
            "is_resolution": False,
            "note": CONVERGENCE_NOTE,
            "box_px": r.box_px,
            "pixel_size_angstrom": r.pixel_size_angstrom,
            f"fsc_0.5_crossing_{unit}": finite(self.crossing(0.5)),
            f"fsc_0.143_crossing_{unit}": finite(self.crossing(0.143)),
            "shells_cycles_per_box": r.shells.tolist(),
            "frequency_per_px": r.frequency_per_px.tolist(),
            "fsc": r.fsc.tolist(),
        }

    def summary_line(self) -> str:
        """One line for the log, e.g. ``convergence check (NOT a resolution): ...``."""
        x = self.crossing(0.5)
        unit = "Å" if self.unit == "angstrom" else "px"
        where = f"{x:.2f} {unit}" if math.isfinite(x) else "no shell"
        return (f"convergence check (NOT a resolution): the final map and the trained volume "
                f"agree to {where} (their FSC 0.5); both come from the same particles and "
                f"poses, so this says the run has settled, not how good the map is; for a "
                f"resolution run `cryospin reconstruct --halves`")


def convergence_check(
    final_map: Tensor | np.ndarray,
    trained_map: Tensor | np.ndarray,
    *,
    pixel_size_angstrom: float | None = None,
) -> ConvergenceCheck:
    """Unmasked FSC between ``final_map`` and ``trained_map``, `(L, L, L)` each (float64).

    Raises
    ------
    ValueError
        The maps differ in shape or are not cubic.
    """
    a, b = _float64(final_map), _float64(trained_map)
    return ConvergenceCheck(fsc(a, b, pixel_size_angstrom=pixel_size_angstrom))


def _float64(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(torch.float64)
    return torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: read-only maps are fine


def write_convergence_json(path: str | Path, check: ConvergenceCheck, **extra: object) -> None:
    """Write :meth:`ConvergenceCheck.to_dict` (plus ``extra`` keys, e.g. the map names)
    atomically."""
    data = check.to_dict()
    data.update(extra)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def record_convergence_check(
    path: str | Path,
    final_map: Tensor | np.ndarray,
    trained_map: Tensor | np.ndarray,
    *,
    pixel_size_angstrom: float | None = None,
    final_name: str = MAP,
    trained_name: str = MAP_DECODER,
) -> ConvergenceCheck:
    """:func:`convergence_check`, written to ``path`` and logged in one line (INFO)."""
    check = convergence_check(final_map, trained_map, pixel_size_angstrom=pixel_size_angstrom)
    write_convergence_json(path, check, maps=[final_name, trained_name])
    log.info("%s", check.summary_line())
    return check
