"""Ground-truth densities: atoms as 3D Gaussians, or an MRC map resampled to the requested box.

Atomic model (see ``docs/conventions.md``, "Simulator SNR" and "Arrays and axes"):

- Atoms of the **first model**, hydrogens and waters removed. Each atom is an isotropic 3D
  Gaussian of integral ``weight = Z · occupancy`` (atomic number; the electron scattering
  potential at low resolution is roughly proportional to ``Z``).
- Width ``σ = sqrt(σ_atom² + σ_blur²)`` with ``σ_blur = resolution / 2`` (Å). Its transform
  ``exp(−2π² σ² s²)`` is below ``exp(−π²/2) ≈ 0.7 %`` of its DC value at ``s = 1/resolution``,
  so with the default resolution (twice the pixel size, σ ≈ 1 px) the sampled map is
  band-limited to the Nyquist frequency to that accuracy.
- Centring: the weighted centre of mass (``Σ w r / Σ w``) is placed at the box centre, voxel
  ``[L//2, L//2, L//2]``. Positions in pixels are ``(r − centre) / pixel_size``.
- Sampling: the value of voxel ``(x, y, z)`` (coordinates ``i − L//2``) is
  ``Σ_a w_a g(x − x_a) g(y − y_a) g(z − z_a)`` with the normalised 1D profile
  ``g(d) = exp(−d²/2σ²) / (√(2π) σ)`` (σ in pixels). Sums over the grid are then ``≈ Σ w``
  (for atoms inside the box) and the analytic projections of :mod:`.project` equal the sum of
  this volume along z up to the aliasing term ``2 exp(−2π²σ²)`` of the Poisson summation
  formula (~3e-9 relative for σ = 1 px).

Maps: :func:`resample_map` brings a map to the requested box and pixel size by Fourier
cropping/padding (:mod:`cryospin.forward.resample`) and a real-space centre crop/zero-pad.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.resample import fourier_crop_3d, fourier_pad_3d
from cryospin.point_group import parse_point_group
from cryospin.symmetry import point_group_rotations

__all__ = [
    "AtomicModel",
    "read_atomic_model",
    "parse_selection",
    "symmetric_assembly",
    "gaussian_sigma_angstrom",
    "atom_positions_px",
    "gaussian_profiles",
    "atoms_to_volume",
    "resample_map",
    "DEFAULT_ATOM_SIGMA_ANGSTROM",
]

log = logging.getLogger(__name__)

# profile values below this (relative to the peak) are exactly 0
_EXP_CUTOFF = math.exp(-40.0)

#: intrinsic width of an atom's Gaussian (Å) before the band-limiting blur
DEFAULT_ATOM_SIGMA_ANGSTROM = 0.5


@dataclass(frozen=True)
class AtomicModel:
    """Atoms of a structure.

    Attributes
    ----------
    coords_angstrom : `(A, 3)` float64
        ``(x, y, z)`` positions in the file's frame, Å.
    weights : `(A,)` float64
        ``atomic number × occupancy``.
    source : str
        Where it was read from.
    """

    coords_angstrom: Tensor
    weights: Tensor
    source: str

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def centre_of_mass_angstrom(self) -> Tensor:
        """Weighted centre ``Σ w r / Σ w``, `(3,)` Å."""
        w = self.weights
        return (self.coords_angstrom * w[:, None]).sum(0) / w.sum()


def parse_selection(spec: str) -> tuple[str, int | None, int | None]:
    """``"A:330-530"`` -> ``("A", 330, 530)``; ``"A"`` -> ``("A", None, None)``.

    Raises
    ------
    InputError
        Malformed selection.
    """
    text = str(spec).strip()
    chain, _, span = text.partition(":")
    if not chain or any(c.isspace() for c in chain):
        raise InputError(f"bad atom selection {spec!r}: expected CHAIN or CHAIN:FIRST-LAST")
    if not span:
        return chain, None, None
    first, sep, last = span.partition("-")
    try:
        lo, hi = int(first), int(last)
    except ValueError:
        raise InputError(f"bad atom selection {spec!r}: expected CHAIN:FIRST-LAST "
                         "(residue numbers)") from None
    if not sep or lo > hi:
        raise InputError(f"bad atom selection {spec!r}: expected CHAIN:FIRST-LAST, FIRST <= LAST")
    return chain, lo, hi


def read_atomic_model(path: str | Path, select: str | None = None) -> AtomicModel:
    """Read the first model of a PDB/mmCIF file (``.gz`` accepted) without hydrogens and waters.

    Parameters
    ----------
    path : path
    select : str, optional
        Keep only chain ``CHAIN`` or residues ``FIRST..LAST`` (sequence numbers, inclusive)
        of it: ``"A"`` or ``"A:330-530"``.

    Raises
    ------
    InputError
        Missing or unreadable file, or no atoms (or none selected).
    """
    chain_sel, lo, hi = parse_selection(select) if select is not None else (None, None, None)
    path = Path(path)
    if not path.is_file():
        raise InputError("structure file not found", path)
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read structure ({str(exc).splitlines()[0]})", path) from None
    if len(st) == 0:
        raise InputError("structure has no models", path)
    st.remove_hydrogens()
    st.remove_waters()
    xyz: list[tuple[float, float, float]] = []
    weights: list[float] = []
    for chain in st[0]:
        if chain_sel is not None and chain.name != chain_sel:
            continue
        for residue in chain:
            num = residue.seqid.num  # None: no residue number, so outside any range
            if lo is not None and hi is not None and (num is None or not lo <= num <= hi):
                continue
            for atom in residue:
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                weights.append(atom.element.atomic_number * atom.occ)
    coords = torch.tensor(np.asarray(xyz, dtype=np.float64).reshape(-1, 3))
    w = torch.tensor(np.asarray(weights, dtype=np.float64))
    if coords.shape[0] == 0 or float(w.sum()) <= 0:
        what = f"selected by {select!r}" if select is not None else "(non-hydrogen, non-water)"
        raise InputError(f"structure has no atoms {what}", path)
    if not torch.isfinite(coords).all():
        raise InputError("structure has non-finite atom coordinates", path)
    return AtomicModel(coords_angstrom=coords, weights=w, source=str(path))


def gaussian_sigma_angstrom(
    resolution_angstrom: float, atom_sigma_angstrom: float = DEFAULT_ATOM_SIGMA_ANGSTROM
) -> float:
    """``σ = sqrt(σ_atom² + (resolution/2)²)`` in Å (see the module docstring)."""
    if resolution_angstrom <= 0 or atom_sigma_angstrom < 0:
        raise ValueError("resolution must be > 0 and atom sigma >= 0")
    return math.sqrt(atom_sigma_angstrom**2 + (resolution_angstrom / 2) ** 2)


def atom_positions_px(
    model: AtomicModel,
    pixel_size_angstrom: float,
    *,
    centre_angstrom: Tensor | None = None,
) -> Tensor:
    """Atom positions relative to the box centre in pixels, `(A, 3)` ``(x, y, z)`` float64.

    ``centre_angstrom`` defaults to the weighted centre of mass.
    """
    centre = model.centre_of_mass_angstrom() if centre_angstrom is None else centre_angstrom
    return (model.coords_angstrom - centre.to(model.coords_angstrom)) / float(pixel_size_angstrom)


def gaussian_profiles(positions_px: Tensor, box_px: int, sigma_px: float) -> Tensor:
    """Normalised 1D Gaussian profiles of points on the centred pixel grid.

    Parameters
    ----------
    positions_px : `(..., A)`
        Coordinates along one axis, pixels relative to the centre (index ``L//2``).
    box_px : int
        ``L``.
    sigma_px : float
        Gaussian width, pixels.

    Returns
    -------
    `(..., A, L)`
        ``g(i − L//2 − p) = exp(−d²/2σ²)/(√(2π)σ)`` (exactly 0 where ``exp(−d²/2σ²) <
        exp(−40)``), dtype/device of ``positions_px``. Not differentiable (in-place ops).
    """
    L = int(box_px)
    grid = torch.arange(L, dtype=positions_px.dtype, device=positions_px.device) - (L // 2)
    d = positions_px[..., None] - grid  # (..., A, L)
    # in place on the fresh tensor (passes over a cache-sized block, no temporaries). Values
    # below exp(-40) ~ 4e-18 of the peak are set to exactly 0: subnormal floats (and products
    # of tiny values in the matmuls downstream) are ~100x slower on x86 CPUs.
    g = d.square_().mul_(-0.5 / sigma_px**2).clamp_(min=-80.0).exp_()
    g = torch.threshold_(g, _EXP_CUTOFF, 0.0)
    return g.mul_(1.0 / (math.sqrt(2 * math.pi) * sigma_px))


def atoms_to_volume(
    positions_px: Tensor,
    weights: Tensor,
    box_px: int,
    sigma_px: float,
    *,
    chunk_atoms: int = 512,
) -> Tensor:
    """Sample the sum of atomic Gaussians on the centred ``L³`` grid.

    Parameters
    ----------
    positions_px : `(A, 3)`
        ``(x, y, z)`` pixels relative to the box centre.
    weights : `(A,)`
        Integral of each Gaussian (in pixel units).
    box_px, sigma_px : int, float

    Returns
    -------
    `(L, L, L)` indexed ``[z, y, x]``, dtype/device of ``positions_px``.
    """
    L = int(box_px)
    w = weights.to(positions_px)
    vol = positions_px.new_zeros((L, L * L))
    for start in range(0, positions_px.shape[0], chunk_atoms):
        pos = positions_px[start : start + chunk_atoms]
        g = gaussian_profiles(pos.T, L, sigma_px)  # (3, a, L): x, y, z profiles
        gz = g[2] * w[start : start + chunk_atoms, None]  # (a, L)
        gyx = (g[1][:, :, None] * g[0][:, None, :]).reshape(-1, L * L)  # (a, L*L)
        vol = vol + gz.T @ gyx  # (L, L*L)
    return vol.reshape(L, L, L)


def _centre_crop_or_pad(volume: Tensor, box_px: int) -> Tensor:
    """Real-space crop/zero-pad of a cubic `(L, L, L)` volume keeping voxel ``L//2`` central."""
    L = int(volume.shape[-1])
    if L == box_px:
        return volume
    out = volume.new_zeros((box_px,) * 3)
    # overlap in coordinates c = i − L//2 (source) = j − box//2 (target)
    lo = max(-(L // 2), -(box_px // 2))
    hi = min(L - L // 2, box_px - box_px // 2)
    src = slice(lo + L // 2, hi + L // 2)
    dst = slice(lo + box_px // 2, hi + box_px // 2)
    out[dst, dst, dst] = volume[src, src, src]
    return out


def resample_map(
    volume: Tensor,
    voxel_size_angstrom: float,
    box_px: int,
    pixel_size_angstrom: float,
    *,
    source: str = "map",
    max_relative_mismatch: float = 0.01,
) -> Tensor:
    """Bring a map to ``box_px`` voxels of ``pixel_size_angstrom``.

    Non-cubic maps are first zero-padded to a cube (centred at ``[L//2]*3``). The pixel size is
    changed by Fourier cropping/padding from ``L`` to ``M = round(L · v / p)`` voxels (values
    kept; see :mod:`cryospin.forward.resample`), then the box is centre-cropped or zero-padded
    in real space to ``box_px``. The achieved voxel size ``v · L / M`` must be within
    ``max_relative_mismatch`` of the requested one (a warning is logged above 0.1 %).

    Parameters
    ----------
    volume : `(Z, Y, X)` real
    voxel_size_angstrom, pixel_size_angstrom : float
    box_px : int

    Returns
    -------
    `(box_px, box_px, box_px)` in the dtype of ``volume``.
    """
    if volume.ndim != 3:
        raise InputError(f"expected a 3D map, got shape {tuple(volume.shape)}", source)
    if voxel_size_angstrom <= 0:
        raise InputError("map has no voxel size in its header", source)
    if not torch.isfinite(volume).all():
        raise InputError("map contains NaN/Inf values", source)
    L = max(volume.shape)
    if len(set(volume.shape)) != 1:
        cube = volume.new_zeros((L, L, L))
        sl = tuple(slice(L // 2 - n // 2, L // 2 - n // 2 + n) for n in volume.shape)
        cube[sl] = volume
        volume = cube
    M = max(1, round(L * voxel_size_angstrom / pixel_size_angstrom))
    achieved = voxel_size_angstrom * L / M
    mismatch = abs(achieved - pixel_size_angstrom) / pixel_size_angstrom
    if mismatch > max_relative_mismatch:
        raise InputError(
            f"cannot resample {L} voxels of {voxel_size_angstrom:g} Å to {pixel_size_angstrom:g} Å "
            f"(nearest achievable {achieved:.4f} Å); choose a pixel size "
            f"{voxel_size_angstrom:g}·{L}/n", source,
        )
    if mismatch > 1e-3:
        log.warning("%s: resampled voxel size is %.4f Å, not the requested %.4f Å",
                    source, achieved, pixel_size_angstrom)
    if M < L:
        volume = fourier_crop_3d(volume, M)
    elif M > L:
        volume = fourier_pad_3d(volume, M)
    return _centre_crop_or_pad(volume, int(box_px))


def symmetric_assembly(model: AtomicModel, symmetry: str,
                       radius_angstrom: float | None = None) -> AtomicModel:
    """An assembly of copies of ``model`` with point group ``symmetry`` (Cn or Dn).

    The copy (the asymmetric unit) is centred on its centre of mass and moved to
    ``(radius, 0, height)``; the group's rotations (:func:`cryospin.symmetry.point_group_rotations`,
    symmetry axis ``z``, a two-fold along ``x`` for Dn) place the other copies. Default
    ``radius = R_g / sin(π/n)`` (neighbouring copies about two radii of gyration ``R_g`` apart)
    and ``height = R_g`` for Dn (two rings ``2 R_g`` apart), 0 for Cn. The result is
    symmetric about the origin: ``V(g r) = V(r)`` (it is re-centred on its centre of mass, which
    lies on the axis, by :func:`atom_positions_px`).
    """
    group = parse_point_group(symmetry)
    if group.kind not in ("C", "D"):
        raise InputError(f"a symmetric assembly is built for Cn and Dn only, not {symmetry!r}")
    kind, n = group.kind, group.n
    G = point_group_rotations(symmetry)  # (G, 3, 3)
    xyz = model.coords_angstrom - model.centre_of_mass_angstrom()  # (A, 3)
    w = model.weights
    rg = float(((xyz.square().sum(-1) * w).sum() / w.sum()).sqrt())
    if radius_angstrom is None:
        radius_angstrom = rg / math.sin(math.pi / n) if n > 1 else 0.0
    height = rg if kind == "D" else 0.0
    unit = xyz + torch.tensor([float(radius_angstrom), 0.0, height], dtype=xyz.dtype)
    coords = torch.cat([unit @ g.T for g in G])  # (G·A, 3): r -> g r
    return AtomicModel(coords_angstrom=coords, weights=w.repeat(G.shape[0]),
                       source=f"{model.source} ({symmetry.upper()} assembly of {len(model)} atoms)")
