"""``RUN_DIR/noise_spectrum.json``: the noise spectrum a run whitened its images with.

With ``data.whiten_noise`` (the ``default`` preset) the training measures the noise's power
per frequency shell on the images' background (:mod:`cryospin.noise_spectrum`) and weights
every frequency by its inverse. ``cryospin reconstruct`` records that spectrum at its start
(rank 0, atomically; a resumed run writes the same values again) so that the report can draw
it and outside tools can read it; a run that did not whiten writes nothing.

JSON layout (:func:`write_noise_spectrum`, read with :func:`read_noise_spectrum`):

==================================  ==========================================================
key                                 meaning
==================================  ==========================================================
``box_px``                          training box ``L`` (px)
``pixel_size_angstrom``             its pixel size (Å)
``noise_variance_hartley``          ``σ²``: the mean noise variance of one Hartley coefficient
                                    (the unit of ``N``, :mod:`cryospin.noise_spectrum`)
``loss_radius_cycles_per_box``      the training disc's radius: shells beyond it are unused
``shell_cycles_per_box``            `(L//2 + 1,)` shells ``s = round(|k|)``, 0 … ``L//2``
``frequency_per_angstrom``          `(L//2 + 1,)` ``s / (L · pixel size)``
``relative_power``                  `(L//2 + 1,)` ``N(s) / σ²``: 1 everywhere = white noise;
                                    each frequency's weight in the likelihood is the inverse
==================================  ==========================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.train.data import TrainingData

__all__ = ["NoiseSpectrumRecord", "noise_record", "write_noise_spectrum",
           "read_noise_spectrum"]


@dataclass(frozen=True)
class NoiseSpectrumRecord:
    """A run's measured noise spectrum, relative to its mean.

    Attributes
    ----------
    box_px : int
        Training box ``L`` (px).
    pixel_size_angstrom : float
        Its pixel size (Å).
    noise_variance_hartley : float
        ``σ²``, the reference variance of one Hartley coefficient.
    loss_radius_cycles_per_box : float
        Radius of the training disc (cycles per box).
    relative_power : `(L//2 + 1,)` float64
        ``N(s) / σ²`` for the shells ``s = 0 … L//2`` (cycles per box).
    """

    box_px: int
    pixel_size_angstrom: float
    noise_variance_hartley: float
    loss_radius_cycles_per_box: float
    relative_power: np.ndarray

    @property
    def shells(self) -> np.ndarray:
        """`(L//2 + 1,)` int64: the shells ``0 … L//2`` (cycles per box)."""
        return np.arange(self.relative_power.shape[0], dtype=np.int64)

    @property
    def frequency_per_angstrom(self) -> np.ndarray:
        """`(L//2 + 1,)` float64: each shell's spatial frequency (1/Å)."""
        return self.shells / (self.box_px * self.pixel_size_angstrom)

    def used_shells(self) -> np.ndarray:
        """`(S,)` bool: the shells from 1 to the training disc's radius (the ones that
        weigh in the likelihood, the DC term aside)."""
        s = self.shells
        return (s >= 1) & (s <= self.loss_radius_cycles_per_box + 0.5)


def noise_record(data: TrainingData) -> NoiseSpectrumRecord | None:
    """The record of ``data``'s whitening spectrum; None when the data are not whitened."""
    spectrum = data.noise_spectrum
    if spectrum is None:
        return None
    return NoiseSpectrumRecord(
        box_px=int(data.box_px), pixel_size_angstrom=float(data.pixel_size_angstrom),
        noise_variance_hartley=float(data.noise_variance),
        loss_radius_cycles_per_box=float(data.frequencies.double().norm(dim=-1).max()),
        relative_power=spectrum.detach().cpu().double().numpy() / float(data.noise_variance),
    )


def write_noise_spectrum(path: str | Path, record: NoiseSpectrumRecord) -> None:
    """Write ``record`` as JSON to ``path`` atomically (layout in the module docstring)."""
    payload = {
        "description": "background noise power per frequency shell relative to its mean "
                       "(measured on the images' corners); each frequency's weight in the "
                       "likelihood is the inverse",
        "box_px": record.box_px,
        "pixel_size_angstrom": record.pixel_size_angstrom,
        "noise_variance_hartley": record.noise_variance_hartley,
        "loss_radius_cycles_per_box": record.loss_radius_cycles_per_box,
        "shell_cycles_per_box": record.shells.tolist(),
        "frequency_per_angstrom": record.frequency_per_angstrom.tolist(),
        "relative_power": record.relative_power.tolist(),
    }
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def read_noise_spectrum(path: str | Path) -> NoiseSpectrumRecord:
    """Read :func:`write_noise_spectrum`'s file.

    Raises
    ------
    InputError
        The file is not JSON, lacks a key, or its numbers are not finite (the powers not
        ``>= 0``, the other numbers not ``> 0``) or do not fit its box.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        box = int(raw["box_px"])
        apix = float(raw["pixel_size_angstrom"])
        sigma2 = float(raw["noise_variance_hartley"])
        radius = float(raw["loss_radius_cycles_per_box"])
        power = np.asarray(raw["relative_power"], dtype=np.float64)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as exc:
        raise InputError(f"not a noise spectrum record ({type(exc).__name__}: {exc})",
                         path) from None
    if power.shape != (box // 2 + 1,):
        raise InputError(f"relative_power has {power.size} values, a {box} px box has "
                         f"{box // 2 + 1} shells", path)
    if not (apix > 0 and sigma2 > 0 and math.isfinite(apix) and math.isfinite(sigma2)
            and radius > 0 and np.all(np.isfinite(power)) and np.all(power >= 0)):
        raise InputError("a noise spectrum record needs finite numbers (powers >= 0, the "
                         "box's pixel size, σ² and the disc's radius > 0)", path)
    return NoiseSpectrumRecord(box, apix, sigma2, radius, power)
