"""Clean projections for simulation, computed **without** the reconstruction's slicer.

Using the trilinear central-slice operator of :mod:`cryospin.forward.slicing` to simulate data
that the same operator then fits would be an "inverse crime"; instead:

- Atoms (:func:`project_atoms`): the exact projection of a sum of isotropic Gaussians. With the
  convention ``P(x, y) = ∫ V(Rᵀ (x, y, z)ᵀ) dz`` (``docs/conventions.md``) an atom at ``r``
  projects to the 2D Gaussian centred at the first two components of ``R r``. Separability
  gives ``image = Gyᵀ · diag(w) · Gx`` with ``Gx, Gy`` `(A, L)` the 1D profiles of
  :func:`cryospin.simulate.density.gaussian_profiles`: one batched matrix product per chunk.
  The volume of :func:`~cryospin.simulate.density.atoms_to_volume` summed along z equals the
  projection at ``R = I`` to ~1e-8 (tested).
- Maps (:func:`project_map`): real-space ray sums. The map is upsampled ×3 by Fourier padding
  (band-limited interpolation), sampled trilinearly (``torch.nn.functional.grid_sample``) at
  the rotated points ``Rᵀ (x, y, z)`` of the ``L³`` output grid with unit z-steps, and summed
  along z. Points outside the map contribute 0. For a map as sharp as the Nyquist limit
  (Gaussian atoms of σ = 1 px) the projections agree with the analytic ones to ~1 % of their
  peak (the trilinear error falls as the square of the oversampling factor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin.forward.resample import fourier_pad_3d
from cryospin.forward.trilinear import sample_volume
from cryospin.simulate.density import gaussian_profiles

__all__ = ["project_atoms", "project_map", "upsample_map_for_projection"]

# sample points per grid_sample call in project_map (~100 MB of float32 coordinates)
_MAX_POINTS = 1 << 23


def project_atoms(
    positions_px: Tensor,
    weights: Tensor,
    rotations: Tensor,
    box_px: int,
    sigma_px: float,
    *,
    chunk_atoms: int = 256,
    chunk_images: int = 16,
) -> Tensor:
    """Analytic projections of Gaussian atoms.

    Parameters
    ----------
    positions_px : `(A, 3)`
        ``(x, y, z)`` pixels relative to the box centre.
    weights : `(A,)`
        Integral of each Gaussian.
    rotations : `(B, 3, 3)`
        Rotation matrices (left-multiply xyz columns).
    box_px : int
    sigma_px : float
    chunk_atoms, chunk_images : int
        Block sizes; a block of `(b, a, L)` profiles should fit in the CPU cache (memory
        bandwidth, not arithmetic, limits this function).

    Returns
    -------
    `(B, L, L)` indexed ``[y, x]``, in the dtype/device of ``positions_px``.
    """
    L = int(box_px)
    R = rotations.to(positions_px)
    w = weights.to(positions_px)
    xy = torch.einsum("bij,aj->bia", R[:, :2, :], positions_px)  # (B, 2, A): (R r)_x, (R r)_y
    out = []
    for b0 in range(0, R.shape[0], chunk_images):
        part = xy[b0 : b0 + chunk_images]
        images = positions_px.new_zeros((part.shape[0], L, L))
        for a0 in range(0, positions_px.shape[0], chunk_atoms):
            a1 = a0 + chunk_atoms
            gx = gaussian_profiles(part[:, 0, a0:a1], L, sigma_px)  # (b, a, L)
            gy = gaussian_profiles(part[:, 1, a0:a1], L, sigma_px).mul_(w[a0:a1, None])
            images = images.baddbmm_(gy.transpose(1, 2), gx)  # (b, L, L): [y, x]
        out.append(images)
    return torch.cat(out) if out else positions_px.new_zeros((0, L, L))


def upsample_map_for_projection(volume: Tensor, factor: int = 3) -> Tensor:
    """The ×``factor`` Fourier-padded map `(fL, fL, fL)` used by :func:`project_map` (compute
    once)."""
    L = int(volume.shape[-1])
    return fourier_pad_3d(volume, int(factor) * L)


def project_map(upsampled: Tensor, rotations: Tensor, box_px: int) -> Tensor:
    """Real-space projections of a map given its upsampled version.

    Parameters
    ----------
    upsampled : `(fL, fL, fL)`
        Output of :func:`upsample_map_for_projection` for a `(L, L, L)` map ``[z, y, x]``.
    rotations : `(B, 3, 3)`
    box_px : int
        ``L``.

    Returns
    -------
    `(B, L, L)` ``[y, x]``: ``Σ_z V(Rᵀ (x, y, z))`` over ``z = −L//2 … L − 1 − L//2``.
    """
    L = int(box_px)
    S = int(upsampled.shape[-1])
    f = S // L
    if S != f * L or f < 1:
        raise ValueError(f"upsampled map has side {S}, not a multiple of the box {L}")
    dtype, device = upsampled.dtype, upsampled.device
    c = torch.arange(L, dtype=dtype, device=device) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], dim=-1).reshape(-1, 3)  # (L³, 3) xyz, [z, y, x] order
    R = rotations.to(dtype=dtype, device=device)
    per_block = max(1, _MAX_POINTS // L**3)  # images per grid_sample call (bounded memory)
    out = []
    for b0 in range(0, R.shape[0], per_block):
        src = pts @ R[b0 : b0 + per_block]  # (b, L³, 3): rows of Rᵀ p
        # coordinate c -> upsampled index S//2 + f·c -> align_corners normalised coordinate
        grid = (2.0 * (S // 2 + f * src) / (S - 1) - 1.0).reshape(-1, 3)  # (b L³, 3)
        vals = sample_volume(upsampled[None], grid)  # (1, b L³), on every CPU thread
        out.append(vals.reshape(-1, L, L, L).sum(dim=1))  # (b, L, L)
    return torch.cat(out) if out else upsampled.new_zeros((0, L, L))
