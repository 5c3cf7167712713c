"""Sharpening in float64 (``cryospin.evaluate.sharpen``): the B-factor filter against the
closed form on a Gaussian blob, its inverse, the Guinier fit recovering a known slope exactly,
the raised-cosine low-pass, and the whole post-processing finding the B-factor a map was
blurred by."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cryospin.evaluate.fsc import shell_index
from cryospin.evaluate.sharpen import (
    GUINIER_LOW_ANGSTROM,
    MIN_GUINIER_SHELLS,
    Guinier,
    GuinierFit,
    apply_bfactor,
    fit_guinier,
    guinier_plot,
    lowpass,
    postprocess_map,
    shell_amplitudes,
)


def _unit_modulus(box: int, seed: int) -> torch.Tensor:
    """The Hermitian spectrum of real noise with every coefficient's modulus set to 1,
    `(L, L, L)` complex128 (uncentred)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.fft.fftn(torch.randn(box, box, box, generator=g, dtype=torch.float64))
    return f / f.abs()


def _shell_profile_map(box: int, apix: float, intercept: float, slope_a2: float,
                       seed: int) -> torch.Tensor:
    """A real map whose coefficients in shell ``s`` all have modulus
    ``exp(intercept + slope · (s / (L · apix))²)`` (random phases)."""
    s = shell_index(box).to(torch.float64)
    q2 = (s / (box * apix)) ** 2
    return torch.fft.ifftn(_unit_modulus(box, seed) * torch.exp(intercept + slope_a2 * q2)).real


def _gaussian(box: int, sigma_px: float) -> torch.Tensor:
    """A centred 3D Gaussian of standard deviation ``sigma_px`` (unnormalised), `(L, L, L)`."""
    x = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, xx = torch.meshgrid(x, x, x, indexing="ij")
    return torch.exp(-(z * z + y * y + xx * xx) / (2 * sigma_px**2))


@settings(max_examples=20, deadline=None)
@given(box=st.sampled_from([32, 33, 40]), sigma_px=st.floats(1.8, 2.2),
       bfactor_a2=st.floats(10.0, 200.0), apix=st.floats(1.0, 3.0))
def test_bfactor_blurs_a_gaussian_into_the_closed_form_wider_gaussian(
        box: int, sigma_px: float, bfactor_a2: float, apix: float) -> None:
    """``exp(−B q²/4)`` on ``exp(−r²/2σ²)`` (transform ``∝ exp(−2π²σ²q²)``) is the Gaussian
    of ``σ'² = σ² + B / (8π²)`` (in Å²), scaled by ``(σ/σ')³`` (σ' ≤ 2.7 px: the blob's
    wrap-around and its spectrum's aliasing are below 1e-6)."""
    sigma_a = sigma_px * apix
    wider_a = math.sqrt(sigma_a**2 + bfactor_a2 / (8 * math.pi**2))
    out = apply_bfactor(_gaussian(box, sigma_px), bfactor_a2, apix)
    expected = (sigma_a / wider_a) ** 3 * _gaussian(box, wider_a / apix)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@settings(max_examples=20, deadline=None)
@given(box=st.integers(8, 24), bfactor_a2=st.floats(-300.0, 300.0), apix=st.floats(2.0, 4.0),
       seed=st.integers(0, 2**16))
def test_sharpening_undoes_blurring(box: int, bfactor_a2: float, apix: float,
                                    seed: int) -> None:
    """At most ``exp(14)`` of gain at the corners (``|B| q² / 4 ≤ 300 · 3 / 64``)."""
    v = torch.randn(box, box, box, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    back = apply_bfactor(apply_bfactor(v, bfactor_a2, apix), -bfactor_a2, apix)
    torch.testing.assert_close(back, v, atol=1e-8, rtol=0)
    assert apply_bfactor(v.float(), bfactor_a2, apix).dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(box=st.sampled_from([24, 32, 33, 48]), apix=st.floats(0.6, 1.5),
       intercept=st.floats(-3.0, 3.0), bfactor_a2=st.floats(-250.0, 50.0),
       high_angstrom=st.floats(2.5, 5.0), seed=st.integers(0, 2**16))
def test_guinier_fit_recovers_the_slope_of_a_map_built_from_it(
        box: int, apix: float, intercept: float, bfactor_a2: float, high_angstrom: float,
        seed: int) -> None:
    slope = bfactor_a2 / 4.0
    q2_max = 3 * (0.5 / apix) ** 2  # the box's corner
    assume(abs(slope) * q2_max <= 10.0)  # a spectrum within e^10 of its largest coefficient
    v = _shell_profile_map(box, apix, intercept, slope, seed)
    amp = shell_amplitudes(v)
    s = np.arange(box // 2 + 1) / (box * apix)
    expected = np.exp(intercept + slope * s * s)
    # round-off of the FFTs is relative to the largest coefficient (up to e^7 the smallest)
    np.testing.assert_allclose(amp.numpy(), expected, rtol=1e-9, atol=1e-10 * expected.max())
    plot = guinier_plot(v, apix)
    np.testing.assert_allclose(plot.q2_per_a2, s[1:] ** 2, rtol=1e-12)
    high = max(high_angstrom, 2 * apix)  # inside Nyquist
    fit = fit_guinier(plot, low_angstrom=GUINIER_LOW_ANGSTROM, high_angstrom=high)
    q = s[1:]
    tol = 1e-9 * float((q * q).max())  # a shell exactly at a bound is inside (fit_guinier)
    expected_shells = int(((q * q >= 1 / GUINIER_LOW_ANGSTROM**2 - tol)
                           & (q * q <= 1 / high**2 + tol)).sum())
    if expected_shells < MIN_GUINIER_SHELLS:
        assert fit is None
        return
    assert fit is not None and fit.shells == expected_shells
    assert GuinierFit.from_dict(fit.to_dict()) == fit
    # the FFTs' round-off, relative to the largest coefficient, reaches ~1e-9 of the smallest
    # fitted amplitudes' logs: the line to ~1e-7 in intercept and ~1e-6 Å² in slope
    assert fit.slope_a2 == pytest.approx(slope, abs=1e-6)
    assert fit.intercept == pytest.approx(intercept, abs=1e-7)
    assert fit.bfactor_a2 == pytest.approx(bfactor_a2, abs=4e-6)
    if abs(slope) > 1e-3:
        assert abs(fit.correlation) == pytest.approx(1.0, abs=1e-9)
        assert math.copysign(1.0, fit.correlation) == math.copysign(1.0, slope)


def test_guinier_fit_takes_the_shells_in_range_only_and_needs_three() -> None:
    q = np.arange(1, 11) / 20.0  # 1/q: 20, 10, 6.7, 5, 4, 3.3, 2.9, 2.5, 2.2, 2 Å
    y = np.where(q < 0.1, 5.0, -3.0 * q * q)  # shell 1 (20 Å) is far off the line
    y[-1] = -np.inf  # a shell of zero amplitude is left out
    plot = Guinier(q2_per_a2=q * q, log_amplitude=y)
    fit = fit_guinier(plot, low_angstrom=10.0, high_angstrom=2.0)
    assert fit is not None and fit.shells == 8  # 10 Å … 2.2 Å
    assert fit.slope_a2 == pytest.approx(-3.0, abs=1e-12)
    assert fit.intercept == pytest.approx(0.0, abs=1e-12)
    assert fit_guinier(plot, low_angstrom=10.0, high_angstrom=5.0) is not None  # 10, 6.7, 5
    assert fit_guinier(plot, low_angstrom=10.0, high_angstrom=6.0) is None  # two shells
    with pytest.raises(ValueError, match="positive"):
        fit_guinier(plot, low_angstrom=10.0, high_angstrom=0.0)


@pytest.mark.parametrize("box", [24, 31])
def test_lowpass_passes_below_the_edge_halves_at_the_cutoff_and_stops_above(box: int) -> None:
    apix, cutoff = 1.5, 6  # cycles per box: resolution L · apix / 6
    spectrum = _unit_modulus(box, 3)
    v = torch.fft.ifftn(spectrum).real
    out_f = torch.fft.fftn(lowpass(v, box * apix / cutoff, apix))
    k = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    r = torch.sqrt(kz * kz + ky * ky + kx * kx)
    gain = (out_f / spectrum).real
    torch.testing.assert_close(gain[r <= cutoff - 1], torch.ones_like(gain[r <= cutoff - 1]),
                               atol=1e-12, rtol=0)
    assert gain[r >= cutoff + 1].abs().max() < 1e-12
    assert float(gain[0, 0, cutoff]) == pytest.approx(0.5, abs=1e-12)  # |k| = s_c exactly
    between = (r > cutoff - 1) & (r < cutoff + 1)
    assert bool(((gain[between] > -1e-12) & (gain[between] < 1 + 1e-12)).all())
    with pytest.raises(ValueError, match="positive"):
        lowpass(v, 0.0, apix)


def test_postprocessing_finds_the_bfactor_a_map_was_blurred_by() -> None:
    """A flat-spectrum map blurred by B = 120 Å²: the fitted ``B_used`` is close to −120 and
    the sharpened map's Guinier plot is flat over the fitted range."""
    box, apix, blur = 48, 1.0, 120.0
    flat = torch.fft.ifftn(_unit_modulus(box, 5)).real
    blurred = apply_bfactor(flat, blur, apix)
    mask = torch.ones_like(blurred)
    out = postprocess_map(blurred, mask, resolution_angstrom=3.0, pixel_size_angstrom=apix)
    assert out.reason is None and out.fit is not None
    assert out.fit.shells == 12  # shells 5 … 16: 9.6 … 3.0 Å
    assert out.bfactor_a2 == pytest.approx(-blur, rel=0.01)
    assert out.fit.correlation < -0.999
    q2, y = out.sharpened.q2_per_a2, out.sharpened.log_amplitude
    fitted = (q2 >= 1 / 10.0**2) & (q2 <= 1 / 3.5**2)  # below the low-pass edge
    assert float(np.ptp(y[fitted])) < 0.05
    assert out.resolution_angstrom == 3.0
    assert out.volume.dtype == torch.float64


def test_postprocessing_without_a_fit_says_why_and_only_low_passes() -> None:
    box = 24
    v = torch.fft.ifftn(_unit_modulus(box, 7)).real
    mask = torch.ones_like(v)
    coarse = postprocess_map(v, mask, resolution_angstrom=12.0, pixel_size_angstrom=2.0)
    assert coarse.fit is None and coarse.bfactor_a2 == 0.0
    assert "not better than the Guinier fit's low end (10 Å)" in (coarse.reason or "")
    torch.testing.assert_close(coarse.volume, lowpass(v, 12.0, 2.0))
    few = postprocess_map(v, mask, resolution_angstrom=9.0, pixel_size_angstrom=4.0)  # shell 10
    assert few.fit is None and "fewer than 3 shells" in (few.reason or "")
    no_apix = postprocess_map(v, mask, resolution_angstrom=4.0, pixel_size_angstrom=None)
    assert no_apix.fit is None and "no pixel size" in (no_apix.reason or "")
    torch.testing.assert_close(no_apix.volume, lowpass(v, 4.0, 1.0))
    none = postprocess_map(v, mask, resolution_angstrom=math.inf, pixel_size_angstrom=2.0)
    assert none.fit is None and "never reached 0.143" in (none.reason or "")
    assert torch.equal(none.volume, v) and none.resolution_angstrom == math.inf
    with pytest.raises(ValueError, match="mask shape"):
        postprocess_map(v, mask[:-1], resolution_angstrom=4.0, pixel_size_angstrom=2.0)
