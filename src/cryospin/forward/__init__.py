"""The image-formation model as pure, differentiable tensor functions.

Submodules: :mod:`~cryospin.forward.lattice` (frequency grids, loss disc),
:mod:`~cryospin.forward.hartley` (centred FFT and Hartley transforms),
:mod:`~cryospin.forward.slicing` (central slices and their adjoint),
:mod:`~cryospin.forward.symmetrize` (the group average of a volume grid),
:mod:`~cryospin.forward.rigid` (rigid-body resampling of a map),
:mod:`~cryospin.forward.ctf`, :mod:`~cryospin.forward.shifts` and
:mod:`~cryospin.forward.model` (``render``). Conventions: ``docs/conventions.md``.
"""

from cryospin.forward.ctf import CTFParams, compute_ctf, ctf_at, electron_wavelength_angstrom
from cryospin.forward.hartley import (
    fft2_centered,
    fft3_centered,
    fourier_from_hartley,
    hartley2,
    hartley3,
    hartley_from_fourier,
    ifft2_centered,
    ifft3_centered,
    ihartley2,
    ihartley3,
    negate_frequency,
)
from cryospin.forward.lattice import (
    disc_frequencies,
    disc_indices,
    disc_mask,
    frequency_grid_2d,
    frequency_grid_3d,
    negation_permutation,
)
from cryospin.forward.model import render, render_real
from cryospin.forward.shifts import phase_shift_fourier, shift_hartley, shift_hartley_grid
from cryospin.forward.slicing import extract_central_slices, insert_central_slices
from cryospin.forward.symmetrize import symmetrize_volume

__all__ = [
    "CTFParams",
    "compute_ctf",
    "ctf_at",
    "electron_wavelength_angstrom",
    "fft2_centered",
    "ifft2_centered",
    "fft3_centered",
    "ifft3_centered",
    "hartley2",
    "ihartley2",
    "hartley3",
    "ihartley3",
    "negate_frequency",
    "fourier_from_hartley",
    "hartley_from_fourier",
    "frequency_grid_2d",
    "frequency_grid_3d",
    "disc_mask",
    "disc_indices",
    "disc_frequencies",
    "negation_permutation",
    "extract_central_slices",
    "insert_central_slices",
    "symmetrize_volume",
    "shift_hartley",
    "shift_hartley_grid",
    "phase_shift_fourier",
    "render",
    "render_real",
]
