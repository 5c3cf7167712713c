"""Simulated cryo-EM datasets with known ground truth (``cryospin simulate``).

:mod:`~cryospin.simulate.density` builds the ground-truth map (Gaussian atoms or a resampled
MRC map), :mod:`~cryospin.simulate.project` computes clean projections without the
reconstruction's slicer, and :mod:`~cryospin.simulate.dataset` adds CTF, shifts and noise and
writes stack, star, map and poses. Conventions: ``docs/conventions.md`` ("Simulator SNR").
"""

from cryospin.simulate.dataset import (
    MAP_SUFFIXES,
    SimulatedDataset,
    bundled_structures,
    draw_ctf_params,
    resolve_structure,
    simulate_dataset,
)
from cryospin.simulate.density import (
    AtomicModel,
    atom_positions_px,
    atoms_to_volume,
    gaussian_profiles,
    gaussian_sigma_angstrom,
    read_atomic_model,
    resample_map,
)
from cryospin.simulate.project import project_atoms, project_map, upsample_map_for_projection

__all__ = [
    "SimulatedDataset",
    "simulate_dataset",
    "resolve_structure",
    "bundled_structures",
    "draw_ctf_params",
    "MAP_SUFFIXES",
    "AtomicModel",
    "read_atomic_model",
    "gaussian_sigma_angstrom",
    "atom_positions_px",
    "gaussian_profiles",
    "atoms_to_volume",
    "resample_map",
    "project_atoms",
    "project_map",
    "upsample_map_for_projection",
]
