"""The background noise spectrum and the whitening filter (:mod:`cryospin.noise_spectrum`),
in float64 against noise of known spectrum."""

from __future__ import annotations

import math

import pytest
import torch
from tests._synthetic import coloured_noise, dft_radius

from cryospin.forward.hartley import hartley2
from cryospin.forward.lattice import disc_frequencies
from cryospin.noise_spectrum import background_noise_spectrum, whitening_filter

F64 = torch.float64


def _outside_circle(L: int) -> torch.Tensor:
    r = torch.arange(L, dtype=F64) - L // 2
    return (r[:, None] ** 2 + r[None, :] ** 2).sqrt() > L / 2


def test_white_noise_gives_a_flat_spectrum_of_l2_times_the_pixel_variance() -> None:
    gen = torch.Generator().manual_seed(0)
    L, m, var = 32, 3000, 2.5
    images = math.sqrt(var) * torch.randn(m, L, L, generator=gen, dtype=F64)
    for iterations in (0, 5):
        spectrum = background_noise_spectrum(images, _outside_circle(L), iterations=iterations)
        assert spectrum.shape == (L // 2 + 1,) and spectrum.dtype == F64
        # the plain periodogram is exact in expectation; the corrections add some scatter
        torch.testing.assert_close(spectrum[1:], torch.full((L // 2,), var * L * L, dtype=F64),
                                   rtol=0.03 if iterations == 0 else 0.06, atol=0)
        assert spectrum[0] == spectrum[1]


@pytest.mark.parametrize("L", [32, 64])
def test_a_steep_coloured_spectrum_is_measured_through_the_background(L) -> None:
    """Noise whose power falls 10x from low to high frequency: the plain periodogram of the
    pixels outside the inscribed circle is blurred (over 20 % low at shell 1); the corrected
    estimate is within 8 % in every shell."""
    gen = torch.Generator().manual_seed(1)
    m = 2000
    radius = dft_radius(L)
    per_pixel = 0.3 + 3.0 * torch.exp(-radius / (L / 8))  # (L, L) on the DFT grid
    images = coloured_noise(m, per_pixel, gen)
    shell = torch.round(radius).long()
    true = torch.stack([(per_pixel * L * L)[shell == s].mean() for s in range(L // 2 + 1)])
    plain = background_noise_spectrum(images, _outside_circle(L), iterations=0)
    assert float(plain[1] / true[1]) < 0.8
    spectrum = background_noise_spectrum(images, _outside_circle(L))
    ratio = spectrum[1:] / true[1:]
    assert float((ratio - 1).abs().max()) < 0.08, ratio


def test_the_expected_periodogram_is_the_monte_carlo_one() -> None:
    """The forward model the corrections invert: the mean-removed background periodogram of
    noise of a known coloured spectrum, against 20,000 draws (within 4 %, ~4 sigma of the
    average of 20,000 squared Gaussians at each of the frequencies compared)."""
    from cryospin.noise_spectrum import _expected_periodogram

    gen = torch.Generator().manual_seed(4)
    L, m = 24, 20000
    per_pixel = 0.3 + 3.0 * torch.exp(-dft_radius(L) / 3.0)
    x = coloured_noise(m, per_pixel, gen)
    mask = _outside_circle(L).to(F64)
    n = float(mask.sum())
    mean = (x * mask).sum(dim=(-2, -1), keepdim=True) / n
    observed = torch.fft.fft2((x - mean) * mask).abs().square().mean(dim=0)
    expected = _expected_periodogram(per_pixel, torch.fft.fft2(mask), n)
    away_from_0 = torch.ones(L, L, dtype=torch.bool)
    away_from_0[0, 0] = False  # the removed mean: 0 in both
    ratio = (observed / expected)[away_from_0]
    assert float((ratio - 1).abs().max()) < 0.04


def test_pixels_outside_the_mask_do_not_change_the_estimate() -> None:
    gen = torch.Generator().manual_seed(2)
    L, m = 24, 50
    bg = _outside_circle(L)
    noise = torch.randn(m, L, L, generator=gen, dtype=F64)
    particle = 100.0 * torch.randn(m, L, L, generator=gen, dtype=F64) * (~bg)
    torch.testing.assert_close(background_noise_spectrum(noise + particle, bg),
                               background_noise_spectrum(noise, bg), rtol=1e-12, atol=0)


def test_the_filter_whitens_coloured_noise_to_the_reference_variance() -> None:
    """Hartley coefficients of coloured noise times w(k): variance ``reference`` in every
    shell of the disc (the model's white noise)."""
    gen = torch.Generator().manual_seed(3)
    L, m = 32, 4000
    s = torch.arange(L // 2 + 1, dtype=F64)
    true = 50.0 * (0.3 + 4.0 * torch.exp(-s / 4.0))
    freqs = disc_frequencies(L, L // 2 - 1).to(F64)  # (P, 2)
    w = whitening_filter(true, freqs, 7.0)  # (P,)
    assert w.shape == (freqs.shape[0],) and w.dtype == F64
    k = torch.round(freqs).long()
    flat = (k[:, 1] + L // 2) * L + (k[:, 0] + L // 2)
    per_pixel = true[torch.round(dft_radius(L)).long().clamp_max(L // 2)] / (L * L)
    hart = hartley2(coloured_noise(m, per_pixel, gen)).reshape(m, L * L)[:, flat]  # (m, P)
    var = (hart * w).square().mean(dim=0)  # (P,)
    shell = torch.round(freqs.norm(dim=-1)).long()
    for sh in range(1, L // 2):
        got = float(var[shell == sh].mean())
        assert got == pytest.approx(7.0, rel=0.08), (sh, got)


def test_the_filter_maps_shells_clamps_and_refuses_bad_values() -> None:
    spectrum = torch.tensor([4.0, 4.0, 1.0, 1e-6, 16.0], dtype=F64)
    freqs = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [3.0, 3.0],
                          [9.0, 0.0]], dtype=F64)  # shells 0, 1, 2, 3, 4, 9 -> 4
    w = whitening_filter(spectrum, freqs, 4.0, max_gain=10.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 2.0, 10.0, 0.5, 0.5], dtype=F64),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="reference_variance"):
        whitening_filter(spectrum, freqs, 0.0)
    with pytest.raises(ValueError, match="max_gain"):
        whitening_filter(spectrum, freqs, 1.0, max_gain=0.5)
    with pytest.raises(ValueError, match="positive"):
        whitening_filter(torch.tensor([1.0, 0.0], dtype=F64), freqs, 1.0)
    with pytest.raises(ValueError, match="fewer than 2"):
        background_noise_spectrum(torch.zeros(2, 8, 8, dtype=F64),
                                  torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="background mask"):
        background_noise_spectrum(torch.zeros(2, 8, 8, dtype=F64),
                                  torch.ones(6, 6, dtype=torch.bool))
