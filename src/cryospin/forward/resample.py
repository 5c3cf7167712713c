"""Fourier cropping and padding of images and volumes (change the box, hence the pixel size).

Convention (see ``docs/conventions.md``): centred FFT, DC and real-space origin at index
``L//2``. Cropping a box ``L`` to ``L' < L`` keeps the frequencies ``k = −L'//2 … (L'−1)//2``
(cycles per box), so the pixel size grows to ``pixel_size · L / L'`` and the content beyond
the new Nyquist frequency is discarded; padding inserts zeros at the new frequencies
(band-limited, sinc interpolation).

Scaling: both keep **values** (not sums): an image of constant value ``c`` stays ``c`` (the
transform is multiplied by ``(L'/L)^d`` with ``d = 2`` for images, ``3`` for volumes), so
densities and pixel statistics are comparable across boxes.

Real output: the kept spectrum of a real array is Hermitian except, for an even new box, on
the Nyquist row/column ``k = −L'/2`` whose partner ``+L'/2`` is not on the new grid; the real
part of the inverse transform is returned (this keeps ``Re F`` there). With this choice

    ⟨crop(x), y⟩ = (L'/L)^d · ⟨x, pad(y)⟩      (real inner products),

i.e. :func:`fourier_pad_2d` is the adjoint of :func:`fourier_crop_2d` times ``(L/L')^d``
(tested in float64). ``crop(pad(y)) = y`` exactly when ``L'`` is odd, and for even ``L'`` for
every ``y`` whose Nyquist row and column carry no signal.

All functions follow the input dtype/device, never mutate the input, keep autograd intact and
accept any leading batch dimensions.
"""

from __future__ import annotations

from torch import Tensor

from cryospin.forward.hartley import fft2_centered, fft3_centered, ifft2_centered, ifft3_centered

__all__ = ["fourier_crop_2d", "fourier_pad_2d", "fourier_crop_3d", "fourier_pad_3d"]


def _box(x: Tensor, ndim: int, what: str) -> int:
    if x.ndim < ndim:
        raise ValueError(f"{what} needs at least {ndim} dimensions, got shape {tuple(x.shape)}")
    sides = set(x.shape[-ndim:])
    if len(sides) != 1:
        raise ValueError(f"{what} needs a square/cubic box, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{what} takes a real tensor")
    return int(x.shape[-1])


def _window(big: int, small: int) -> slice:
    """Indices of the small centred grid inside the big one (both with DC at ``L//2``)."""
    start = big // 2 - small // 2
    return slice(start, start + small)


def _crop(x: Tensor, new_box: int, ndim: int) -> Tensor:
    L = _box(x, ndim, "fourier_crop")
    new_box = int(new_box)
    if not 1 <= new_box <= L:
        raise ValueError(f"crop needs 1 <= new_box <= {L}, got {new_box}")
    if new_box == L:
        return x.clone()
    fft, ifft = (fft2_centered, ifft2_centered) if ndim == 2 else (fft3_centered, ifft3_centered)
    w = _window(L, new_box)
    F = fft(x)
    Fc = F[..., w, w] if ndim == 2 else F[..., w, w, w]  # (..., L', L'[, L'])
    return ifft(Fc).real * (new_box / L) ** ndim


def _pad(x: Tensor, new_box: int, ndim: int) -> Tensor:
    L = _box(x, ndim, "fourier_pad")
    new_box = int(new_box)
    if new_box < L:
        raise ValueError(f"pad needs new_box >= {L}, got {new_box}")
    if new_box == L:
        return x.clone()
    fft, ifft = (fft2_centered, ifft2_centered) if ndim == 2 else (fft3_centered, ifft3_centered)
    w = _window(new_box, L)
    F = fft(x)
    G = F.new_zeros((*F.shape[:-ndim], *([new_box] * ndim)))
    if ndim == 2:
        G[..., w, w] = F
    else:
        G[..., w, w, w] = F
    return ifft(G).real * (new_box / L) ** ndim


def fourier_crop_2d(images: Tensor, new_box: int) -> Tensor:
    """Fourier-crop images `(..., L, L)` to `(..., L', L')`, ``L' = new_box <= L``.

    The pixel size becomes ``pixel_size · L / L'``. Constant images keep their value.
    """
    return _crop(images, new_box, 2)


def fourier_pad_2d(images: Tensor, new_box: int) -> Tensor:
    """Fourier-pad (band-limited upsampling) images `(..., L, L)` to `(..., L', L')`, ``L' >= L``.

    ``(L'/L)²``-scaled adjoint of :func:`fourier_crop_2d` from ``L'`` to ``L``; constants stay.
    """
    return _pad(images, new_box, 2)


def fourier_crop_3d(volume: Tensor, new_box: int) -> Tensor:
    """Fourier-crop volumes `(..., L, L, L)` (``[z, y, x]``) to `(..., L', L', L')`."""
    return _crop(volume, new_box, 3)


def fourier_pad_3d(volume: Tensor, new_box: int) -> Tensor:
    """Fourier-pad volumes `(..., L, L, L)` to `(..., L', L', L')`; adjoint of the crop ×
    ``(L'/L)³``."""
    return _pad(volume, new_box, 3)
