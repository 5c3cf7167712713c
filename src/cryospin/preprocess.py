"""Preprocessing of particle images: background normalisation, soft circular masks, on-the-fly
Fourier cropping and a contrast (hand of the grey scale) check.

Conventions (``docs/conventions.md``, "Arrays and axes", "Contrast", "Preprocessing"): images
`(..., L, L)` indexed ``[y, x]``; the radius of pixel ``[y, x]`` is
``r = sqrt((x − L//2)² + (y − L//2)²)`` in pixels (the centre of a box is pixel
``[L//2, L//2]``). cryospin models **bright** particles (CTF(0) = +w).

The functions are pure (no input mutation, output dtype = input dtype, autograd kept).
:class:`PreprocessedParticles` is a thin read-only view of a particle set whose
``images(indices)`` are Fourier-cropped and normalised on the fly, chunk by chunk, so the
preloaded and the per-batch training paths preprocess identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.resample import fourier_crop_2d
from cryospin.sources import ImageSource, release_pages

__all__ = [
    "Normalization",
    "ContrastCheck",
    "DEFAULT_BACKGROUND_RADIUS_FRACTION",
    "radius_grid_px",
    "background_mask",
    "soft_circular_mask",
    "normalize_background",
    "contrast_statistic",
    "check_contrast",
    "sample_contrast",
    "PreprocessedParticles",
    "REFERENCE_PYRAMID_VARIANCES_PX2",
    "REFERENCE_PYRAMID_BOX_PX",
    "pyramid_variances_px2",
    "gaussian_blur",
    "gaussian_pyramid",
]

Normalization = Literal["global", "background"]

#: Background = pixels with ``r > 0.8 · L/2`` when no mask radius is given.
DEFAULT_BACKGROUND_RADIUS_FRACTION = 0.8

# contrast check: inner disc (particle) radius as a fraction of L/2, and |z| threshold
_CONTRAST_INNER_FRACTION = 0.5
_CONTRAST_Z = 3.0
_CONTRAST_CHUNK = 64
_CROP_CHUNK = 256


def radius_grid_px(
    box_px: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """Distance `(L, L)` of every pixel ``[y, x]`` from the box centre ``[L//2, L//2]``, pixels."""
    L = int(box_px)
    c = torch.arange(L, dtype=dtype, device=device) - L // 2  # (L,)
    return (c[:, None] ** 2 + c[None, :] ** 2).sqrt()  # (L, L)


def background_mask(box_px: int, radius_px: float, *, device: torch.device | str | None = None
                    ) -> Tensor:
    """Boolean `(L, L)`: True for the background pixels ``r > radius_px``."""
    return radius_grid_px(box_px, device=device) > float(radius_px)


def soft_circular_mask(
    box_px: int,
    radius_px: float,
    edge_width_px: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Soft circular mask `(L, L)` with a raised-cosine edge.

    ``1`` for ``r ≤ radius_px``; ``(1 + cos(π (r − radius_px) / edge_width_px)) / 2`` for
    ``radius_px < r < radius_px + edge_width_px``; ``0`` beyond. Non-increasing in ``r``,
    continuous with a continuous first derivative (zero slope at both ends of the edge).
    ``edge_width_px = 0`` gives the hard disc ``r ≤ radius_px``.
    """
    if radius_px < 0 or edge_width_px < 0:
        raise ValueError(f"need radius_px >= 0 and edge_width_px >= 0, got "
                         f"{radius_px}, {edge_width_px}")
    r = radius_grid_px(box_px, dtype=torch.float64, device=device)  # (L, L)
    if edge_width_px == 0:
        return (r <= radius_px).to(dtype)
    t = ((r - float(radius_px)) / float(edge_width_px)).clamp(0.0, 1.0)  # (L, L) in [0, 1]
    return (0.5 * (1.0 + torch.cos(math.pi * t))).to(dtype)


#: Blur variances (px²) of the reference design's 5-level Gaussian pyramid at a 128 px box.
REFERENCE_PYRAMID_VARIANCES_PX2: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
REFERENCE_PYRAMID_BOX_PX = 128


def pyramid_variances_px2(box_px: int) -> tuple[float, ...]:
    """The reference pyramid's blur variances (px²) scaled to a ``box_px`` image of the same
    field of view: ``v · (box_px / 128)²`` (a blur of the same width in Å)."""
    scale = (float(box_px) / REFERENCE_PYRAMID_BOX_PX) ** 2
    return tuple(v * scale for v in REFERENCE_PYRAMID_VARIANCES_PX2)


def _gaussian_kernel_1d(variance_px2: float, max_radius: int, dtype: torch.dtype,
                        device: torch.device | str | None) -> Tensor:
    """Sampled, normalised 1D Gaussian `(2R + 1,)`, ``R = min(ceil(4σ), max_radius)``, ≥ 1."""
    sigma = math.sqrt(float(variance_px2))
    radius = max(1, min(int(math.ceil(4.0 * sigma)), int(max_radius)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * x**2 / float(variance_px2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(images: Tensor, variance_px2: float) -> Tensor:
    """Separable Gaussian blur of images `(..., L, L)` with reflect padding.

    The kernel is the sampled Gaussian ``exp(−x² / 2v)`` (``v = variance_px2`` > 0, px²),
    normalised to sum 1, truncated at ``ceil(4σ)`` pixels (and at ``L − 1``, the most reflect
    padding allows). Pure; keeps dtype, device and autograd.
    """
    if not variance_px2 > 0:
        raise ValueError(f"variance_px2 must be > 0, got {variance_px2}")
    L = int(images.shape[-1])
    if images.ndim < 2 or images.shape[-2] != L or L < 2:
        raise ValueError(f"expected images (..., L, L) with L >= 2, got {tuple(images.shape)}")
    k = _gaussian_kernel_1d(variance_px2, L - 1, images.dtype, images.device)  # (K,)
    r = (k.shape[0] - 1) // 2
    x = images.reshape(-1, 1, L, L)  # (n, 1, L, L)
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")  # (n, 1, L+2r, L+2r)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))  # along x: (n, 1, L+2r, L)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))  # along y: (n, 1, L, L)
    return x.reshape(images.shape)


def gaussian_pyramid(images: Tensor, variances_px2: tuple[float, ...]) -> Tensor:
    """Images `(B, L, L)` -> `(B, C, L, L)`: channel ``c`` is the image blurred with variance
    ``variances_px2[c]`` (px², :func:`gaussian_blur`). Pure; keeps dtype, device, autograd."""
    if images.ndim != 3:
        raise ValueError(f"expected images (B, L, L), got {tuple(images.shape)}")
    if not variances_px2:
        raise ValueError("need at least one variance")
    return torch.stack([gaussian_blur(images, v) for v in variances_px2], dim=1)


def normalize_background(images: Tensor, radius_px: float) -> Tensor:
    """Per-image normalisation by the background ``r > radius_px``.

    Each image `(..., L, L)` becomes ``(x − μ) / σ`` with ``μ`` and ``σ`` the mean and the
    (population, ``1/n``) standard deviation of its own background pixels, so that afterwards
    every image's background has mean 0 and standard deviation 1.

    Raises
    ------
    ValueError
        No background pixels (``radius_px`` too large) or an image with a constant background
        (the message gives its position in the flattened batch).
    """
    L = int(images.shape[-1])
    if images.ndim < 2 or images.shape[-2] != L:
        raise ValueError(f"expected images (..., L, L), got shape {tuple(images.shape)}")
    bg = background_mask(L, radius_px, device=images.device)  # (L, L)
    if not bool(bg.any()):
        raise ValueError(f"no background pixels outside radius {radius_px} px in a {L} px box")
    flat = images.reshape(-1, L, L)  # (n, L, L)
    vals = flat[:, bg]  # (n, C)
    mean = vals.mean(dim=1)  # (n,)
    std = vals.std(dim=1, correction=0)  # (n,)
    bad = torch.nonzero(~(std > 0) & torch.isfinite(std)).flatten()  # NaN/Inf pass through
    if bad.numel():
        raise ValueError(f"image {int(bad[0])} of the batch has a constant background")
    out = (flat - mean[:, None, None]) / std[:, None, None]  # (n, L, L)
    return out.reshape(images.shape)


def contrast_statistic(
    images: Tensor, inner_radius_px: float, background_radius_px: float
) -> Tensor:
    """Per-image contrast `(...,)`: (mean for ``r ≤ inner`` − background mean) / background std.

    The background is ``r > background_radius_px``. Positive for bright particles (the
    low-frequency content of ``CTF ⊛ P`` is positive because the CTF is positive from ``k = 0``
    up to its first zero), negative for dark ones. Images with a constant background give 0.
    """
    L = int(images.shape[-1])
    r = radius_grid_px(L, device=images.device)  # (L, L)
    inner = r <= float(inner_radius_px)
    bg = r > float(background_radius_px)
    if not bool(inner.any()) or not bool(bg.any()):
        raise ValueError(f"empty inner disc or background in a {L} px box "
                         f"(radii {inner_radius_px}, {background_radius_px})")
    flat = images.reshape(-1, L, L)  # (n, L, L)
    vals = flat[:, bg]  # (n, C)
    std = vals.std(dim=1, correction=0)  # (n,)
    diff = flat[:, inner].mean(dim=1) - vals.mean(dim=1)  # (n,)
    out = torch.where(std > 0, diff / std.clamp_min(torch.finfo(std.dtype).tiny), 0.0)
    return out.reshape(images.shape[:-2])


@dataclass(frozen=True)
class ContrastCheck:
    """Result of :func:`check_contrast`.

    Attributes
    ----------
    num_images : int
    mean_contrast : float
        Mean of :func:`contrast_statistic` (background standard deviations).
    z_score : float
        ``mean / (std / sqrt(n))`` over the images (a t statistic).
    verdict : str
        ``"not inverted"`` (bright particles, cryospin's convention: use as they are),
        ``"inverted"`` (dark particles: needs ``--invert-contrast``) or ``"unclear"``.
    """

    num_images: int
    mean_contrast: float
    z_score: float
    verdict: Literal["inverted", "not inverted", "unclear"]

    @property
    def inverted(self) -> bool | None:
        """True (dark particles), False (bright) or None (unclear)."""
        return {"inverted": True, "not inverted": False}.get(self.verdict)


def _verdict(values: Tensor, z_threshold: float) -> ContrastCheck:
    v = values.double().flatten()
    n = int(v.numel())
    if n < 2:
        mean = float(v.mean()) if n else float("nan")
        return ContrastCheck(n, mean, float("nan"), "unclear")
    mean, sd = float(v.mean()), float(v.std())
    z = mean / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    verdict: Literal["inverted", "not inverted", "unclear"] = "unclear"
    if z >= z_threshold:
        verdict = "not inverted"
    elif z <= -z_threshold:
        verdict = "inverted"
    return ContrastCheck(n, mean, z, verdict)


def check_contrast(
    images: Tensor,
    *,
    inner_radius_fraction: float = _CONTRAST_INNER_FRACTION,
    background_radius_fraction: float = DEFAULT_BACKGROUND_RADIUS_FRACTION,
    z_threshold: float = _CONTRAST_Z,
) -> ContrastCheck:
    """Whether centred particles `(N, L, L)` look bright (cryospin's convention) or dark.

    Averages :func:`contrast_statistic` (inner disc ``r ≤ inner_radius_fraction · L/2``,
    background ``r > background_radius_fraction · L/2``) over the images; the verdict is
    "not inverted" when its t statistic is ``≥ z_threshold``, "inverted" when ``≤ −z_threshold``,
    otherwise "unclear". Why the sign is meaningful: the image is ``CTF ⊛ P`` with
    ``CTF(0) = +w`` and the CTF positive up to its first zero (≈ 1/17 Å⁻¹ at 1.5 µm, 300 kV),
    far above the ~1/diameter frequencies that set the mean over the particle's disc.
    """
    half = images.shape[-1] / 2.0
    stat = contrast_statistic(
        images, inner_radius_fraction * half, background_radius_fraction * half
    )
    return _verdict(stat, z_threshold)


def sample_contrast(particles: ImageSource, *, max_images: int = 256) -> ContrastCheck:
    """:func:`check_contrast` on up to ``max_images`` evenly spaced particles of an image
    source, read in chunks of 64 (bounded memory)."""
    n = len(particles)
    if n == 0:
        return ContrastCheck(0, float("nan"), float("nan"), "unclear")
    idx = torch.linspace(0, n - 1, min(n, int(max_images))).round().long().unique()
    half = int(particles.box_px) / 2.0
    stats = []
    for chunk in idx.split(_CONTRAST_CHUNK):
        x = particles.images(chunk).to(torch.float64)  # (c, L, L)
        release_pages(particles, chunk)  # spread-out reads can map whole page-cache folios
        stats.append(contrast_statistic(
            x, _CONTRAST_INNER_FRACTION * half, DEFAULT_BACKGROUND_RADIUS_FRACTION * half
        ))
    return _verdict(torch.cat(stats), _CONTRAST_Z)


class PreprocessedParticles:
    """Read-only view of a particle set with Fourier cropping and normalisation on the fly.

    ``images(indices)`` reads the raw images `(n, L, L)`, Fourier-crops them to
    `(n, L', L')` (:func:`cryospin.forward.resample.fourier_crop_2d`, values kept) and, with
    ``normalize="background"``, applies :func:`normalize_background`; it returns float64.
    ``box_px`` is ``L'`` and ``pixel_size_angstrom`` is ``pixel_size · L / L'``; the CTF
    parameters (physical units) are unchanged, so a CTF computed at the new box and pixel
    size is the CTF of the cropped images. ``encoder_mask`` `(L', L')` (or None) is the soft
    mask the training data applies to the encoder's input (not to the loss).

    Parameters
    ----------
    particles : ImageSource
    box_px : int or None
        New box ``L'`` (even, ``≤ L``); None keeps ``L``.
    normalize : "global" or "background"
        "global" leaves the values alone (the trainer divides by one global std).
    mask_radius_fraction : float or None
        Radius of the encoder mask as a fraction of ``L'/2``; also the radius outside which
        the background is measured (default :data:`DEFAULT_BACKGROUND_RADIUS_FRACTION`).
    mask_edge_px : float
        Width of the mask's raised-cosine edge, pixels of the new box.
    """

    def __init__(
        self,
        particles: ImageSource,
        *,
        box_px: int | None = None,
        normalize: Normalization = "global",
        mask_radius_fraction: float | None = None,
        mask_edge_px: float = 3.0,
    ) -> None:
        where = particles.source
        L = int(particles.box_px)
        new = L if box_px is None else int(box_px)
        if new > L or new < 8 or new % 2:
            raise InputError(f"--box {new} must be even, >= 8 and <= the particles' box {L} px",
                             where)
        if normalize not in ("global", "background"):
            raise ValueError(f"normalize must be 'global' or 'background', got {normalize!r}")
        self.particles = particles
        self.source = where
        self.original_box_px = L
        self.box_px = new
        self.pixel_size_angstrom = float(particles.pixel_size_angstrom) * L / new
        self.ctf = particles.ctf
        self.normalize = normalize
        fraction = (DEFAULT_BACKGROUND_RADIUS_FRACTION if mask_radius_fraction is None
                    else float(mask_radius_fraction))
        self.background_radius_px = fraction * new / 2.0
        self.encoder_mask: Tensor | None = None
        if mask_radius_fraction is not None:
            self.encoder_mask = soft_circular_mask(new, self.background_radius_px,
                                                   float(mask_edge_px))

    @classmethod
    def wrap(
        cls,
        particles: ImageSource,
        *,
        box_px: int | None = None,
        normalize: Normalization = "global",
        mask_radius_fraction: float | None = None,
        mask_edge_px: float = 3.0,
    ) -> ImageSource:
        """A view when any option differs from the identity, else ``particles`` itself."""
        identity = (box_px in (None, int(particles.box_px)) and normalize == "global"
                    and mask_radius_fraction is None)
        return particles if identity else cls(
            particles, box_px=box_px, normalize=normalize,
            mask_radius_fraction=mask_radius_fraction, mask_edge_px=mask_edge_px)

    def __len__(self) -> int:
        return len(self.particles)

    def images(self, indices: Any = None) -> Tensor:
        """Preprocessed images `(n, L', L')` float64 (see the class docstring).

        ``indices``: at full size, whatever the wrapped source's ``images`` takes, passed on
        unchanged (a tensor for any :class:`ImageSource`; a :class:`cryospin.io.ParticleSet`
        also takes None, slices and masks); when cropping, None, a slice or integer indices.

        Read and cropped in chunks of 256 images, so the full-size transient memory stays
        bounded whatever ``n``.
        """
        if self.box_px == self.original_box_px:
            x = self.particles.images(indices).to(torch.float64)  # (n, L, L)
        else:
            if indices is None:
                idx = torch.arange(len(self))
            elif isinstance(indices, slice):
                idx = torch.arange(len(self))[indices]
            else:
                idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
            x = torch.empty(idx.numel(), self.box_px, self.box_px, dtype=torch.float64)
            for start in range(0, idx.numel(), _CROP_CHUNK):
                part = idx[start:start + _CROP_CHUNK]
                raw = self.particles.images(part).to(torch.float64)  # (c, L, L)
                x[start:start + part.numel()] = fourier_crop_2d(raw, self.box_px)  # (c, L', L')
        if self.normalize == "background":
            try:
                x = normalize_background(x, self.background_radius_px)
            except ValueError as exc:
                raise InputError(f"cannot normalise by the background ({exc}); "
                                 "use --normalize global", self.source) from None
        return x
