"""Rigid-body resampling of a map: ``out(r) = V(Qᵀ (r − t))``.

Convention (``docs/conventions.md``): volumes `(L, L, L)` indexed ``[z, y, x]``; voxel
``[z, y, x]`` has coordinate ``r = (x, y, z) − L//2`` pixels; rotations left-multiply xyz column
vectors. Used by map alignment (:mod:`cryospin.evaluate.align`) and by the symmetry search
(:mod:`cryospin.symmetry_search`), which training calls too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["centred_coords", "transform_map"]


def centred_coords(L: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Coordinates ``(x, y, z)`` of every voxel from ``L//2``, `(L, L, L, 3)`."""
    c = torch.arange(L, dtype=dtype, device=device) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1)


def transform_map(
    volume: Tensor,
    rotation: Tensor,
    translation_px: Tensor | None = None,
    *,
    output_box_px: int | None = None,
    input_scale: float = 1.0,
) -> Tensor:
    """Resample ``out(r) = V(Qᵀ (r − t))`` by trilinear interpolation (zero outside the box).

    Parameters
    ----------
    volume : `(L_in, L_in, L_in)`
        Input map.
    rotation : `(3, 3)` or `(B, 3, 3)`
        ``Q``, cast to ``volume.dtype``.
    translation_px : `(3,)` or `(B, 3)`, optional
        ``t`` in output pixels, ``(x, y, z)``.
    output_box_px : int, optional
        Output box (default ``L_in / input_scale``).
    input_scale : float
        Input voxels per output pixel (2 for a 2× Fourier-upsampled input).

    Returns
    -------
    `(L, L, L)` or `(B, L, L, L)`
        Differentiable with respect to ``volume``, ``rotation`` and ``translation_px``.
    """
    batched = rotation.ndim == 3
    Q = rotation.to(volume.dtype).reshape(-1, 3, 3)  # (B, 3, 3)
    B = Q.shape[0]
    L_in = volume.shape[-1]
    L = output_box_px or int(round(L_in / input_scale))
    r = centred_coords(L, volume.dtype, volume.device).reshape(1, -1, 3)  # (1, P, 3)
    if translation_px is not None:
        r = r - translation_px.to(volume.dtype).reshape(-1, 1, 3)
    p = r @ Q  # (B, P, 3): row form of Qᵀ (r − t)
    idx = p * input_scale + (L_in // 2)
    grid = idx * (2.0 / (L_in - 1)) - 1.0  # align_corners=True; last dim (x, y, z) = (W, H, D)
    out = F.grid_sample(
        volume[None, None].expand(B, 1, L_in, L_in, L_in).contiguous(),  # faster than a view
        grid.reshape(B, L, L, L, 3),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )[:, 0]  # (B, L, L, L)
    return out if batched else out[0]
