"""In-plane translations of images, applied in Hartley or Fourier space.

Convention (see ``docs/conventions.md``): ``shift_px = (tx, ty)`` in pixels gives the image
``image(r) = P(r − t)`` of a centred projection ``P``; in Fourier space
``F'(k) = F(k) · exp(−2πi k·t / L)`` with ``k`` in cycles per box. For a real image with Hartley
transform ``H``, writing ``θ = 2π k·t / L``,

    H'(k) = H(k) cos θ + H(−k) sin θ.

(Derivation: ``F' = (a + ib)(cos θ − i sin θ)`` with ``a = Re F``, ``b = Im F``, so
``Re F' − Im F' = (a − b) cos θ + (a + b) sin θ``, and ``a + b = H(−k)`` because
``F(−k) = conj F(k)``.) The shift by ``−t`` is the adjoint (and inverse) of the shift by ``t``
on any frequency set closed under ``k → −k``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryospin.forward.hartley import negate_frequency
from cryospin.forward.lattice import frequency_grid_2d

__all__ = ["shift_hartley", "shift_hartley_grid", "phase_shift_fourier"]


def _check_shift(shift_px: Tensor) -> None:
    if shift_px.ndim < 1 or shift_px.shape[-1] != 2:
        raise ValueError(f"shift_px must have shape (..., 2), got {tuple(shift_px.shape)}")


def _phase(shift_px: Tensor, frequencies: Tensor, box_px: int) -> Tensor:
    """``θ = 2π k·t / L`` `(..., P)` for shifts `(..., 2)` and frequencies `(P, 2)`."""
    return (shift_px[..., None, :] * frequencies).sum(-1) * (2 * math.pi / box_px)


def shift_hartley(
    h: Tensor, h_neg: Tensor, shift_px: Tensor, frequencies: Tensor, box_px: int
) -> Tensor:
    """Translate images given by Hartley samples: ``H(k) cos θ + H(−k) sin θ``.

    Parameters
    ----------
    h, h_neg : `(..., P)`
        Hartley values at the frequencies ``k`` and at ``−k``.
    shift_px : `(..., 2)`
        ``(tx, ty)`` in pixels; realises ``image(r) = P(r − t)``.
    frequencies : `(P, 2)`
        ``(kx, ky)`` in cycles per box.
    box_px : int
        Box size ``L``.

    Returns
    -------
    `(...)` broadcast of ``h`` and ``shift_px[..., 0]``, then `(P,)`
        Hartley values of the shifted image at ``k``.
    """
    _check_shift(shift_px)
    theta = _phase(shift_px.to(h.dtype), frequencies.to(dtype=h.dtype, device=h.device), box_px)
    return h * torch.cos(theta) + h_neg * torch.sin(theta)


def shift_hartley_grid(h: Tensor, shift_px: Tensor) -> Tensor:
    """Translate images given by their full centred Hartley transform.

    Parameters
    ----------
    h : `(..., L, L)`
        Centred 2D Hartley transforms.
    shift_px : `(..., 2)`
        ``(tx, ty)`` in pixels, broadcast against ``h.shape[:-2]``.

    Returns
    -------
    `(..., L, L)`
        Hartley transform of ``image(r) = P(r − t)``. For even ``L`` and non-integer shifts the
        Nyquist row/column is treated periodically (``−L/2 ≡ L/2``), as by
        :func:`~cryospin.forward.hartley.negate_frequency`.
    """
    if h.ndim < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"h must have shape (..., L, L), got {tuple(h.shape)}")
    L = int(h.shape[-1])
    freqs = frequency_grid_2d(L, dtype=h.dtype, device=h.device).reshape(L * L, 2)
    h_neg = negate_frequency(h, 2)
    flat = h.reshape(*h.shape[:-2], L * L)  # (..., L*L)
    flat_neg = h_neg.reshape(*h.shape[:-2], L * L)
    out = shift_hartley(flat, flat_neg, shift_px, freqs, L)
    return out.reshape(*out.shape[:-1], L, L)


def phase_shift_fourier(F: Tensor, shift_px: Tensor) -> Tensor:
    """Translate images given by their centred Fourier transform: ``F(k) exp(−2πi k·t / L)``.

    Parameters
    ----------
    F : complex `(..., L, L)`
    shift_px : `(..., 2)`
        ``(tx, ty)`` in pixels.

    Returns
    -------
    complex `(..., L, L)`
    """
    if F.ndim < 2 or F.shape[-1] != F.shape[-2]:
        raise ValueError(f"F must have shape (..., L, L), got {tuple(F.shape)}")
    _check_shift(shift_px)
    L = int(F.shape[-1])
    real_dtype = F.real.dtype if F.is_complex() else F.dtype
    freqs = frequency_grid_2d(L, dtype=real_dtype, device=F.device).reshape(L * L, 2)
    theta = _phase(shift_px.to(real_dtype), freqs, L)  # (..., L*L)
    theta = theta.reshape(*theta.shape[:-1], L, L)
    return F * torch.polar(torch.ones_like(theta), -theta)
