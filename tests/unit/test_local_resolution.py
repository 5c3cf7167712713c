"""Local resolution (``cryospin.evaluate.local_resolution``) in float64: each window's value
against a direct computation (roll, cut, window, FSC), Nyquist for identical halves, a worse
side where one side is noisier, the filled map, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryospin.evaluate.fsc import fsc_curve
from cryospin.evaluate.gold_standard import whiten_halves
from cryospin.evaluate.local_resolution import (
    default_window_px,
    local_resolution,
    soft_sphere_window,
)

F64 = torch.float64


def _blobs(box: int, n: int, seed: int, sigma_px: float = 0.8) -> torch.Tensor:
    """``n`` Gaussian blobs spread over the central ``0.7 L`` of the box, `(L, L, L)`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(box, dtype=F64) - box // 2
    z, y, xx = torch.meshgrid(x, x, x, indexing="ij")
    out = torch.zeros(box, box, box, dtype=F64)
    for _ in range(n):
        c = (torch.rand(3, generator=g, dtype=F64) * 2 - 1) * 0.35 * box
        out += torch.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (xx - c[2]) ** 2)
                         / (2 * sigma_px**2))
    return out


def test_window_is_flat_inside_a_quarter_and_zero_beyond_a_half() -> None:
    W = 24
    w = soft_sphere_window(W)
    assert w.shape == (W, W, W) and w.dtype == F64
    c = W // 2
    assert float(w[c, c, c]) == 1.0 and float(w[c, c, c + W // 4]) == 1.0
    assert float(w[c, c, c + 3 * W // 8]) == pytest.approx(0.5, abs=1e-12)
    assert float(w[0, 0, 0]) == 0.0 and float(w[c, c, 0]) == 0.0  # radius W/2


def test_default_window() -> None:
    assert [default_window_px(L) for L in (16, 25, 32, 64, 128, 200, 256, 512)] == [
        16, 24, 24, 24, 32, 50 - 2, 48, 48]


def _direct(a: torch.Tensor, b: torch.Tensor, centre: tuple[int, int, int], W: int,
            apix: float, threshold: float) -> float:
    """One window computed the plain way: whiten, roll the centre to ``[W//2]*3``, cut, window,
    FSC, first crossing below the threshold."""
    wa, wb = whiten_halves(a, b)
    shift = [W // 2 - c for c in centre]
    cut = [torch.roll(v, shifts=shift, dims=(0, 1, 2))[:W, :W, :W] * soft_sphere_window(W)
           for v in (wa, wb)]
    values, _ = fsc_curve(*cut)
    for s in range(1, W // 2 + 1):
        if values[s] < threshold:
            before, at = float(values[s - 1]), float(values[s])
            # a shell 0 already below (a window without signal): frequency 0, "the window"
            freq = (s - 1) + min(max((before - threshold) / (before - at), 0.0), 1.0)
            return W * apix / freq if freq > 0 else W * apix
    return 2 * apix


def test_each_window_is_the_direct_fsc_crossing() -> None:
    L, W, apix = 32, 16, 1.7
    truth = _blobs(L, 40, 1)
    g = torch.Generator().manual_seed(2)
    a = truth + 0.3 * torch.randn(L, L, L, generator=g, dtype=F64)
    b = truth + 0.3 * torch.randn(L, L, L, generator=g, dtype=F64)
    mask = torch.ones(L, L, L, dtype=F64)
    out = local_resolution(a, b, mask, pixel_size_angstrom=apix, window_px=W, step_px=5)
    assert out.window_px == W and out.step_px == 5 and out.threshold == 0.143
    grid = list(range((L // 2) % 5, L, 5))  # through the centre, 16
    assert out.points.shape == (len(grid) ** 3, 3)
    rng = torch.Generator().manual_seed(3)
    for i in torch.randint(0, out.points.shape[0], (12,), generator=rng).tolist():
        centre = tuple(int(v) for v in out.points[i])
        assert all(c in grid for c in centre)
        expected = _direct(a, b, centre, W, apix, 0.143)
        assert float(out.resolution_angstrom[i]) == pytest.approx(expected, rel=1e-9)
        # the map holds the value at its sample points
        assert float(out.volume[centre]) == float(out.resolution_angstrom[i])


def test_identical_halves_are_at_nyquist_and_pixels_without_a_pixel_size() -> None:
    L = 32
    v = _blobs(L, 30, 4) + 0.1 * torch.randn(L, L, L, generator=torch.Generator().manual_seed(5),
                                             dtype=F64)
    mask = torch.zeros(L, L, L, dtype=F64)
    mask[8:24, 8:24, 8:24] = 1.0
    out = local_resolution(v, v.clone(), mask, pixel_size_angstrom=None, window_px=16)
    assert out.points.shape[0] > 0
    torch.testing.assert_close(out.resolution_angstrom,
                               torch.full_like(out.resolution_angstrom, 2.0))
    assert bool((out.volume[mask < 0.5] == 0).all())
    assert bool((out.volume[mask >= 0.5] == 2.0).all())  # every masked voxel filled
    assert out.to_dict()["median"] == 2.0


def test_the_noisier_side_reads_worse() -> None:
    """Halves whose noise is four times stronger where x < L/2: the windows there read a
    clearly worse resolution than those where x ≥ L/2."""
    L, apix = 48, 1.0
    truth = _blobs(L, 150, 6)
    sigma = torch.full((L, L, L), 0.05, dtype=F64)
    sigma[:, :, : L // 2] = 0.2
    g = torch.Generator().manual_seed(7)
    a = truth + sigma * torch.randn(L, L, L, generator=g, dtype=F64)
    b = truth + sigma * torch.randn(L, L, L, generator=g, dtype=F64)
    mask = torch.zeros(L, L, L, dtype=F64)
    mask[10:38, 10:38, 10:38] = 1.0
    out = local_resolution(a, b, mask, pixel_size_angstrom=apix)
    x = out.points[:, 2]
    noisy = out.resolution_angstrom[x < L // 2 - 6].median()
    clean = out.resolution_angstrom[x >= L // 2 + 6].median()
    assert float(noisy) > 1.2 * float(clean)
    assert math.isfinite(float(noisy))


def test_refusals() -> None:
    v = torch.zeros(16, 16, 16, dtype=F64)
    with pytest.raises(ValueError, match="even number of voxels from 8 to 16"):
        local_resolution(v, v, v, pixel_size_angstrom=1.0, window_px=15)
    with pytest.raises(ValueError, match="even number of voxels from 8 to 16"):
        local_resolution(v, v, v, pixel_size_angstrom=1.0, window_px=18)
    with pytest.raises(ValueError, match="three"):
        local_resolution(v, v[:-1], v, pixel_size_angstrom=1.0)
    with pytest.raises(ValueError, match="step"):
        local_resolution(v, v, v, pixel_size_angstrom=1.0, window_px=8, step_px=0)
    empty = local_resolution(v, v, v, pixel_size_angstrom=1.0, window_px=8)
    assert empty.points.shape == (0, 3) and math.isnan(empty.to_dict()["median"])


def test_points_on_density_are_summarised_apart() -> None:
    L = 32
    truth = _blobs(L, 30, 8)
    g = torch.Generator().manual_seed(9)
    a = truth + 0.2 * torch.randn(L, L, L, generator=g, dtype=F64)
    b = truth + 0.2 * torch.randn(L, L, L, generator=g, dtype=F64)
    mask = torch.ones(L, L, L, dtype=F64)
    density = truth > 0.5 * float(truth.max())
    out = local_resolution(a, b, mask, pixel_size_angstrom=1.0, window_px=16, step_px=2,
                           density=density)
    assert out.on_density is not None and out.on_density.shape == (out.points.shape[0],)
    on = density[out.points[:, 0], out.points[:, 1], out.points[:, 2]]
    assert torch.equal(out.on_density, on) and 0 < int(on.sum()) < on.numel()
    values = out.resolution_angstrom[on].numpy()
    d = out.to_dict()
    assert d["density_points"] == int(on.sum())
    assert d["density_median"] == pytest.approx(float(np.median(values)))
    assert d["density_percentile_5"] == pytest.approx(float(np.percentile(values, 5)))
    assert d["median"] == pytest.approx(float(np.median(out.resolution_angstrom.numpy())))
    plain = local_resolution(a, b, mask, pixel_size_angstrom=1.0, window_px=16, step_px=2)
    assert plain.on_density is None and plain.to_dict()["density_median"] is None
    torch.testing.assert_close(plain.resolution_angstrom, out.resolution_angstrom)
    with pytest.raises(ValueError, match="density"):
        local_resolution(a, b, mask, pixel_size_angstrom=1.0, density=density[:-1])
