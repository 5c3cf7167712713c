"""Known-pose backprojection on data simulated by real-space projection (not the slicer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryospin.backproject import backproject
from cryospin.evaluate.fsc import fsc
from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import fft2_centered, hartley2, ifft2_centered, ihartley2
from cryospin.forward.shifts import shift_hartley_grid
from cryospin.half_sets import half_set_assignment
from cryospin.rotations import random_rotations
from cryospin.simulate import atoms_to_volume, project_map, upsample_map_for_projection

L, N, APIX = 24, 400, 3.0


@pytest.fixture(scope="module")
def dataset() -> dict:
    g = torch.Generator().manual_seed(0)
    positions = torch.randn(40, 3, generator=g, dtype=torch.float64) * 3.0
    volume = atoms_to_volume(positions, torch.ones(40, dtype=torch.float64), L, 1.0)
    R = random_rotations(N, generator=g)
    up = upsample_map_for_projection(volume, 2)
    clean = torch.cat([project_map(up, R[i : i + 200], L) for i in range(0, N, 200)])
    u = torch.rand(N, generator=g, dtype=torch.float64)
    n64 = lambda v: torch.full((N,), v, dtype=torch.float64)  # noqa: E731
    ctf = CTFParams(
        defocus_u_angstrom=10000 + 15000 * u, defocus_v_angstrom=9800 + 15000 * u,
        defocus_angle_deg=360 * torch.rand(N, generator=g, dtype=torch.float64),
        voltage_kv=n64(300.0), cs_mm=n64(2.7), amplitude_contrast=n64(0.1),
        phase_shift_deg=n64(0.0), bfactor_a2=n64(0.0),
    )
    ctf_images = ifft2_centered(fft2_centered(clean) * compute_ctf(ctf, L, APIX)).real
    shifts = torch.randn(N, 2, generator=g, dtype=torch.float64) * 1.5
    shifted = ihartley2(shift_hartley_grid(hartley2(clean), shifts))  # image(r) = P(r - t)
    return {"volume": volume, "R": R, "clean": clean, "ctf": ctf, "ctf_images": ctf_images,
            "shifts": shifts, "shifted": shifted, "gen": g}


@pytest.fixture(scope="module")
def plain_result(dataset):
    return backproject(dataset["clean"], dataset["R"], pixel_size_angstrom=APIX)


def _fsc_to_gt(result, volume) -> np.ndarray:
    return fsc(result.volume, volume).fsc


def test_noise_free_reconstruction_matches_ground_truth(dataset, plain_result) -> None:
    res = plain_result
    curve = _fsc_to_gt(res, dataset["volume"])
    # FSC against the truth above 0.9 up to 0.9 Nyquist (shell 10 of 12)
    assert curve[: int(0.9 * (L // 2)) + 1].min() > 0.9, curve
    assert res.volume.shape == res.half_a.shape == res.half_b.shape == (L, L, L)
    # noise-free half maps agree
    assert res.fsc.fsc[1:11].min() > 0.9


def test_ctf_correction(dataset, plain_result) -> None:
    plain = _fsc_to_gt(plain_result, dataset["volume"])
    res = backproject(dataset["ctf_images"], dataset["R"], None, dataset["ctf"],
                      pixel_size_angstrom=APIX)
    with_ctf = _fsc_to_gt(res, dataset["volume"])
    shells = slice(1, int(0.9 * (L // 2)) + 1)
    assert with_ctf[shells].min() > 0.9, with_ctf
    np.testing.assert_allclose(with_ctf[shells], plain[shells], atol=0.03)
    # ignoring the CTF is much worse: proves the correction does the work
    uncorrected = _fsc_to_gt(backproject(dataset["ctf_images"], dataset["R"]), dataset["volume"])
    assert uncorrected[shells].min() < 0.5
    # precomputed CTF images give the same map as CTF parameters
    n = 40
    half = res.half_set[:n]
    a = backproject(dataset["ctf_images"][:n], dataset["R"][:n], None, dataset["ctf"][:n],
                    pixel_size_angstrom=APIX, half_set=half)
    b = backproject(dataset["ctf_images"][:n], dataset["R"][:n], None,
                    compute_ctf(dataset["ctf"][:n], L, APIX), half_set=half)
    torch.testing.assert_close(a.volume, b.volume, rtol=1e-9, atol=1e-9)


def test_shifts_are_undone(dataset) -> None:
    res = backproject(dataset["shifted"], dataset["R"], dataset["shifts"])
    curve = _fsc_to_gt(res, dataset["volume"])
    assert curve[: int(0.9 * (L // 2)) + 1].min() > 0.9, curve
    ignored = _fsc_to_gt(backproject(dataset["shifted"], dataset["R"]), dataset["volume"])
    assert ignored[4:10].mean() < 0.8


def test_streaming_and_image_sources(dataset) -> None:
    imgs, R = dataset["clean"][:50], dataset["R"][:50]
    half = half_set_assignment(50, seed=3)
    a = backproject(imgs, R, batch_size=256, half_set=half)

    class Source:  # anything with .images(indices), like a ParticleSet
        box_px = L

        def images(self, idx):
            return imgs[torch.as_tensor(idx)].float()

    b = backproject(Source(), R, batch_size=7, half_set=half)
    scale = float(a.volume.abs().max())
    torch.testing.assert_close(a.volume, b.volume, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_array_equal(a.half_set, half)


def test_noisy_data_wiener_and_half_maps(dataset) -> None:
    g = torch.Generator().manual_seed(5)
    signal_std = float(dataset["clean"].std())
    noise = torch.randn(N, L, L, generator=g, dtype=torch.float64)
    noisy = dataset["clean"] + 2.0 * signal_std * noise
    wiener = backproject(noisy, dataset["R"], pixel_size_angstrom=APIX)
    plain = backproject(noisy, dataset["R"], wiener=False, reg=1e-4, half_set=wiener.half_set)
    vol = dataset["volume"]
    err_w = float(((wiener.volume - vol) ** 2).sum())
    err_p = float(((plain.volume - vol) ** 2).sum())
    assert err_w < 0.7 * err_p, (err_w, err_p)
    # the half-map FSC falls with frequency; its resolution is coarser than Nyquist (6 Å)
    assert wiener.fsc.fsc[1] > 0.9
    assert wiener.fsc.resolution(0.143) > 6.5
    # the FSC of the full map against the truth is about sqrt(2 FSC_half / (1 + FSC_half))
    f_half = wiener.fsc.fsc[2:9]
    predicted = np.sqrt(np.clip(2 * f_half / (1 + f_half), 0, None))
    measured = fsc(wiener.volume, vol).fsc[2:9]
    np.testing.assert_allclose(measured, predicted, atol=0.1)


def test_half_set_assignment_rules() -> None:
    rs = np.array([1, 2, 2, 1, 1])
    np.testing.assert_array_equal(half_set_assignment(5, random_subset=rs), rs)
    h = half_set_assignment(11, seed=0)
    assert (h == 1).sum() == 6 and (h == 2).sum() == 5
    np.testing.assert_array_equal(h, half_set_assignment(11, seed=0))
    assert not np.array_equal(h, half_set_assignment(11, seed=1))
    # a column that is not a 1/2 split is ignored
    h2 = half_set_assignment(5, random_subset=np.ones(5))
    assert set(h2.tolist()) == {1, 2}


@pytest.mark.parametrize("L", [2, 7, 8, 15, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_real_fft_inverse_hartley_matches_ihartley3(L: int, dtype: torch.dtype) -> None:
    """The map step of the reconstruction (a real FFT: half the memory of ``fftn``) equals
    ``ihartley3`` on odd and even boxes."""
    from cryospin.backproject import _to_real_space
    from cryospin.forward.hartley import ihartley3

    h = torch.randn(L, L, L, generator=torch.Generator().manual_seed(L), dtype=dtype)
    expected = ihartley3(h)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(_to_real_space(h.clone()), expected, rtol=tol,
                               atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("L", [15, 16])
def test_half_map_fsc_in_hartley_space_equals_the_fourier_fsc(L: int) -> None:
    """The returned FSC (computed from the Hartley sums, no transform) is the FSC of the
    returned real-space half maps; the voxel counts are the Fourier shells'."""
    g = torch.Generator().manual_seed(L)
    n = 30
    images = torch.randn(n, L, L, generator=g, dtype=torch.float64)
    R = random_rotations(n, generator=g)
    for wiener in (True, False):
        res = backproject(images, R, wiener=wiener, pixel_size_angstrom=2.0, seed=1)
        ref = fsc(res.half_a, res.half_b, pixel_size_angstrom=2.0)
        np.testing.assert_allclose(res.fsc.fsc, ref.fsc, atol=1e-9)
        np.testing.assert_array_equal(res.fsc.voxel_counts, ref.voxel_counts)
        assert res.fsc.box_px == L and res.fsc.pixel_size_angstrom == 2.0
