"""Properties of Fourier crop/pad (float64): constants kept, adjointness, band-limited round
trips."""

from __future__ import annotations

import pytest
import torch

from cryospin.forward.hartley import fft2_centered, ifft2_centered
from cryospin.forward.resample import (
    fourier_crop_2d,
    fourier_crop_3d,
    fourier_pad_2d,
    fourier_pad_3d,
)

SIZES = [(16, 8), (16, 9), (15, 8), (15, 7), (12, 12), (9, 4)]


@pytest.mark.parametrize(("big", "small"), SIZES)
def test_constant_image_stays_constant(big: int, small: int) -> None:
    x = torch.full((3, big, big), 2.5, dtype=torch.float64)
    torch.testing.assert_close(fourier_crop_2d(x, small), torch.full((3, small, small), 2.5,
                                                                     dtype=torch.float64))
    y = torch.full((small, small), -1.25, dtype=torch.float64)
    torch.testing.assert_close(fourier_pad_2d(y, big), torch.full((big, big), -1.25,
                                                                  dtype=torch.float64))


@pytest.mark.parametrize(("big", "small"), [(10, 6), (9, 5), (8, 5)])
def test_constant_volume_stays_constant(big: int, small: int) -> None:
    x = torch.full((big, big, big), 0.75, dtype=torch.float64)
    torch.testing.assert_close(fourier_crop_3d(x, small), torch.full((small,) * 3, 0.75,
                                                                     dtype=torch.float64))
    torch.testing.assert_close(fourier_pad_3d(fourier_crop_3d(x, small), big), x)


@pytest.mark.parametrize(("big", "small"), SIZES)
def test_pad_is_scaled_adjoint_of_crop_2d(big: int, small: int) -> None:
    g = torch.Generator().manual_seed(big * 100 + small)
    x = torch.randn(4, big, big, generator=g, dtype=torch.float64)
    y = torch.randn(4, small, small, generator=g, dtype=torch.float64)
    lhs = (fourier_crop_2d(x, small) * y).sum()
    rhs = (small / big) ** 2 * (x * fourier_pad_2d(y, big)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("big", "small"), [(10, 6), (9, 5), (8, 5), (7, 4)])
def test_pad_is_scaled_adjoint_of_crop_3d(big: int, small: int) -> None:
    g = torch.Generator().manual_seed(big * 100 + small)
    x = torch.randn(big, big, big, generator=g, dtype=torch.float64)
    y = torch.randn(small, small, small, generator=g, dtype=torch.float64)
    lhs = (fourier_crop_3d(x, small) * y).sum()
    rhs = (small / big) ** 3 * (x * fourier_pad_3d(y, big)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("big", "small"), [(16, 9), (15, 7), (12, 5)])
def test_crop_of_pad_is_identity_for_odd_small_box(big: int, small: int) -> None:
    y = torch.randn(2, small, small, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    torch.testing.assert_close(fourier_crop_2d(fourier_pad_2d(y, big), small), y)


@pytest.mark.parametrize(("big", "small"), [(16, 8), (15, 8), (11, 6)])
def test_crop_of_pad_is_identity_without_nyquist_content(big: int, small: int) -> None:
    z = torch.randn(2, small, small, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    F = fft2_centered(z)
    F[..., 0, :] = 0  # Nyquist row and column of the even box (self-paired under k -> -k)
    F[..., :, 0] = 0
    y = ifft2_centered(F).real
    torch.testing.assert_close(fourier_crop_2d(fourier_pad_2d(y, big), small), y)


def test_crop_keeps_low_frequencies_and_follows_dtype() -> None:
    x = torch.randn(20, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = fourier_crop_2d(x, 11)
    Fx, Fc = fft2_centered(x), fft2_centered(c)
    # frequencies -5..5 of the big grid (DC at 10) = all of the small grid (DC at 5), x (11/20)^2
    torch.testing.assert_close(Fc, Fx[5:16, 5:16] * (11 / 20) ** 2)
    assert fourier_crop_2d(x.float(), 11).dtype == torch.float32
    assert c.dtype == torch.float64


def test_invalid_boxes_raise() -> None:
    x = torch.zeros(8, 8)
    with pytest.raises(ValueError):
        fourier_crop_2d(x, 9)
    with pytest.raises(ValueError):
        fourier_pad_2d(x, 7)
    with pytest.raises(ValueError):
        fourier_crop_2d(torch.zeros(8, 6), 4)
