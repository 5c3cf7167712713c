"""HEALPix (RING scheme) pixel centres and the view posterior of an image.

HEALPix: 12·nside² pixels, the known nside = 1 centres, ``ang2pix`` inverts the centres, equal
areas (uniform random directions fill the pixels evenly). Posterior: normalised, and for a
noiseless image of a known volume it peaks at the true view direction.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests._synthetic import blob_volume

from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import hartley3
from cryospin.forward.lattice import disc_frequencies, negation_permutation
from cryospin.forward.model import render
from cryospin.healpix import healpix_ang2pix, healpix_npix, healpix_pixel_centres, healpix_vectors
from cryospin.posterior import log_posterior_views, view_rotations
from cryospin.rotations import random_rotations

# ----------------------------------------------------------------------------- HEALPix


@pytest.mark.parametrize("nside", [1, 2, 3, 4, 8])
def test_pixel_count_and_unit_vectors(nside):
    theta, phi = healpix_pixel_centres(nside)
    assert healpix_npix(nside) == 12 * nside**2 == theta.shape[0] == phi.shape[0]
    v = healpix_vectors(nside)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-15)
    assert np.all((theta > 0) & (theta < math.pi)) and np.all((phi >= 0) & (phi < 2 * math.pi))
    # RING order: colatitude never decreases; the rings are symmetric about the equator
    assert np.all(np.diff(theta) >= -1e-12)
    np.testing.assert_allclose(np.sort(np.cos(theta)), np.sort(-np.cos(theta)), atol=1e-12)
    assert len(np.unique(np.round(np.cos(theta), 12))) == 4 * nside - 1  # rings


def test_nside_1_centres_are_the_known_values():
    theta, phi = healpix_pixel_centres(1)
    t_north, t_south = math.acos(2 / 3), math.acos(-2 / 3)
    expected_theta = [t_north] * 4 + [math.pi / 2] * 4 + [t_south] * 4
    q = math.pi / 4
    expected_phi = [q, 3 * q, 5 * q, 7 * q, 0, 2 * q, 4 * q, 6 * q, q, 3 * q, 5 * q, 7 * q]
    np.testing.assert_allclose(theta, expected_theta, atol=1e-14)
    np.testing.assert_allclose(phi, expected_phi, atol=1e-14)


def test_nside_2_first_ring():
    # polar cap ring 1 of nside 2: 4 pixels at z = 1 − 1/12, φ = π/4 + k π/2
    theta, phi = healpix_pixel_centres(2)
    np.testing.assert_allclose(np.cos(theta[:4]), 1 - 1 / 12, atol=1e-14)
    np.testing.assert_allclose(phi[:4], np.pi / 4 + np.arange(4) * np.pi / 2, atol=1e-14)
    # first equatorial ring (i = nside = 2): 8 pixels at z = 2/3, offset ½ (i + nside even)
    np.testing.assert_allclose(np.cos(theta[4:12]), 2 / 3, atol=1e-14)
    np.testing.assert_allclose(phi[4:12], (np.arange(1, 9) - 0.5) * np.pi / 4, atol=1e-14)


@pytest.mark.parametrize("nside", [1, 2, 3, 4, 5, 8, 16])
def test_ang2pix_finds_each_centre(nside):
    theta, phi = healpix_pixel_centres(nside)
    np.testing.assert_array_equal(healpix_ang2pix(nside, theta, phi),
                                  np.arange(healpix_npix(nside)))


@pytest.mark.parametrize("nside", [1, 2, 3, 4])
def test_pixels_have_equal_areas(nside):
    """Monte Carlo: uniform directions fall evenly in the pixels (Poisson, 5 sigma)."""
    rng = np.random.default_rng(12)
    v = rng.normal(size=(400_000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pix = healpix_ang2pix(nside, np.arccos(v[:, 2]), np.arctan2(v[:, 1], v[:, 0]))
    counts = np.bincount(pix, minlength=healpix_npix(nside))
    expected = v.shape[0] / healpix_npix(nside)
    assert counts.shape == (healpix_npix(nside),)
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)
    # and a point lands in the pixel whose centre is nearest when it is close to that centre
    centres = healpix_vectors(nside)
    near = np.argmax(v[:2000] @ centres.T, axis=1)
    assert np.mean(near == pix[:2000]) > 0.8


def test_bad_nside():
    with pytest.raises(ValueError, match="nside"):
        healpix_npix(0)
    with pytest.raises(ValueError, match="nside"):
        healpix_pixel_centres(2.5)


# ----------------------------------------------------------------------------- posterior


def _blob_hartley_volume(L: int) -> torch.Tensor:
    return hartley3(blob_volume(L, torch.Generator().manual_seed(0), variance_px2=1.5))


def _ctf(L: int) -> torch.Tensor:
    f64 = {"dtype": torch.float64}
    one = torch.ones(1, **f64)
    params = CTFParams(
        defocus_u_angstrom=12000.0 * one, defocus_v_angstrom=11000.0 * one,
        defocus_angle_deg=30.0 * one, voltage_kv=300.0 * one, cs_mm=2.7 * one,
        amplitude_contrast=0.1 * one, phase_shift_deg=0.0 * one, bfactor_a2=0.0 * one,
    )
    return compute_ctf(params, L, 4.0, frequencies=disc_frequencies(L).double())[0]  # (P,)


def test_view_rotations_have_the_directions_as_third_rows():
    dirs = torch.from_numpy(healpix_vectors(2))
    psi = torch.linspace(0, 2 * math.pi, 7, dtype=torch.float64)[:-1]
    R = view_rotations(dirs, psi)
    assert R.shape == (48, 6, 3, 3) and R.dtype == torch.float64
    torch.testing.assert_close(R[..., 2, :], dirs[:, None].expand(48, 6, 3), atol=1e-12,
                               rtol=0)
    eye = torch.eye(3, dtype=torch.float64).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(48, 6, dtype=torch.float64))


def test_noiseless_image_on_the_grid_peaks_at_its_pixel():
    L, nside, steps = 16, 4, 24
    vol = _blob_hartley_volume(L)
    freqs = disc_frequencies(L).double()
    neg = negation_permutation(freqs, L)
    dirs = torch.from_numpy(healpix_vectors(nside))
    ctf, shift = _ctf(L), torch.tensor([0.6, -0.4], dtype=torch.float64)
    psi = torch.arange(steps, dtype=torch.float64) * (2 * math.pi / steps)
    for pixel, s in ((37, 5), (100, 17)):
        R = view_rotations(dirs[pixel : pixel + 1], psi[s : s + 1])[0, 0]
        image = render(vol, R, shift, ctf, frequencies=freqs, negation_index=neg)  # (P,)
        logp = log_posterior_views(vol, image, 0.05 * L * L, freqs, dirs, psi_steps=steps,
                                   ctf=ctf, shift_px=shift, negation_index=neg)
        assert logp.shape == (healpix_npix(nside),) and logp.dtype == torch.float64
        assert float(torch.logsumexp(logp, 0)) == pytest.approx(0.0, abs=1e-9)
        assert int(logp.argmax()) == pixel


def test_noiseless_image_off_grid_peaks_near_the_true_direction():
    L, nside = 16, 4
    vol = _blob_hartley_volume(L)
    freqs = disc_frequencies(L).double()
    dirs = torch.from_numpy(healpix_vectors(nside))
    spacing_deg = math.degrees(math.sqrt(4 * math.pi / healpix_npix(nside)))  # ≈ 14.7°
    for R in random_rotations(4, generator=torch.Generator().manual_seed(5)):
        image = render(vol, R, None, None, frequencies=freqs)
        logp = log_posterior_views(vol, image, 0.05 * L * L, freqs, dirs, psi_steps=36)
        best = dirs[int(logp.argmax())]
        angle = math.degrees(math.acos(min(1.0, float(best @ R[2]))))
        assert angle < spacing_deg, angle
        # nearly all the posterior mass lies within two pixel spacings of the truth
        near = torch.rad2deg(torch.acos((dirs @ R[2]).clamp(-1, 1))) < 2 * spacing_deg
        assert float(logp[near].exp().sum()) > 0.99


def test_huge_noise_gives_a_flat_posterior():
    L = 16
    vol = _blob_hartley_volume(L)
    freqs = disc_frequencies(L).double()
    dirs = torch.from_numpy(healpix_vectors(2))
    image = render(vol, torch.eye(3, dtype=torch.float64), None, None, frequencies=freqs)
    logp = log_posterior_views(vol, image, 1e12, freqs, dirs, psi_steps=8)
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(48)), atol=1e-6, rtol=0)
