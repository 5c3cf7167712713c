"""Explicit voxel volume in Hartley space, parametrised as ``mantissa · exp(exponent)``.

The Hartley coefficients of a particle span many orders of magnitude between the DC shell and
Nyquist. Storing every voxel as ``V = m · exp(e)`` (the cryoSPIN parametrisation) lets a single
learning rate move both the large low-frequency and the tiny high-frequency values by a similar
*relative* amount: with ``e`` set to the log of the expected amplitude of the voxel's shell,
``m`` is of order one everywhere.

Conventions (``docs/conventions.md``): volumes are `(L, L, L)` indexed ``[z, y, x]``; the
Hartley transform is that of the centred FFT, DC at index ``L//2``; frequency index ``i`` has
``k = i − L//2`` cycles per box; the radial shell of a voxel is ``round(|k|)``, clamped to
``L//2`` (the corners beyond Nyquist share the last shell).
"""

from __future__ import annotations

import operator
from functools import reduce

import torch
from torch import Tensor, nn

from cryospin.forward.hartley import hartley3, ihartley3
from cryospin.forward.slicing import extract_central_slices
from cryospin.forward.symmetrize import symmetrize_volume
from cryospin.symmetry import grid_cosets, point_group_rotations

__all__ = ["HartleyVolume", "radial_shells", "radial_rms", "radial_amplitude_from_images"]


def radial_shells(
    box_px: int, ndim: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Shell index ``round(|k|)`` of every voxel/pixel, clamped to ``L//2``.

    Returns
    -------
    `(L,)*ndim` int64
        Values in ``[0, L//2]``.
    """
    k = torch.arange(box_px, device=device, dtype=torch.float64) - box_px // 2  # (L,)
    grids = torch.meshgrid(*([k] * ndim), indexing="ij")
    radius = torch.sqrt(reduce(operator.add, (g * g for g in grids)))  # (L,)*ndim
    return radius.round().long().clamp_max(box_px // 2)


def radial_rms(values: Tensor, ndim: int) -> Tensor:
    """Root-mean-square of ``values`` over each radial shell of the last ``ndim`` axes.

    Parameters
    ----------
    values : `(..., L, L)` or `(..., L, L, L)`
        Centred Hartley (or any) coefficients; leading axes are averaged too.
    ndim : int
        2 for images, 3 for volumes.

    Returns
    -------
    `(L//2 + 1,)`
        ``sqrt(mean over shell r of values²)``; dtype of ``values``.
    """
    box_px = values.shape[-1]
    if ndim not in (2, 3) or values.ndim < ndim or any(s != box_px for s in values.shape[-ndim:]):
        raise ValueError(f"expected (..., L{', L' * (ndim - 1)}), got {tuple(values.shape)}")
    shells = radial_shells(box_px, ndim, device=values.device).reshape(-1)  # (L**ndim,)
    sq = values.reshape(-1, shells.numel()).square().sum(0)  # (L**ndim,)
    n_lead = values.numel() // shells.numel()
    nbins = box_px // 2 + 1
    total = torch.zeros(nbins, dtype=values.dtype, device=values.device).index_add(0, shells, sq)
    count = torch.bincount(shells, minlength=nbins).to(values.dtype) * n_lead
    return (total / count).sqrt()


def radial_amplitude_from_images(
    images_ht: Tensor, *, noise_variance: float = 0.0, floor_fraction: float = 1e-3
) -> Tensor:
    """Expected amplitude of the volume's Hartley coefficients per shell, from the images.

    By the Fourier slice theorem every image coefficient at ``|k| = r`` samples the volume's
    transform on the sphere ``|k| = r`` (times the CTF, plus noise), so the mean square of the
    image coefficients on a 2D shell, minus the noise variance, estimates the mean square of the
    volume's coefficients on the 3D shell. The CTF is not divided out: the estimate is low by
    about ``sqrt(mean CTF²)`` (≈ 0.7 away from the lowest frequencies), which the exponent
    learns away.

    Parameters
    ----------
    images_ht : `(N, L, L)`
        Centred 2D Hartley transforms of (a sample of) the particle images.
    noise_variance : float
        Noise variance per Hartley coefficient, subtracted from the mean square.
    floor_fraction : float
        Shells whose signal estimate falls below ``floor_fraction`` times the largest are
        raised to that value, so that the result is strictly positive.

    Returns
    -------
    `(L//2 + 1,)`
        Positive amplitudes, dtype of ``images_ht``; input to :meth:`HartleyVolume.ab_initio`.
    """
    ms = radial_rms(images_ht, 2).square() - noise_variance  # (L//2+1,)
    top = ms.max()
    if not top > 0:
        raise ValueError("images carry no power above the noise variance")
    return ms.clamp_min(floor_fraction * top).sqrt()


def _log_amplitude_field(radial_amplitude: Tensor, box_px: int) -> Tensor:
    """``log a(shell(k))`` on the `(L, L, L)` grid; shells past the profile use its last bin."""
    shells = radial_shells(box_px, 3, device=radial_amplitude.device)
    shells = shells.clamp_max(radial_amplitude.shape[0] - 1)
    return radial_amplitude.log()[shells]  # (L, L, L)


def _split(values: Tensor) -> tuple[Tensor, Tensor]:
    """(mantissa, exponent) with ``mantissa·exp(exponent) == values`` and radial exponent.

    ``exponent`` is the log of the shell RMS of ``values`` (floored at 1e-30 of the largest so
    that empty or zero shells stay finite); ``mantissa = values / exp(exponent)`` is then of
    order one.
    """
    box_px = values.shape[-1]
    rms = radial_rms(values, 3)  # (L//2+1,)
    top = rms.max()
    floor = top * 1e-30 if top > 0 else torch.ones_like(top)
    exponent = _log_amplitude_field(rms.clamp_min(floor), box_px)
    mantissa = values / exponent.exp()
    return mantissa, exponent


class HartleyVolume(nn.Module):
    """Learnable `(L, L, L)` Hartley-space volume ``V = mantissa · exp(exponent)``.

    Parameters
    ----------
    box_px : int
        Box size ``L`` in voxels.
    init : `(L, L, L)`, optional
        Initial Hartley coefficients. They are represented exactly (to rounding), with the
        exponent set to the log of their shell RMS (see :meth:`from_real_space`).
    init_scale : float
        Without ``init``: mantissa ~ ``init_scale · N(0, 1)`` and exponent 0 (float32).
    generator : torch.Generator, optional
        Source of the random mantissa.
    symmetry : str
        Point group (``C1``: none; Cn, Dn, T, O, I in RELION's axes, :mod:`cryospin.symmetry`):
        the volume is the group average of ``mantissa · exp(exponent)``
        (:func:`~cryospin.forward.symmetrize.symmetrize_volume`), symmetric by construction.
        Kept out of the state dict (CPU attributes, not buffers): the state dict is the same
        for every group.

    Attributes
    ----------
    mantissa, exponent : nn.Parameter `(L, L, L)`
    point_group : str
        ``symmetry`` as given.
    """

    def __init__(
        self,
        box_px: int,
        *,
        init: Tensor | None = None,
        init_scale: float = 1e-2,
        generator: torch.Generator | None = None,
        symmetry: str = "C1",
    ) -> None:
        super().__init__()
        if box_px < 2:
            raise ValueError(f"box_px must be >= 2, got {box_px}")
        self.box_px = int(box_px)
        self.point_group = symmetry
        group = point_group_rotations(symmetry)  # (G, 3, 3) float64
        cosets, perms = grid_cosets(group) if group.shape[0] > 1 else (None, None)
        # read as numbers on every call: CPU attributes (no device sync), not buffers, so
        # the state dict is that of C1
        self.symmetry_cosets = cosets
        self.symmetry_permutations = perms
        if init is not None:
            if init.shape != (box_px,) * 3:
                raise ValueError(f"init must be {(box_px,) * 3}, got {tuple(init.shape)}")
            mantissa, exponent = _split(init.detach())
        else:
            mantissa = init_scale * torch.randn(
                box_px, box_px, box_px, generator=generator,
                device=None if generator is None else generator.device,
            )
            exponent = torch.zeros_like(mantissa)
        self.mantissa = nn.Parameter(mantissa.clone())
        self.exponent = nn.Parameter(exponent.clone())

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_real_space(cls, map_real: Tensor, *, symmetry: str = "C1") -> HartleyVolume:
        """Volume representing ``hartley3(map_real)`` exactly (to rounding; with a
        ``symmetry``, its group average).

        The exponent is the log of the radially averaged (RMS) amplitude of each shell and the
        mantissa is ``value / exp(exponent)``. Dtype and device follow ``map_real`` `(L, L, L)`.
        """
        if map_real.ndim != 3 or len(set(map_real.shape)) != 1:
            raise ValueError(f"map_real must be a cube (L, L, L), got {tuple(map_real.shape)}")
        return cls(map_real.shape[-1], init=hartley3(map_real.detach()), symmetry=symmetry)

    @classmethod
    def ab_initio(
        cls,
        box_px: int,
        radial_amplitude: Tensor,
        generator: torch.Generator | None = None,
        *,
        mantissa_scale: float = 1.0,
        symmetry: str = "C1",
    ) -> HartleyVolume:
        """Random volume with the expected power spectrum, for ab initio reconstruction.

        ``exponent(k) = log a(shell(k))`` and ``mantissa ~ mantissa_scale · N(0, 1)``
        independently per voxel, so each shell's mean square equals ``a(r)²`` (for
        ``mantissa_scale = 1``): a random real volume whose radial power matches the data (see
        :func:`radial_amplitude_from_images`), with random phases. Since Adam moves the mantissa
        by about ``lr`` per step, every shell then learns at the same relative rate.

        Parameters
        ----------
        box_px : int
        radial_amplitude : `(R,)`
            Positive amplitude per shell ``r = 0 .. R−1`` (usually ``R = L//2 + 1``); voxels
            with ``round(|k|) ≥ R`` use the last value. Dtype and device of the volume.
        generator : torch.Generator, optional
        mantissa_scale : float
            Standard deviation of the random mantissa.
        symmetry : str
            Point group of the volume (:class:`HartleyVolume`).
        """
        if radial_amplitude.ndim != 1 or radial_amplitude.numel() == 0:
            raise ValueError(
                f"radial_amplitude must be (R,), got {tuple(radial_amplitude.shape)}"
            )
        if not bool(torch.isfinite(radial_amplitude).all() and (radial_amplitude > 0).all()):
            raise ValueError("radial_amplitude must be finite and positive")
        vol = cls(box_px, init_scale=0.0, symmetry=symmetry)
        exponent = _log_amplitude_field(radial_amplitude.detach(), box_px)
        noise = torch.randn(
            box_px, box_px, box_px, generator=generator, dtype=exponent.dtype,
            device=exponent.device if generator is None else generator.device,
        ).to(exponent.device)
        with torch.no_grad():
            vol.mantissa = nn.Parameter(mantissa_scale * noise)
            vol.exponent = nn.Parameter(exponent.clone())
        return vol

    # ------------------------------------------------------------------ evaluation

    def forward(self) -> Tensor:
        """Hartley coefficients ``mantissa · exp(exponent)``, `(L, L, L)`; with a point group,
        their group average ``(1/|G|) Σ_g V(g k)``."""
        values = self.mantissa * self.exponent.exp()
        if self.symmetry_cosets is None or self.symmetry_permutations is None:
            return values
        return symmetrize_volume(values, self.symmetry_cosets, self.symmetry_permutations)

    def slices(self, rotations: Tensor, frequencies: Tensor | None = None) -> Tensor:
        """Central slices of the volume (one interpolation call for the whole batch).

        Parameters
        ----------
        rotations : `(..., 3, 3)`
            Rotations left-multiplying xyz column vectors; the slice samples the volume at
            ``k @ R`` for ``k = (kx, ky, 0)`` (``docs/conventions.md``).
        frequencies : `(P, 2)`, optional
            ``(kx, ky)`` in cycles per box at which to sample (e.g. the loss disc).

        Returns
        -------
        `(..., L, L)` or `(..., P)`
            Hartley coefficients of the slices.
        """
        return extract_central_slices(self(), rotations, frequencies=frequencies)

    def to_real_space(self) -> Tensor:
        """Real-space map `(L, L, L)` (``[z, y, x]``): ``ihartley3`` of the coefficients."""
        return ihartley3(self())

    def extra_repr(self) -> str:
        sym = "" if self.symmetry_cosets is None else f", symmetry={self.point_group}"
        return f"box_px={self.box_px}{sym}"
