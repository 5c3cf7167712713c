"""The tests' synthetic particle data: Gaussian blobs, random poses, CTF, white noise.

One generator for the data sets that the trainer, CLI and streaming tests build: an asymmetric
density of Gaussian blobs, uniformly random rotations, optional shifts, a CTF per particle and
white noise, rendered with cryospin's own forward model -- an "inverse crime", acceptable in
tests of workflows, files and resumption, not of accuracy.

Every random number comes from one ``torch.Generator`` seeded with ``seed``: first the blob
centres, then rotations, shifts and defocus in ``draw_order`` (each test file keeps the order it
was written with, so its data -- and any number measured on them -- stay bit for bit the same),
then the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import hartley3, ihartley2
from cryospin.forward.model import render
from cryospin.io.mrc import write_map, write_stack
from cryospin.io.particle_set import ParticleSet
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.rotations import random_rotations

F64 = torch.float64


def blob_volume(
    box_px: int, generator: torch.Generator, *, n_blobs: int = 6,
    spread_px: float | None = None, variance_px2: float | None = None,
) -> Tensor:
    """A density of ``n_blobs`` isotropic Gaussians, `(L, L, L)` float64, indexed ``[z, y, x]``
    with the centre at ``L // 2``.

    Centres are uniform in a cube of side ``spread_px`` around the centre (default ``0.45 L``);
    every blob has variance ``variance_px2`` (default ``(L / 12)**2``). Draws the ``(n_blobs, 3)``
    centres from ``generator``.
    """
    k = torch.arange(box_px, dtype=F64) - box_px // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    offsets = torch.rand(n_blobs, 3, generator=generator, dtype=F64) - 0.5  # (n_blobs, 3) xyz
    centres = offsets * box_px * 0.45 if spread_px is None else offsets * spread_px
    two_variance = 2 * (box_px / 12) ** 2 if variance_px2 is None else 2 * variance_px2
    vol = torch.zeros(box_px, box_px, box_px, dtype=F64)
    for cx, cy, cz in centres.tolist():
        vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / two_variance)
    return vol


def dft_radius(box_px: int) -> Tensor:
    """``|k|`` `(L, L)` float64 (cycles per box) of the unshifted 2D DFT grid."""
    k = torch.fft.fftfreq(box_px, d=1.0 / box_px, dtype=F64)
    return torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)


def coloured_noise(n: int, per_pixel: Tensor, generator: torch.Generator) -> Tensor:
    """Stationary Gaussian noise `(n, L, L)` float64 whose power spectrum on the unshifted DFT
    grid is ``per_pixel`` `(L, L)` (``Σ_d C(d) e^{-ikd}``; 1 everywhere: unit white noise;
    its Hartley coefficients' variance is ``L² · per_pixel``): white noise filtered by
    ``sqrt(per_pixel)`` (even in ``k``, so the result is real)."""
    L = int(per_pixel.shape[-1])
    white = torch.randn(n, L, L, generator=generator, dtype=F64)
    return torch.fft.ifft2(torch.fft.fft2(white) * per_pixel.to(F64).sqrt()).real


def ctf_params(defocus_angstrom: Tensor) -> CTFParams:
    """Non-astigmatic CTF parameters `(n,)` for the defocus values given: 300 kV, Cs 2.7 mm,
    amplitude contrast 0.1, no phase shift, no B-factor."""
    n, f64 = defocus_angstrom.shape[0], {"dtype": F64}
    return CTFParams(
        defocus_u_angstrom=defocus_angstrom, defocus_v_angstrom=defocus_angstrom.clone(),
        defocus_angle_deg=torch.zeros(n, **f64), voltage_kv=torch.full((n,), 300.0, **f64),
        cs_mm=torch.full((n,), 2.7, **f64), amplitude_contrast=torch.full((n,), 0.1, **f64),
        phase_shift_deg=torch.zeros(n, **f64), bfactor_a2=torch.zeros(n, **f64),
    )


def random_ctf_params(n: int, generator: torch.Generator) -> CTFParams:
    """Astigmatic CTF parameters `(n,)` float64 drawn from ``generator`` (defocus 8,000-16,000
    Å, 500 Å astigmatism, random angle): 300 kV, Cs 2.7 mm, amplitude contrast 0.1."""
    full = lambda v: torch.full((n,), v, dtype=F64)  # noqa: E731
    u = torch.rand(n, generator=generator, dtype=F64)
    return CTFParams(
        defocus_u_angstrom=8000 + 8000 * u, defocus_v_angstrom=7500 + 8000 * u,
        defocus_angle_deg=360 * torch.rand(n, generator=generator, dtype=F64),
        voltage_kv=full(300.0), cs_mm=full(2.7), amplitude_contrast=full(0.1),
        phase_shift_deg=full(0.0), bfactor_a2=full(0.0),
    )


@dataclass(frozen=True)
class SyntheticDataset:
    """What ``make_dataset`` wrote to ``folder`` and the truth behind it."""

    folder: Path  # holds particles.mrcs, ctf.pkl (cryoDRGN) and gt.mrc
    volume: Tensor  # (L, L, L) float64, the density of gt.mrc
    rotations: Tensor  # (n, 3, 3) float64, left-multiply xyz column vectors
    shifts_px: Tensor | None  # (n, 2) float64 xy, None where the images are not shifted
    ctf: CTFParams  # (n,)


def make_dataset(
    folder: Path, *, box_px: int, n: int, seed: int, snr: float = 1.0,
    pixel_size_angstrom: float = 4.0, max_shift_px: float | None = None,
    defocus: Literal["uniform", "linspace"] = "uniform",
    draw_order: Sequence[str] = ("rotations", "shifts", "defocus"),
    n_blobs: int = 6, spread_px: float | None = None, variance_px2: float | None = None,
) -> SyntheticDataset:
    """Simulate ``n`` particles of ``box_px`` px and write them to ``folder`` (created).

    Writes ``particles.mrcs`` (float32), ``ctf.pkl`` and ``gt.mrc`` at ``pixel_size_angstrom``.

    Parameters
    ----------
    snr:
        Signal-to-noise ratio: the noise's standard deviation is that of the clean images over
        ``sqrt(snr)``.
    max_shift_px:
        Shifts uniform in ``[-max_shift_px, max_shift_px]`` per axis (drawn even when 0, and
        rendered as zeros); ``None``: no shifts drawn nor rendered.
    defocus:
        ``"uniform"``: U(8000, 15000) Å drawn per particle; ``"linspace"``: evenly spaced over
        the same range, nothing drawn.
    draw_order:
        The order in which ``"rotations"``, ``"shifts"`` and ``"defocus"`` are drawn after the
        blob centres; the names not drawn (shifts when ``max_shift_px`` is None, defocus when
        ``"linspace"``) may be left out.
    n_blobs, spread_px, variance_px2:
        The density, see ``blob_volume``.
    """
    names = ("rotations", "shifts", "defocus")
    if not set(draw_order) <= set(names) or len(set(draw_order)) != len(draw_order):
        raise ValueError(f"draw_order {draw_order!r}: distinct names out of {names}")
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vol = blob_volume(box_px, g, n_blobs=n_blobs, spread_px=spread_px, variance_px2=variance_px2)
    drawn: dict[str, Tensor | None] = {"shifts": None}
    for name in draw_order:
        if name == "rotations":
            drawn[name] = random_rotations(n, generator=g)  # (n, 3, 3)
        elif name == "shifts" and max_shift_px is not None:
            drawn[name] = (torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1) * max_shift_px
        elif name == "defocus" and defocus == "uniform":
            drawn[name] = torch.empty(n, dtype=F64).uniform_(8000.0, 15000.0, generator=g)
    if "rotations" not in drawn:
        raise ValueError("draw_order must name rotations")
    if max_shift_px is not None and drawn["shifts"] is None:
        raise ValueError("draw_order must name shifts when max_shift_px is given")
    if defocus == "linspace":
        drawn["defocus"] = torch.linspace(8000.0, 15000.0, n, dtype=F64)
    elif "defocus" not in drawn:
        raise ValueError("draw_order must name defocus when it is drawn (uniform)")
    rotations, shifts, defocus_angstrom = drawn["rotations"], drawn["shifts"], drawn["defocus"]
    assert rotations is not None and defocus_angstrom is not None
    ctf = ctf_params(defocus_angstrom)
    c = compute_ctf(ctf, box_px, pixel_size_angstrom)  # (n, L, L)
    clean = ihartley2(render(hartley3(vol), rotations, shifts, c))  # (n, L, L)
    sigma = float(clean.std()) / math.sqrt(snr)
    images = clean + sigma * torch.randn(clean.shape, generator=g, dtype=F64)  # (n, L, L)
    write_stack(folder / "particles.mrcs", images, pixel_size_angstrom)
    write_cryodrgn_ctf(folder / "ctf.pkl", ctf, box_px, pixel_size_angstrom)
    write_map(folder / "gt.mrc", vol, pixel_size_angstrom)
    return SyntheticDataset(folder=folder, volume=vol, rotations=rotations, shifts_px=shifts,
                            ctf=ctf)


def synthetic_particles(folder: Path, **kwargs: object) -> ParticleSet:
    """``make_dataset(folder, **kwargs)`` loaded as the trainer reads it (the stack with its
    cryoDRGN ``ctf.pkl``)."""
    truth = make_dataset(folder, **kwargs)  # type: ignore[arg-type]
    return load_particles(truth.folder / "particles.mrcs", ctf_pkl=truth.folder / "ctf.pkl")
