"""FSC: identical maps, independent noise, a known spectral SNR, masks, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryospin.evaluate.fsc import fsc, resolution_at, write_fsc_json
from cryospin.evaluate.masks import auto_mask, spherical_mask


def _gaussian_filtered_noise(L: int, sigma_shells: float, gen: torch.Generator) -> torch.Tensor:
    """White noise whose Fourier amplitude is multiplied by exp(-k²/(2σ²))."""
    x = torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=torch.float64)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return torch.fft.ifftn(torch.fft.fftn(x) * torch.exp(-k2 / (2 * sigma_shells**2))).real


@pytest.mark.parametrize("L", [16, 17, 32])
def test_identical_maps_give_one(L: int) -> None:
    gen = torch.Generator().manual_seed(L)
    v = torch.randn(L, L, L, generator=gen, dtype=torch.float64) + 0.1
    res = fsc(v, v.clone(), pixel_size_angstrom=2.0)
    assert res.fsc.shape == (L // 2 + 1,)
    np.testing.assert_allclose(res.fsc, 1.0, atol=1e-12)
    # never crosses: the resolution of the last shell L//2 (Nyquist, 2 px = 4 Å, for even L)
    assert resolution_at(res, 0.143) == pytest.approx(L * 2.0 / (L // 2))
    # the sign of a map matters, its scale does not
    np.testing.assert_allclose(fsc(v, 3.0 * v).fsc, 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(v, -v).fsc, -1.0, atol=1e-12)


def test_independent_noise_is_near_zero() -> None:
    L = 32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    b = torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    res = fsc(a, b)
    vals, counts = res.fsc[1:], res.voxel_counts[1:]
    # per shell, FSC of independent noise has standard deviation ~ 1/sqrt(voxels in shell)
    z = vals * np.sqrt(counts)
    assert np.all(np.abs(z) < 4.0), z
    assert abs(np.mean(vals)) < 3.0 / math.sqrt(len(vals)) * np.mean(1 / np.sqrt(counts))
    assert abs(np.mean(z)) < 3.0 / math.sqrt(len(z))


def test_known_spectral_snr_crossings() -> None:
    """Signal with power exp(-k²/σ²) plus white noise: FSC = SNR/(1+SNR) crosses where expected."""
    L, sigma = 48, 6.0
    gen = torch.Generator().manual_seed(1)
    signal = _gaussian_filtered_noise(L, sigma, gen)
    signal = signal / signal.std()
    # per-coefficient signal power ~ c·exp(-k²/σ²); choose the noise so SNR(k) = 100·exp(-k²/σ²)
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=torch.float64)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    g2 = torch.exp(-k2 / sigma**2)
    signal_power_per_coeff = (torch.fft.fftn(signal).abs() ** 2).sum() / g2.sum()
    noise_std = math.sqrt(float(signal_power_per_coeff) / 100.0 / L**3)
    a = signal + noise_std * torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    b = signal + noise_std * torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    res = fsc(a, b, pixel_size_angstrom=1.5)
    for threshold in (0.5, 0.143):
        snr = threshold / (1 - threshold)
        k_expected = sigma * math.sqrt(math.log(100.0 / snr))
        res_expected = L * 1.5 / k_expected
        res_measured = resolution_at(res, threshold)
        # within half a shell
        k_measured = L * 1.5 / res_measured
        assert abs(k_measured - k_expected) < 0.5, (threshold, res_measured, res_expected)


def test_resolution_interpolates_linearly() -> None:
    res = fsc(torch.ones(8, 8, 8, dtype=torch.float64), torch.ones(8, 8, 8, dtype=torch.float64))
    curve = np.array([1.0, 0.9, 0.7, 0.3, 0.1])
    res = type(res)(
        shells=np.arange(5.0), fsc=curve, voxel_counts=res.voxel_counts, box_px=8,
        pixel_size_angstrom=2.0,
    )
    # 0.5 crossed between shell 2 (0.7) and 3 (0.3): s = 2.5 -> 8·2/2.5 Å
    assert resolution_at(res, 0.5) == pytest.approx(16 / 2.5)
    assert resolution_at(res, 0.143) == pytest.approx(16 / (3 + 0.157 / 0.2))
    assert resolution_at(res, 0.95) == pytest.approx(16 / 0.5)


def test_mask_and_json(tmp_path) -> None:
    L = 24
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    m = spherical_mask(L, 8.0, soft_edge_px=3.0)
    assert float(m.max()) == 1.0 and float(m.min()) == 0.0
    res = fsc(a, a + 0.0, mask=m, pixel_size_angstrom=3.0)
    np.testing.assert_allclose(res.fsc[1:], 1.0, atol=1e-12)
    write_fsc_json(res, tmp_path / "fsc.json", map_a="a.mrc")
    data = json.loads((tmp_path / "fsc.json").read_text())
    assert data["resolution_0.143_angstrom"] == pytest.approx(6.0)
    assert data["map_a"] == "a.mrc" and len(data["fsc"]) == L // 2 + 1
    with pytest.raises(ValueError, match="shape"):
        fsc(a, a[:-1])


def test_auto_mask_covers_blob_with_soft_edge() -> None:
    L = 32
    r = spherical_mask(L, 5.0)  # hard ball of radius 5
    m = auto_mask(r, threshold=0.5, dilate_px=2.0, soft_edge_px=4.0)
    assert torch.all(m[r > 0] == 1.0)
    from cryospin.evaluate.masks import radius_grid

    rad = radius_grid(L)
    # dilation of a discrete ball by a discrete ball: everything within 5 + 2 - 1 is covered
    assert torch.all(m[rad <= 6.0] == 1.0)
    assert torch.all(m[rad > 7.0 + 4.0 + 1.0] == 0.0)
    edge = m[(rad > 7.5) & (rad < 9.0)]
    assert edge.numel() > 0 and torch.all((edge > 0) & (edge < 1))
