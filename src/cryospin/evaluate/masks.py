"""Real-space masks: spherical (hard or soft-edged), an automatic soft mask from a map, and the
gold-standard mask of two half maps whose threshold comes from their noise.

Coordinates follow ``docs/conventions.md``: voxel ``[z, y, x]`` has coordinate
``(x, y, z) − L//2`` pixels, so masks are centred on voxel ``[L//2, L//2, L//2]``. Soft edges are
raised cosines: the mask is 1 inside, ``(1 + cos(π d / w)) / 2`` at distance ``0 ≤ d ≤ w`` pixels
outside, and 0 beyond.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

__all__ = [
    "radius_grid",
    "cosine_edge",
    "spherical_mask",
    "dilate",
    "soft_edge",
    "auto_mask",
    "HALF_MAP_MASK_SIGMAS",
    "HALF_MAP_MASK_MAX_FRACTION",
    "HalfMapMask",
    "half_map_noise_sigma",
    "half_map_mask_widths",
    "half_map_mask",
]


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
    return torch.sqrt(reduce(operator.add, (g * g for g in grids)))


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
    ball = (torch.sqrt(reduce(operator.add, (g * g for g in grids))) <= radius_px + 1e-9).to(dtype)
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
    return soft_edge(core, soft_edge_px).to(volume.dtype)


def soft_edge(core: Tensor, width_px: float) -> Tensor:
    """A binary `(L, L, L)` region with a raised-cosine edge of ``ceil(width_px)`` pixels.

    The edge distance is quantised to whole pixels: the smallest ball radius ``r = 1, 2, …``
    whose dilation of ``core`` reaches a voxel (periodic, as :func:`dilate`). Returns float64
    values in ``[0, 1]``: 1 on ``core``, 0 beyond the edge.
    """
    core = core.bool()
    if width_px <= 0:
        return core.to(torch.float64)
    distance = torch.full(core.shape, math.inf, dtype=torch.float64, device=core.device)
    distance[core] = 0.0
    steps = int(math.ceil(width_px))
    for r in range(1, steps + 1):
        reached = dilate(core, float(r)) & torch.isinf(distance)
        distance[reached] = float(r)
    return cosine_edge(distance, float(steps))


#: Threshold of :func:`half_map_mask`: this many noise standard deviations of the half-map average.
HALF_MAP_MASK_SIGMAS = 4.0
#: Largest fraction of the box :func:`half_map_mask` may cover (mean of the soft mask).
HALF_MAP_MASK_MAX_FRACTION = 0.4


@dataclass(frozen=True)
class HalfMapMask:
    """The gold-standard mask of two half maps and how it was made.

    Attributes
    ----------
    mask : `(L, L, L)` float64
        Soft mask in ``[0, 1]``.
    noise_sigma : float
        Noise standard deviation of the half-map average (:func:`half_map_noise_sigma`).
    threshold : float
        Density threshold of the mask's core (of the half-map average) actually used.
    fraction : float
        Mean of ``mask``: the fraction of the box it covers.
    dilate_px, soft_edge_px : float
        Dilation of the core and width of the cosine edge, pixels.
    fallback : str or None
        What was done instead of the plain noise threshold, in words (``None``: nothing).
    """

    mask: Tensor
    noise_sigma: float
    threshold: float
    fraction: float
    dilate_px: float
    soft_edge_px: float
    fallback: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready description (without the mask itself)."""
        return {
            "kind": "half-map noise threshold" if self.fallback is None else "fallback",
            "noise_sigma": self.noise_sigma,
            "threshold": self.threshold,
            "threshold_sigmas": (self.threshold / self.noise_sigma
                                 if self.noise_sigma > 0 and math.isfinite(self.threshold)
                                 else None),
            "fraction_of_box": self.fraction,
            "dilate_px": self.dilate_px,
            "soft_edge_px": self.soft_edge_px,
            "fallback": self.fallback,
        }


def half_map_noise_sigma(half_a: Tensor, half_b: Tensor) -> float:
    """Noise standard deviation of ``(A + B)/2``, estimated from ``(A − B)/2``.

    With independent noise of equal variance in the halves, ``(A − B)/2`` holds the same noise
    as the average and none of the shared signal. The estimate is robust (``1.4826 · MAD``, the
    median absolute deviation from the median over the whole box), so a local disagreement of
    the halves (a different conformation, an error in one half) does not inflate it.
    """
    d = (0.5 * (half_a.detach().to(torch.float64) - half_b.detach().to(torch.float64))).reshape(-1)
    d = d[:: max(1, d.numel() // 2**22)]  # torch.quantile caps the input size
    med = torch.quantile(d, 0.5)
    return float(1.4826 * torch.quantile((d - med).abs(), 0.5))


def half_map_mask_widths(box_px: int) -> tuple[float, float]:
    """Default dilation and soft edge (pixels) of :func:`half_map_mask` for a box ``L``:
    ``clip(L/16, 2, 6)`` and ``clip(L/8, 4, 12)``."""
    return float(min(max(box_px / 16, 2.0), 6.0)), float(min(max(box_px / 8, 4.0), 12.0))


def half_map_mask(
    half_a: Tensor,
    half_b: Tensor,
    *,
    n_sigma: float = HALF_MAP_MASK_SIGMAS,
    dilate_px: float | None = None,
    soft_edge_px: float | None = None,
    max_fraction: float = HALF_MAP_MASK_MAX_FRACTION,
) -> HalfMapMask:
    """Soft mask for the gold-standard FSC of two aligned half maps.

    1. ``σ`` = noise standard deviation of the average (:func:`half_map_noise_sigma`);
    2. core = voxels where ``(A + B)/2 ≥ n_sigma · σ``, kept only within the radius
       ``L/2 − dilate_px − soft_edge_px`` of the box centre, so that the mask ends inside the
       sphere inscribed in the box (no wrap-around, nothing cut at the box faces);
    3. the core is dilated by ``dilate_px`` and given a raised-cosine edge of ``soft_edge_px``;
    4. if the mask covers more than ``max_fraction`` of the box, the threshold is raised (by
       bisection) until it covers at most that; if no voxel is above the threshold, the mask is
       the soft sphere of radius ``L/2 − soft_edge_px`` (it then measures nearly the unmasked
       FSC). Either is recorded in :attr:`HalfMapMask.fallback`.

    Parameters
    ----------
    half_a, half_b : `(L, L, L)`
        Half maps in the same frame.
    n_sigma : float
        Threshold in noise standard deviations.
    dilate_px, soft_edge_px : float, optional
        Default :func:`half_map_mask_widths`.
    max_fraction : float
        Largest mean of the mask, in ``(0, 1)``.

    Returns
    -------
    HalfMapMask
    """
    if half_a.shape != half_b.shape or half_a.ndim != 3 or len(set(half_a.shape)) != 1:
        raise ValueError(f"expected two cubic (L, L, L) maps of one shape, got "
                         f"{tuple(half_a.shape)} and {tuple(half_b.shape)}")
    if not 0.0 < max_fraction < 1.0:
        raise ValueError(f"max_fraction must be in (0, 1), got {max_fraction}")
    L = half_a.shape[-1]
    d_default, w_default = half_map_mask_widths(L)
    dil = d_default if dilate_px is None else float(dilate_px)
    edge = w_default if soft_edge_px is None else float(soft_edge_px)
    a = half_a.detach().to(torch.float64)
    b = half_b.detach().to(torch.float64)
    avg = 0.5 * (a + b)
    sigma = half_map_noise_sigma(a, b)
    inside = radius_grid(L, device=avg.device) <= max(L / 2 - dil - math.ceil(edge), 0.0)

    def make(threshold: float) -> Tensor:
        return soft_edge(dilate((avg >= threshold) & inside, dil), edge)

    threshold = n_sigma * sigma
    fallback = None
    if not bool(((avg >= threshold) & inside).any()):
        # the largest sphere in the box whose volume (to the middle of its edge) is max_fraction
        radius = min(L // 2 - edge, (3 * max_fraction / (4 * math.pi)) ** (1 / 3) * L - edge / 2)
        mask = spherical_mask(L, radius, soft_edge_px=edge, device=avg.device)
        fallback = (f"no density above {n_sigma:g} noise sigmas: a soft sphere of radius "
                    f"{radius:.3g} px")
        return HalfMapMask(mask, sigma, math.inf, float(mask.mean()), 0.0, edge, fallback)
    mask = make(threshold)
    if float(mask.mean()) > max_fraction:
        lo, hi = threshold, float(avg[inside].max())
        start = threshold
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            if float(make(mid).mean()) > max_fraction:
                lo = mid
            else:
                hi = mid
        threshold = hi
        mask = make(threshold)
        fallback = (f"threshold raised from {n_sigma:g} to {threshold / max(sigma, 1e-300):.3g} "
                    f"noise sigmas ({start:.4g} -> {threshold:.4g}) to cover at most "
                    f"{max_fraction:.0%} of the box")
    return HalfMapMask(mask, sigma, threshold, float(mask.mean()), dil, edge, fallback)
