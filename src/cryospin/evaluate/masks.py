"""Real-space masks: spherical (hard or soft-edged) and an automatic soft mask from a map.

Coordinates follow ``docs/conventions.md``: voxel ``[z, y, x]`` has coordinate
``(x, y, z) − L//2`` pixels, so masks are centred on voxel ``[L//2, L//2, L//2]``. Soft edges are
raised cosines: the mask is 1 inside, ``(1 + cos(π d / w)) / 2`` at distance ``0 ≤ d ≤ w`` pixels
outside, and 0 beyond.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["radius_grid", "cosine_edge", "spherical_mask", "dilate", "auto_mask"]


def radius_grid(
    box_px: int,
    *,
    ndim: int = 3,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Distance in pixels of every voxel from the box centre ``L//2``, `(L,)*ndim`."""
    c = torch.arange(box_px, dtype=dtype, device=device) - box_px // 2
    grids = torch.meshgrid(*([c] * ndim), indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))


def cosine_edge(distance_px: Tensor, width_px: float) -> Tensor:
    """Raised-cosine fall-off: 1 for ``d ≤ 0``, ``(1 + cos(π d / w))/2`` up to ``w``, then 0."""
    if width_px <= 0:
        return (distance_px <= 0).to(distance_px.dtype)
    t = (distance_px / width_px).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def spherical_mask(
    box_px: int,
    radius_px: float | None = None,
    *,
    soft_edge_px: float = 0.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """A sphere centred at ``L//2``: 1 inside ``radius_px``, cosine edge of ``soft_edge_px``.

    Parameters
    ----------
    box_px : int
        Box size ``L``.
    radius_px : float, optional
        Radius of the fully-1 region; default ``L//2 − soft_edge_px`` (the edge stays in the box).
    soft_edge_px : float
        Width of the raised-cosine edge in pixels; 0 gives a hard (binary) mask.

    Returns
    -------
    `(L, L, L)`
        Mask values in ``[0, 1]``.
    """
    if radius_px is None:
        radius_px = box_px // 2 - soft_edge_px
    r = radius_grid(box_px, dtype=dtype, device=device)
    return cosine_edge(r - radius_px, soft_edge_px)


def _ball_kernel_fft(
    box_px: int, radius_px: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """rFFT of a ball of ``radius_px`` centred at the origin of the periodic grid."""
    k = torch.fft.fftfreq(box_px, d=1.0 / box_px, dtype=dtype, device=device)
    grids = torch.meshgrid(k, k, k, indexing="ij")
    ball = (torch.sqrt(sum(g * g for g in grids)) <= radius_px + 1e-9).to(dtype)
    return torch.fft.rfftn(ball)


def dilate(binary: Tensor, radius_px: float) -> Tensor:
    """Morphological dilation of a binary `(L, L, L)` mask by a ball of ``radius_px`` pixels.

    Computed as an FFT convolution (periodic boundary; keep masks away from the box edge).
    Returns a bool tensor.
    """
    if radius_px <= 0:
        return binary.bool()
    L = binary.shape[-1]
    dtype = torch.float64
    b = binary.to(dtype)
    conv = torch.fft.irfftn(
        torch.fft.rfftn(b) * _ball_kernel_fft(L, radius_px, dtype, binary.device), s=b.shape
    )
    return conv > 0.5


def auto_mask(
    volume: Tensor,
    *,
    threshold: float | None = None,
    dilate_px: float = 3.0,
    soft_edge_px: float = 6.0,
) -> Tensor:
    """Automatic soft mask of a map: threshold, dilate, raised-cosine edge.

    Parameters
    ----------
    volume : `(L, L, L)`
        Real map.
    threshold : float, optional
        Density threshold for the core of the mask; default half of the 99.9th percentile of
        the map values (a robust "half of the maximum").
    dilate_px : float
        Dilation of the thresholded region, pixels.
    soft_edge_px : float
        Width of the cosine edge, pixels; the edge distance is quantised to whole pixels
        (computed by successive dilations by balls of radius 1, 2, …).

    Returns
    -------
    `(L, L, L)`
        Mask in ``[0, 1]``, dtype of ``volume``.
    """
    v = volume.detach()
    if threshold is None:
        flat = v.reshape(-1).to(torch.float64)
        flat = flat[:: max(1, flat.numel() // 2**22)]  # torch.quantile caps the input size
        threshold = 0.5 * float(torch.quantile(flat, 0.999))
    core = dilate(v >= threshold, dilate_px)
    if soft_edge_px <= 0:
        return core.to(volume.dtype)
    # distance (whole pixels) from the core: smallest ball radius whose dilation reaches a voxel
    distance = torch.full(core.shape, math.inf, dtype=torch.float64, device=v.device)
    distance[core] = 0.0
    steps = int(math.ceil(soft_edge_px))
    for r in range(1, steps + 1):
        reached = dilate(core, float(r)) & torch.isinf(distance)
        distance[reached] = float(r)
    return cosine_edge(distance, float(steps)).to(volume.dtype)
