"""Centred Fourier and Hartley transforms of images and volumes.

Convention (see ``docs/conventions.md``): ``F = fftshift(fftn(ifftshift(x)))`` over the last 2
(images, ``[y, x]``) or 3 (volumes, ``[z, y, x]``) axes, unnormalised forward and ``1/N``
inverse; real-space origin and DC both at index ``L//2``. The Hartley transform of a real array
is ``H = Re F − Im F``; it is its own inverse up to ``1/N``. Every function follows the input
dtype, never mutates its input and keeps autograd intact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "fft2_centered",
    "ifft2_centered",
    "fft3_centered",
    "ifft3_centered",
    "hartley2",
    "ihartley2",
    "hartley3",
    "ihartley3",
    "negate_frequency",
    "fourier_from_hartley",
    "hartley_from_fourier",
]


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def _check_ndim(x: Tensor, ndim: int) -> None:
    if x.ndim < ndim:
        raise ValueError(f"expected at least {ndim} dimensions, got shape {tuple(x.shape)}")


def _fftc(x: Tensor, ndim: int) -> Tensor:
    _check_ndim(x, ndim)
    d = _dims(ndim)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=d), dim=d), dim=d)


def _ifftc(F: Tensor, ndim: int) -> Tensor:
    _check_ndim(F, ndim)
    d = _dims(ndim)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(F, dim=d), dim=d), dim=d)


def fft2_centered(x: Tensor) -> Tensor:
    """Centred 2D FFT over the last two axes: `(..., L, L)` -> complex `(..., L, L)`."""
    return _fftc(x, 2)


def ifft2_centered(F: Tensor) -> Tensor:
    """Inverse of :func:`fft2_centered` (``1/N`` normalised); returns a complex tensor."""
    return _ifftc(F, 2)


def fft3_centered(x: Tensor) -> Tensor:
    """Centred 3D FFT over the last three axes: `(..., L, L, L)` -> complex `(..., L, L, L)`."""
    return _fftc(x, 3)


def ifft3_centered(F: Tensor) -> Tensor:
    """Inverse of :func:`fft3_centered` (``1/N`` normalised); returns a complex tensor."""
    return _ifftc(F, 3)


def _hartley(x: Tensor, ndim: int) -> Tensor:
    if x.is_complex():
        raise ValueError("the Hartley transform takes a real tensor, got a complex one")
    F = _fftc(x, ndim)
    return F.real - F.imag


def _numel_last(x: Tensor, ndim: int) -> int:
    return math.prod(x.shape[-ndim:])


def hartley2(x: Tensor) -> Tensor:
    """Centred 2D Hartley transform ``Re F − Im F``: real `(..., L, L)` -> real `(..., L, L)`."""
    return _hartley(x, 2)


def ihartley2(h: Tensor) -> Tensor:
    """Inverse of :func:`hartley2`: ``hartley2(h) / L²``, real `(..., L, L)`."""
    return _hartley(h, 2) / _numel_last(h, 2)


def hartley3(x: Tensor) -> Tensor:
    """Centred 3D Hartley transform: real `(..., L, L, L)` -> real `(..., L, L, L)`."""
    return _hartley(x, 3)


def ihartley3(h: Tensor) -> Tensor:
    """Inverse of :func:`hartley3`: ``hartley3(h) / L³``, real `(..., L, L, L)`."""
    return _hartley(h, 3) / _numel_last(h, 3)


def negate_frequency(h: Tensor, ndim: int) -> Tensor:
    """Values at ``−k`` on the centred grid, over the last ``ndim`` axes.

    Output index ``i`` holds input index ``(L − i) mod L`` for even ``L`` (the Nyquist index 0
    maps to itself) and ``L − 1 − i`` for odd ``L``, independently along each axis.

    Parameters
    ----------
    h : `(..., L, ..., L)`
        Any tensor on the centred grid (real or complex; no conjugation is applied).
    ndim : int
        Number of trailing grid axes (2 for images, 3 for volumes).
    """
    _check_ndim(h, ndim)
    out = h
    for d in _dims(ndim):
        out = torch.flip(out, dims=(d,))
        if h.shape[d] % 2 == 0:
            out = torch.roll(out, shifts=1, dims=d)
    return out


def fourier_from_hartley(h: Tensor, ndim: int) -> Tensor:
    """Centred Fourier transform of a real signal from its Hartley transform.

    ``Re F(k) = (H(k) + H(−k)) / 2`` and ``Im F(k) = (H(−k) − H(k)) / 2``; real `(..., L^ndim)`
    -> complex of the same shape.
    """
    hn = negate_frequency(h, ndim)
    return torch.complex((h + hn) / 2, (hn - h) / 2)


def hartley_from_fourier(F: Tensor) -> Tensor:
    """Hartley transform ``Re F − Im F`` from a (centred) Fourier transform; any shape."""
    return F.real - F.imag
