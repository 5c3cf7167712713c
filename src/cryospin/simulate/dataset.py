"""Simulate a particle dataset with known ground truth: the library behind ``cryospin simulate``.

Image formation (conventions: ``docs/conventions.md``):

1. rotations drawn uniformly (Haar) on SO(3); clean projections by :mod:`.project` (analytic for
   atoms, real-space ray sums for maps -- never the reconstruction's slicer);
2. centred FFT, multiplication by the CTF (RELION convention, positive at low frequency:
   bright particles), translation by ``shift_px`` (``image(r) = P(r − t)``) with
   :func:`~cryospin.forward.shifts.phase_shift_fourier`, real part of the inverse FFT;
3. white Gaussian noise of standard deviation ``σ = sqrt(var_clean / SNR)`` where ``var_clean``
   is the variance of all pixels of the whole clean (CTF-modulated, shifted) stack
   (section "Simulator SNR").

Random draws, in this order from ``torch.Generator().manual_seed(seed)``: rotations `(N, 4)`
Gaussian quaternions, shifts `(N, 2)`, mean defocus `(N,)`, astigmatism `(N,)`, astigmatism
angle `(N,)`; the noise comes from a second generator derived from the seed, so the clean images
do not depend on the SNR and the same seed gives byte-identical outputs.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import fft2_centered, ifft2_centered
from cryospin.forward.shifts import phase_shift_fourier
from cryospin.io.mrc import StackWriter, read_map, write_map
from cryospin.io.particles import ParticleSet
from cryospin.io.pkl import write_cryodrgn_poses
from cryospin.io.star_write import write_relion_star
from cryospin.rotations import random_rotations
from cryospin.simulate.density import (
    DEFAULT_ATOM_SIGMA_ANGSTROM,
    atom_positions_px,
    atoms_to_volume,
    gaussian_sigma_angstrom,
    read_atomic_model,
    resample_map,
    symmetric_assembly,
)
from cryospin.simulate.project import project_atoms, project_map, upsample_map_for_projection

__all__ = [
    "SimulatedDataset",
    "simulate_dataset",
    "resolve_structure",
    "draw_ctf_params",
    "bundled_structures",
    "MAP_SUFFIXES",
]

log = logging.getLogger(__name__)

#: file suffixes read as density maps; everything else is read as an atomic model
MAP_SUFFIXES = (".mrc", ".map", ".ccp4")

_BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class SimulatedDataset:
    """What :func:`simulate_dataset` wrote, with the ground truth.

    Attributes
    ----------
    particles : ParticleSet
        The written particles with their **true** rotations, shifts and CTF (as in the star).
    volume : `(L, L, L)` float32
        Ground-truth map ``[z, y, x]`` (as in ``gt.mrc``).
    box_px, pixel_size_angstrom : int, float
    snr : float
        Requested SNR (``inf`` for no noise).
    clean_variance : float
        Variance over all pixels of the clean stack.
    noise_sigma : float
        Standard deviation of the added noise (0 without noise).
    seed : int
    paths : dict[str, Path]
        ``gt_map``, ``particles_mrcs``, ``particles_star``, ``gt_poses_pkl``, ``summary_json``
        (and ``clean_mrcs`` when written).
    """

    particles: ParticleSet
    volume: Tensor
    box_px: int
    pixel_size_angstrom: float
    snr: float
    clean_variance: float
    noise_sigma: float
    seed: int
    paths: dict[str, Path] = field(default_factory=dict)


def bundled_structures() -> dict[str, Path]:
    """Structures shipped with cryospin, ``name -> path`` (``bundled:NAME`` on the command line)."""
    data = importlib.resources.files("cryospin") / "data"
    out: dict[str, Path] = {}
    if data.is_dir():
        for entry in data.iterdir():
            name = entry.name
            for suffix in (".pdb.gz", ".cif.gz", ".pdb", ".cif"):
                if name.endswith(suffix):
                    out[name[: -len(suffix)]] = Path(str(entry))
    return out


def resolve_structure(spec: str | Path) -> Path:
    """A path, or ``bundled:NAME`` for a structure shipped with cryospin (e.g. ``bundled:6vyb``).

    Raises
    ------
    InputError
        Unknown bundled name or missing file.
    """
    text = str(spec)
    if text.startswith(_BUNDLED_PREFIX):
        name = text[len(_BUNDLED_PREFIX):].lower()
        available = bundled_structures()
        if name not in available:
            raise InputError(f"no bundled structure {name!r} (available: "
                             f"{', '.join(sorted(available)) or 'none'})")
        return available[name]
    path = Path(text)
    if not path.is_file():
        raise InputError("structure file not found", path)
    return path


def draw_ctf_params(
    n: int,
    generator: torch.Generator,
    *,
    defocus_min_um: float = 1.0,
    defocus_max_um: float = 2.5,
    astigmatism_angstrom: float = 200.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
) -> CTFParams:
    """Random CTF parameters, float64 `(n,)` fields.

    Mean defocus ``d ~ U[min, max]`` (µm → Å), astigmatism ``a = dfU − dfV ~ U[0, max]`` (Å),
    ``dfU = d + a/2``, ``dfV = d − a/2``, angle ``~ U[0, 180)`` degrees; no phase shift or
    B-factor. Draws ``3n`` uniforms from ``generator`` in that order.
    """
    if not 0 < defocus_min_um <= defocus_max_um:
        raise InputError(f"need 0 < defocus min ({defocus_min_um}) <= max ({defocus_max_um}) µm")
    if astigmatism_angstrom < 0:
        raise InputError(f"astigmatism must be >= 0 Å, got {astigmatism_angstrom}")
    u = torch.rand(3, n, generator=generator, dtype=torch.float64)
    mean = 1e4 * (defocus_min_um + (defocus_max_um - defocus_min_um) * u[0])
    astig = astigmatism_angstrom * u[1]
    full = torch.ones(n, dtype=torch.float64)
    return CTFParams(
        defocus_u_angstrom=mean + astig / 2,
        defocus_v_angstrom=mean - astig / 2,
        defocus_angle_deg=180.0 * u[2],
        voltage_kv=voltage_kv * full,
        cs_mm=cs_mm * full,
        amplitude_contrast=amplitude_contrast * full,
        phase_shift_deg=0.0 * full,
        bfactor_a2=0.0 * full,
    )


def _noise_seed(seed: int) -> int:
    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Projector:
    """Clean projections of either atoms or a map, in a fixed dtype."""

    def __init__(self, structure: Path, box_px: int, pixel_size_angstrom: float,
                 resolution_angstrom: float, dtype: torch.dtype, select: str | None = None,
                 symmetry: str | None = None) -> None:
        self.box_px = box_px
        self.dtype = dtype
        name = structure.name.lower()
        self.is_map = name.endswith(MAP_SUFFIXES)
        if self.is_map and (select is not None or symmetry is not None):
            raise InputError("--select and --symmetry need an atomic model, not a map", structure)
        if self.is_map:
            arr, voxel = read_map(structure)
            vol64 = resample_map(torch.from_numpy(np.array(arr, dtype=np.float64)), voxel, box_px,
                                 pixel_size_angstrom, source=str(structure))
            self.volume = vol64.to(dtype)
            self.upsampled = upsample_map_for_projection(self.volume)
            self.description = f"map {structure.name} ({arr.shape[0]}³ × {voxel:g} Å)"
        else:
            model = read_atomic_model(structure, select=select)
            if symmetry is not None:
                model = symmetric_assembly(model, symmetry)
            self.sigma_px = gaussian_sigma_angstrom(resolution_angstrom) / pixel_size_angstrom
            pos = atom_positions_px(model, pixel_size_angstrom)
            radius = float(pos.norm(dim=1).max()) + 3 * self.sigma_px
            if radius > box_px / 2:
                log.warning("%s: atoms reach %.1f px from the centre (incl. 3σ) but the box "
                            "half-width is %d px: some density is cut off", structure, radius,
                            box_px // 2)
            self.positions = pos.to(dtype)
            self.weights = model.weights.to(dtype)
            self.volume = atoms_to_volume(pos, model.weights, box_px, self.sigma_px).to(dtype)
            self.description = (f"{len(model)} atoms of {structure.name}, Gaussian σ "
                                f"{self.sigma_px * pixel_size_angstrom:.2f} Å")

    def __call__(self, rotations: Tensor) -> Tensor:
        R = rotations.to(self.dtype)
        if self.is_map:
            return project_map(self.upsampled, R, self.box_px)
        return project_atoms(self.positions, self.weights, R, self.box_px, self.sigma_px)


def simulate_dataset(
    structure: str | Path,
    outdir: str | Path,
    *,
    n_particles: int,
    box_px: int,
    pixel_size_angstrom: float,
    snr: float = 0.1,
    seed: int = 0,
    shift_std_px: float = 0.0,
    apply_ctf: bool = True,
    defocus_min_um: float = 1.0,
    defocus_max_um: float = 2.5,
    astigmatism_angstrom: float = 200.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    resolution_angstrom: float | None = None,
    chunk_size: int = 256,
    write_clean: bool = False,
    select: str | None = None,
    symmetry: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> SimulatedDataset:
    """Simulate ``n_particles`` images of ``structure`` and write them with the ground truth.

    Parameters
    ----------
    structure : path to a PDB/mmCIF (``.gz`` ok) or MRC map, or ``bundled:NAME``.
    outdir : output folder (created); receives ``gt.mrc``, ``particles.mrcs``,
        ``particles.star`` (RELION 3.1, true poses/shifts/CTF), ``gt_poses.pkl`` (cryoDRGN),
        ``simulation.json`` (parameters and noise level) and, with ``write_clean``,
        ``particles_clean.mrcs``.
    n_particles, box_px, pixel_size_angstrom : dataset size, box ``L`` (px), Å/px.
    snr : ``var_clean / σ_noise²``; ``inf`` for no noise.
    seed : seeds every random draw (see the module docstring).
    shift_std_px : standard deviation of the Gaussian shifts ``(tx, ty)``, px.
    apply_ctf : multiply by the CTF; without it the star has no CTF columns.
    defocus_min_um, defocus_max_um, astigmatism_angstrom, voltage_kv, cs_mm,
    amplitude_contrast : CTF distribution (:func:`draw_ctf_params`).
    resolution_angstrom : band limit of atomic models (default twice the pixel size; see
        :mod:`cryospin.simulate.density`). Ignored for maps.
    chunk_size : images per block.
    select : atomic models only: keep chain ``"A"`` or residues ``"A:330-530"``.
    symmetry : atomic models only: build a ``Cn``/``Dn`` assembly of the (selected) atoms
        (:func:`cryospin.simulate.density.symmetric_assembly`), e.g. ``"D7"``.
    dtype : computation dtype of the projections (outputs are float32 files).
    progress : tqdm progress bars on stderr.

    Returns
    -------
    SimulatedDataset
    """
    n, L = int(n_particles), int(box_px)
    resolution = 2.0 * pixel_size_angstrom if resolution_angstrom is None else resolution_angstrom
    _check_settings(n, L, pixel_size_angstrom, snr, shift_std_px, resolution)
    path = resolve_structure(structure)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)

    projector = _Projector(path, L, float(pixel_size_angstrom), float(resolution), dtype,
                           select=select, symmetry=symmetry)
    g = torch.Generator().manual_seed(int(seed))
    rotations = random_rotations(n, generator=g)  # (N, 3, 3) float64
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64) * float(shift_std_px)
    ctf_settings = {
        "defocus_min_um": defocus_min_um, "defocus_max_um": defocus_max_um,
        "astigmatism_angstrom": astigmatism_angstrom, "voltage_kv": voltage_kv,
        "cs_mm": cs_mm, "amplitude_contrast": amplitude_contrast,
    }
    ctf = draw_ctf_params(n, g, **ctf_settings)

    paths = _output_paths(out, write_clean)
    chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]

    with tempfile.TemporaryFile(dir=out, prefix=".clean.") as fh:
        clean = np.memmap(fh, dtype=np.float32, mode="w+", shape=(n, L, L))
        with tqdm(total=n, unit="img", desc="projecting", disable=not progress,
                  file=sys.stderr) as bar:
            clean_var = _project_clean(
                clean, chunks, lambda s, e: projector(rotations[s:e]),
                ctf=ctf if apply_ctf else None, shifts_px=shifts if shift_std_px > 0 else None,
                pixel_size_angstrom=pixel_size_angstrom, dtype=dtype, done=bar.update)
        sigma = 0.0 if math.isinf(snr) else math.sqrt(clean_var / snr)
        _write_noisy(clean, chunks, paths, sigma, torch.Generator().manual_seed(_noise_seed(seed)),
                     pixel_size_angstrom)
        del clean

    volume = projector.volume.to(torch.float32)
    write_map(paths["gt_map"], volume, pixel_size_angstrom)
    particles = _ground_truth(paths, L, float(pixel_size_angstrom), ctf if apply_ctf else None,
                              rotations, shifts)
    write_relion_star(paths["particles_star"], particles)
    write_cryodrgn_poses(paths["gt_poses_pkl"], rotations, shifts, L)
    summary = _summary(
        structure, path, projector, select=select, symmetry=symmetry, n=n, box_px=L,
        pixel_size_angstrom=float(pixel_size_angstrom), resolution_angstrom=float(resolution),
        snr=snr, clean_var=clean_var, sigma=sigma, seed=seed, shift_std_px=shift_std_px,
        ctf_settings=ctf_settings if apply_ctf else None, paths=paths)
    atomic_write_text(paths["summary_json"], json.dumps(summary, indent=2) + "\n")
    return SimulatedDataset(
        particles=particles, volume=volume, box_px=L,
        pixel_size_angstrom=float(pixel_size_angstrom), snr=float(snr),
        clean_variance=clean_var, noise_sigma=sigma, seed=int(seed), paths=paths,
    )


def _check_settings(n: int, box_px: int, pixel_size_angstrom: float, snr: float,
                    shift_std_px: float, resolution_angstrom: float) -> None:
    """InputError (naming the ``cryospin simulate`` flag) for a setting out of range."""
    if n < 1:
        raise InputError(f"--n-particles must be >= 1, got {n}")
    if box_px < 4:
        raise InputError(f"--box must be >= 4 px, got {box_px}")
    if not pixel_size_angstrom > 0:
        raise InputError(f"--pixel-size must be > 0 Å, got {pixel_size_angstrom}")
    if not snr > 0:
        raise InputError(f"--snr must be > 0 (inf for no noise), got {snr}")
    if shift_std_px < 0:
        raise InputError(f"--shift-std-px must be >= 0, got {shift_std_px}")
    if not resolution_angstrom > 0:
        raise InputError(f"--resolution-angstrom must be > 0, got {resolution_angstrom}")


def _project_clean(
    clean: np.ndarray,
    chunks: list[tuple[int, int]],
    project: Callable[[int, int], Tensor],
    *,
    ctf: CTFParams | None,
    shifts_px: Tensor | None,
    pixel_size_angstrom: float,
    dtype: torch.dtype,
    done: Callable[[int], object],
) -> float:
    """Fill ``clean`` `(N, L, L)` float32 with the clean images, block by block: the
    projections ``project(s, e)`` `(b, L, L)` (rows ``s:e``), times the CTF, shifted; returns
    the variance of all their pixels. ``done(b)`` after each block."""
    L = clean.shape[-1]
    total, total_sq = 0.0, 0.0
    for s, e in chunks:
        F = fft2_centered(project(s, e))  # (b, L, L) complex
        if ctf is not None:
            F = F * compute_ctf(ctf[s:e].to(dtype), L, pixel_size_angstrom)
        if shifts_px is not None:
            F = phase_shift_fourier(F, shifts_px[s:e].to(dtype))
        block = ifft2_centered(F).real.to(torch.float32).numpy()  # (b, L, L)
        clean[s:e] = block
        b64 = block.astype(np.float64)
        total += float(b64.sum())
        total_sq += float((b64 * b64).sum())
        done(e - s)
    count = clean.size
    return max(total_sq / count - (total / count) ** 2, 0.0)


def _write_noisy(clean: np.ndarray, chunks: list[tuple[int, int]], paths: dict[str, Path],
                 sigma: float, generator: torch.Generator, pixel_size_angstrom: float) -> None:
    """Write the clean images plus Gaussian noise of std ``sigma`` (drawn block by block from
    ``generator``) to ``paths["particles_mrcs"]``, and the clean ones to
    ``paths["clean_mrcs"]`` when that is given."""
    n, L = clean.shape[0], clean.shape[-1]
    with contextlib.ExitStack() as writers:
        noisy_w = writers.enter_context(
            StackWriter(paths["particles_mrcs"], n, L, pixel_size_angstrom))
        clean_w = (writers.enter_context(
            StackWriter(paths["clean_mrcs"], n, L, pixel_size_angstrom))
            if "clean_mrcs" in paths else None)
        for s, e in chunks:
            images = torch.from_numpy(np.array(clean[s:e]))  # (b, L, L) float32
            if clean_w is not None:
                clean_w.write(images)
            if sigma > 0:
                noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
                images = images + sigma * noise
            noisy_w.write(images)


def _output_paths(out: Path, write_clean: bool) -> dict[str, Path]:
    """The files :func:`simulate_dataset` writes in ``out`` (see there), by role."""
    paths = {
        "gt_map": out / "gt.mrc",
        "particles_mrcs": out / "particles.mrcs",
        "particles_star": out / "particles.star",
        "gt_poses_pkl": out / "gt_poses.pkl",
        "summary_json": out / "simulation.json",
    }
    if write_clean:
        paths["clean_mrcs"] = out / "particles_clean.mrcs"
    return paths


def _ground_truth(paths: dict[str, Path], box_px: int, pixel_size_angstrom: float,
                  ctf: CTFParams | None, rotations: Tensor, shifts_px: Tensor) -> ParticleSet:
    """The simulated particles with their true poses and CTF: one stack, one optics group,
    half sets 1, 2, 1, 2, ..."""
    n = int(rotations.shape[0])
    return ParticleSet(
        source=paths["particles_star"].resolve(),
        stack_paths=(paths["particles_mrcs"].resolve(),),
        stack_index=np.zeros(n, dtype=np.int64),
        image_index=np.arange(n, dtype=np.int64),
        box_px=box_px,
        pixel_size_angstrom=pixel_size_angstrom,
        ctf=ctf,
        rotations=rotations,
        shifts_px=shifts_px,
        optics_group=np.ones(n, dtype=np.int64),
        random_subset=(np.arange(n, dtype=np.int64) % 2) + 1,
    )


def _summary(
    structure: str | Path, path: Path, projector: _Projector, *, select: str | None,
    symmetry: str | None, n: int, box_px: int, pixel_size_angstrom: float,
    resolution_angstrom: float, snr: float, clean_var: float, sigma: float, seed: int,
    shift_std_px: float, ctf_settings: dict[str, float] | None, paths: dict[str, Path],
) -> dict[str, object]:
    """The ``simulation.json`` record: what was simulated, with which settings and noise."""
    return {
        "structure": str(structure),
        "structure_path": str(path),
        "density": projector.description,
        "select": select,
        "symmetry": None if symmetry is None else str(symmetry).upper(),
        "n_particles": n,
        "box_px": box_px,
        "pixel_size_angstrom": pixel_size_angstrom,
        "resolution_angstrom": None if projector.is_map else resolution_angstrom,
        "atom_sigma_angstrom": None if projector.is_map else DEFAULT_ATOM_SIGMA_ANGSTROM,
        "snr": None if math.isinf(snr) else float(snr),
        "snr_definition": "var(all pixels of the clean stack) / noise_sigma^2",
        "clean_variance": clean_var,
        "noise_sigma": sigma,
        "seed": int(seed),
        "shift_std_px": float(shift_std_px),
        "ctf": ctf_settings,
        "files": {k: v.name for k, v in paths.items()},
    }
