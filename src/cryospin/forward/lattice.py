"""Frequency lattices of the centred grid, the loss disc and the negation of frequencies.

Convention (see ``docs/conventions.md``): index ``i`` along an axis of length ``L`` has frequency
``k = i − L//2`` in cycles per box; images are indexed ``[y, x]`` and volumes ``[z, y, x]``, while
frequency vectors are written in xyz order ``(kx, ky[, kz])``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "frequency_grid_2d",
    "frequency_grid_3d",
    "disc_mask",
    "disc_frequencies",
    "disc_indices",
    "negation_permutation",
]


def _axis(L: int, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    if L < 1:
        raise ValueError(f"box size must be a positive integer, got {L}")
    return torch.arange(L, dtype=dtype, device=device) - (L // 2)


def _default_radius(L: int, radius: float | None) -> float:
    return float(L // 2 - 1) if radius is None else float(radius)


def frequency_grid_2d(
    L: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """Frequencies of the centred ``L × L`` grid.

    Returns
    -------
    `(L, L, 2)`
        ``[..., 0] = kx`` (varies along the last axis, x), ``[..., 1] = ky`` (along rows, y),
        in cycles per box; ``[i, j] = (j − L//2, i − L//2)``.
    """
    k = _axis(L, dtype, device)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([kx, ky], dim=-1)  # (L, L, 2)


def frequency_grid_3d(
    L: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """Frequencies of the centred ``L × L × L`` grid.

    Returns
    -------
    `(L, L, L, 3)`
        ``[i, j, l] = (l − L//2, j − L//2, i − L//2) = (kx, ky, kz)`` for a volume indexed
        ``[z, y, x]``, in cycles per box.
    """
    k = _axis(L, dtype, device)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.stack([kx, ky, kz], dim=-1)  # (L, L, L, 3)


def disc_mask(
    L: int, radius: float | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Boolean `(L, L)` mask of the centred grid, True where ``|k| ≤ radius``.

    ``radius`` is in cycles per box; default ``L//2 − 1`` (the loss disc of
    ``docs/conventions.md``). The disc is symmetric under ``k → −k``.
    """
    r = _default_radius(L, radius)
    k = _axis(L, torch.int64, device)
    k2 = k[:, None] ** 2 + k[None, :] ** 2  # (L, L) integer |k|²
    return k2.to(torch.float64) <= r * r


def disc_indices(
    L: int, radius: float | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Flat indices `(P,)` (int64) of the disc pixels in a row-major ``[y, x]`` ``L × L`` image.

    ``image.reshape(..., L * L)[..., disc_indices(L)]`` gathers the disc values in the same order
    as :func:`disc_frequencies`.
    """
    return torch.nonzero(disc_mask(L, radius, device).reshape(-1), as_tuple=False).squeeze(-1)


def disc_frequencies(
    L: int,
    radius: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Frequencies `(P, 2)` ``(kx, ky)`` in cycles per box of the disc pixels, row-major order."""
    grid = frequency_grid_2d(L, dtype=dtype, device=device).reshape(L * L, 2)
    return grid[disc_indices(L, radius, device)]


def negation_permutation(frequencies: Tensor, box_px: int | None = None) -> Tensor:
    """Index `(P,)` such that ``frequencies[perm[p]] == −frequencies[p]``.

    Values at ``−k`` of a set of samples ``h`` `(..., P)` are then ``h[..., perm]``.

    Parameters
    ----------
    frequencies : `(P, d)`
        Integer-valued frequencies in cycles per box (e.g. :func:`disc_frequencies`).
    box_px : int, optional
        When given, frequencies are compared modulo ``box_px`` (periodic grid), so the Nyquist
        frequency ``−L/2`` of an even box is its own negative, as in
        :func:`cryospin.forward.hartley.negate_frequency`.

    Raises
    ------
    ValueError
        If the frequencies are not integers or the set is not closed under negation.
    """
    if frequencies.ndim != 2:
        raise ValueError(f"frequencies must have shape (P, d), got {tuple(frequencies.shape)}")
    k = torch.round(frequencies.detach()).to(torch.int64)
    if not torch.equal(k.to(frequencies.dtype), frequencies.detach()):
        raise ValueError("negation_permutation needs integer-valued frequencies")
    kn = -k
    if box_px is not None:
        half = box_px // 2
        k = torch.remainder(k + half, box_px) - half
        kn = torch.remainder(kn + half, box_px) - half
    off = int(max(k.abs().max().item(), kn.abs().max().item())) if k.numel() else 0
    base = 2 * off + 1
    weights = base ** torch.arange(k.shape[1] - 1, -1, -1, device=k.device)
    key = ((k + off) * weights).sum(-1)  # (P,) unique code of each frequency
    key_neg = ((kn + off) * weights).sum(-1)
    order = torch.argsort(key)
    sorted_key = key[order]
    pos = torch.searchsorted(sorted_key, key_neg).clamp_max(max(len(key) - 1, 0))
    if len(key) and not torch.equal(sorted_key[pos], key_neg):
        raise ValueError("the frequency set is not closed under negation k -> -k")
    return order[pos]
