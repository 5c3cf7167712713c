"""How well can off-centre particles be centred before stage 1, and does it help the encoder?

Two measurements on a simulated set (``cryospin simulate ... --shift-std-px S``; its truth in
``particles.star`` and ``gt.mrc``), errors in pixels against the true shifts, raw and after
the best 3D offset of the map (an ab initio map's centre is arbitrary: a map moved by ``c``
explains the data with shifts ``t − (R c)_xy``; fitted by least squares with the true
rotations, either handedness):

1. **Reference-free centring**: every image phase-flipped by the sign of its CTF and low-passed
   (Gaussian, ``--lowpass`` cycles/box), cross-correlated with the rotational average of the
   mean of all such images; the peak (within ``--max-shift`` px, parabolic sub-pixel) is the
   image's centre.
2. **Cross-correlation with the true map** (``--oracle-degrees``): each image against the
   projection of ``gt.mrc`` (times its CTF) at its true rotation turned by the given angle about
   a random axis, integer peak — the best a per-head shift search against the encoder's volume
   could do when the head's rotation is that far off.

``--write DIR`` writes a pre-centred copy of the whole set (images moved by the centring of 1.,
the truth's shifts moved with them; ``gt.mrc`` and ``simulation.json`` copied), on which
``cryospin reconstruct`` runs as on the original::

    python benchmarks/bench_centring.py --data ADK_OFF --images 2000 --oracle-degrees 0 15 30
    python benchmarks/bench_centring.py --data ADK_OFF --write ADK_CEN

Conventions (``docs/conventions.md``): images `(n, L, L)` indexed ``[y, x]``, shifts ``(tx,
ty)`` px with ``image(r) = P(r − t)``.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin.evaluate.pose_error import pose_error
from cryospin.forward.ctf import compute_ctf
from cryospin.forward.hartley import fft2_centered, hartley3, ifft2_centered, ihartley2
from cryospin.forward.lattice import frequency_grid_2d
from cryospin.forward.model import render
from cryospin.forward.shifts import phase_shift_fourier
from cryospin.io.mrc import read_map, write_stack
from cryospin.io.particle_set import ParticleSet
from cryospin.io.particles import load_particles, write_cryodrgn_poses, write_particles_star
from cryospin.preprocess import radius_grid_px
from cryospin.rotations import so3_exp
from cryospin.train.data import radial_profile

CHUNK = 1000


def filtered_transforms(ps: ParticleSet, idx: Tensor, lowpass: float) -> Tensor:
    """Centred FFTs `(n, L, L)` of particles ``idx``, phase-flipped and low-passed, DC zeroed."""
    L = ps.box_px
    F = fft2_centered(ps.images(idx).double())
    if ps.ctf is not None:
        F = F * torch.sign(compute_ctf(ps.ctf[idx], L, ps.pixel_size_angstrom).double())
    F = F * torch.exp(-radius_grid_px(L).square() / (2 * lowpass**2))  # |k| on the same grid
    F[:, L // 2, L // 2] = 0
    return F


def rotational_average(image: Tensor) -> Tensor:
    """The image `(L, L)` averaged over rings of integer radius about pixel ``L//2``."""
    L = image.shape[-1]
    offsets = frequency_grid_2d(L, dtype=torch.float64).reshape(L * L, 2)  # pixel offsets
    ring = offsets.norm(dim=-1).round().long()
    profile = radial_profile(image.reshape(1, L * L), offsets, int(ring.max()) + 1)
    return profile[ring].reshape(L, L).to(image.dtype)


def peak_shifts(F: Tensor, reference: Tensor, max_shift_px: float, subpixel: bool) -> Tensor:
    """Shifts `(n, 2)` px of images ``F`` `(n, L, L)` (centred FFTs) against ``reference``
    (centred FFT, `(L, L)` or `(n, L, L)`): the cross-correlation's peak within the radius."""
    L = F.shape[-1]
    rad = radius_grid_px(L)
    cc = ifft2_centered(F * reference.conj()).real.masked_fill(rad > max_shift_px, -math.inf)
    n, rows = cc.shape[0], torch.arange(cc.shape[0])
    flat = cc.flatten(1).argmax(1)
    iy, ix = flat // L, flat % L

    def refine(line: Tensor, i: Tensor) -> Tensor:  # parabola through the peak and neighbours
        a, m, b = line[rows, (i - 1) % L], line[rows, i], line[rows, (i + 1) % L]
        curvature = (a - 2 * m + b).clamp(max=-1e-12)
        return i.double() + ((a - b) / (2 * curvature)).clamp(-0.5, 0.5).nan_to_num(0.0)

    if not subpixel:
        return torch.stack([ix, iy], 1).double() - L // 2
    sx = refine(cc[rows, iy], ix) - L // 2
    sy = refine(cc[rows, :, ix], iy) - L // 2
    return torch.stack([sx, sy], 1).reshape(n, 2)


def centre_particles(ps: ParticleSet, lowpass: float, max_shift_px: float) -> Tensor:
    """Reference-free centres `(N, 2)` px of all particles (see the module docstring, 1.)."""
    chunks = torch.arange(len(ps)).split(CHUNK)
    mean = sum(ifft2_centered(filtered_transforms(ps, c, lowpass)).real.sum(0) for c in chunks)
    reference = fft2_centered(rotational_average(torch.as_tensor(mean)))
    return torch.cat([peak_shifts(filtered_transforms(ps, c, lowpass), reference, max_shift_px,
                                  subpixel=True) for c in chunks])


def _about_random_axes(n: int, degrees: float, seed: int) -> Tensor:
    """`(n, 3, 3)` rotations by ``degrees`` about random axes."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return so3_exp(axis / axis.norm(dim=1, keepdim=True) * math.radians(degrees))


def oracle_shifts(ps: ParticleSet, gt_map: Path, idx: Tensor, degrees: float,
                  max_shift_px: float) -> Tensor:
    """Shifts `(n, 2)` px of particles ``idx`` from the cross-correlation with the true map
    projected at their true rotations turned by ``degrees`` (see the module docstring, 2.)."""
    assert ps.rotations is not None
    density, _ = read_map(gt_map)
    volume = hartley3(torch.tensor(np.array(density), dtype=torch.float64))
    turn = _about_random_axes(len(idx), degrees, seed=0)
    ctf = None if ps.ctf is None else compute_ctf(ps.ctf[idx], ps.box_px,
                                                 ps.pixel_size_angstrom).double()
    projections = ihartley2(render(volume, turn @ ps.rotations[idx].double(), None, ctf))
    return peak_shifts(fft2_centered(ps.images(idx).double()), fft2_centered(projections),
                       max_shift_px, subpixel=False)


def shift_errors(estimate: Tensor, ps: ParticleSet, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Errors `(n,)` px of ``estimate`` against the truth, raw and after the best 3D offset
    (``cryospin pose-error``'s fit, with the true rotations)."""
    assert ps.shifts_px is not None and ps.rotations is not None
    R = ps.rotations[idx].double()
    result = pose_error(R, R, estimate, ps.shifts_px[idx].double(), allow_flip=False)
    assert result.shift_error_px is not None and result.shift_error_centered_px is not None
    return (torch.from_numpy(result.shift_error_px),
            torch.from_numpy(result.shift_error_centered_px))


def write_centred(ps: ParticleSet, data: Path, out: Path, centres: Tensor) -> None:
    """The pre-centred copy of ``data`` in ``out`` (see the module docstring)."""
    assert ps.shifts_px is not None and ps.rotations is not None
    out.mkdir(parents=True, exist_ok=False)
    L = ps.box_px
    stack = np.empty((len(ps), L, L), dtype=np.float32)
    for c in torch.arange(len(ps)).split(CHUNK):  # image(r) -> image(r + t): a shift by −t
        moved = phase_shift_fourier(fft2_centered(ps.images(c).double()), -centres[c])
        stack[c.numpy()] = ifft2_centered(moved).real
    write_stack(out / "particles.mrcs", stack, ps.pixel_size_angstrom)
    shifts = ps.shifts_px.double() - centres  # the truth moved with the images
    write_particles_star(out / "particles.star", ps.with_poses(ps.rotations, shifts))
    write_cryodrgn_poses(out / "gt_poses.pkl", ps.rotations, shifts, L)
    for name in ("gt.mrc", "simulation.json"):
        shutil.copy(data / name, out / name)


def _row(label: str, raw: Tensor, offset: Tensor) -> str:
    return (f"| {label} | {raw.median():.2f} | {offset.median():.2f} | "
            f"{offset.square().mean().sqrt():.2f} | {100 * (offset <= 1).double().mean():.0f} % |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="simulated set folder")
    p.add_argument("--images", type=int, default=2000, help="particles scored")
    p.add_argument("--lowpass", type=float, default=4.0, help="Gaussian low-pass, cycles/box")
    p.add_argument("--max-shift", type=float, default=16.0, help="largest shift searched, px")
    p.add_argument("--oracle-degrees", type=float, nargs="*", default=[])
    p.add_argument("--write", type=Path, help="write the pre-centred copy here")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ps = load_particles(a.data / "particles.star")
    assert ps.shifts_px is not None, "needs a simulated set with true shifts"
    idx = torch.arange(min(a.images, len(ps)))
    centres = centre_particles(ps, a.lowpass, a.max_shift)
    print(f"{a.data}: {len(idx)} particles scored, box {ps.box_px} px\n")
    print("| shifts | median error (px) | after the 3D offset: median | rms | within 1 px |")
    print("|---|---:|---:|---:|---:|")
    print(_row("none (the data's)", *shift_errors(torch.zeros(len(idx), 2), ps, idx)))
    print(_row(f"reference-free centring ({a.lowpass:g} cycles/box)",
               *shift_errors(centres[idx], ps, idx)))
    for deg in a.oracle_degrees:
        print(_row(f"CC with the true map, rotation {deg:g}° off",
                   *shift_errors(oracle_shifts(ps, a.data / "gt.mrc", idx, deg, a.max_shift),
                                 ps, idx)))
    if a.write:
        write_centred(ps, a.data, a.write, centres)
        print(f"\npre-centred copy written to {a.write}")


if __name__ == "__main__":
    main()
