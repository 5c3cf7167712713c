"""The gold-standard mask of two half maps (``cryospin.evaluate.masks.half_map_mask``): its
threshold comes from the halves' noise, its edge is soft, it never covers the box, and it falls
back (saying so) when the noise threshold cannot give a proper mask. All in float64."""

from __future__ import annotations

import math

import pytest
import torch

from cryospin.evaluate.masks import (
    HALF_MAP_MASK_MAX_FRACTION,
    half_map_mask,
    half_map_mask_widths,
    half_map_noise_sigma,
    radius_grid,
    spherical_mask,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _halves(L: int, signal: torch.Tensor, sigma: float, seed: int) -> tuple[torch.Tensor, ...]:
    g = _gen(seed)
    a = signal + sigma * torch.randn(L, L, L, generator=g, dtype=F64)
    b = signal + sigma * torch.randn(L, L, L, generator=g, dtype=F64)
    return a, b


def _blob(L: int, radius: float, height: float = 10.0) -> torch.Tensor:
    """A smooth ball: ``height`` inside ``radius``, a Gaussian fall-off (σ = 1 px) outside."""
    r = radius_grid(L)
    return height * torch.exp(-0.5 * (r - radius).clamp(min=0.0) ** 2)


@pytest.mark.parametrize("sigma", [0.05, 0.4, 2.0])
def test_noise_sigma_is_the_noise_of_the_average_whatever_the_signal(sigma: float) -> None:
    """``(A − B)/2`` holds the noise of ``(A + B)/2`` (independent noise of std ``s`` per
    half: ``s/√2``) and none of the shared signal; the robust estimate finds it within 3 %."""
    L = 32
    for signal in (torch.zeros(L, L, L, dtype=F64), _blob(L, 6.0, height=50.0)):
        a, b = _halves(L, signal, sigma, seed=1)
        assert half_map_noise_sigma(a, b) == pytest.approx(sigma / math.sqrt(2), rel=0.03)
    # a local disagreement of the halves (one half has an extra blob) barely moves it
    a, b = _halves(L, _blob(L, 6.0), sigma, seed=2)
    extra = torch.roll(_blob(L, 2.0, height=20 * sigma), shifts=8, dims=0)
    assert half_map_noise_sigma(a + extra, b) == pytest.approx(sigma / math.sqrt(2), rel=0.06)


def test_threshold_is_n_sigma_of_the_noise_and_follows_it() -> None:
    L = 32
    signal = _blob(L, 5.0)
    for sigma in (0.1, 0.5):
        a, b = _halves(L, signal, sigma, seed=3)
        m = half_map_mask(a, b, n_sigma=4.0)
        assert m.fallback is None
        assert m.noise_sigma == pytest.approx(half_map_noise_sigma(a, b))
        assert m.threshold == pytest.approx(4.0 * m.noise_sigma)
        assert m.to_dict()["threshold_sigmas"] == pytest.approx(4.0)
    # more noise: a higher threshold, hence a smaller core (the blob's soft fall-off is cut
    # closer to its centre) and a smaller mask
    quiet = half_map_mask(*_halves(L, signal, 0.02, seed=4))
    loud = half_map_mask(*_halves(L, signal, 1.5, seed=4))
    assert loud.threshold > 20 * quiet.threshold
    assert loud.fraction < quiet.fraction


def test_mask_covers_the_density_with_a_soft_edge() -> None:
    L = 48
    signal = _blob(L, 6.0)
    a, b = _halves(L, signal, 0.2, seed=5)
    m = half_map_mask(a, b)
    dil, edge = half_map_mask_widths(L)
    assert (dil, edge) == (3.0, 6.0)
    mask = m.mask
    assert mask.dtype == F64 and mask.shape == (L, L, L)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    r = radius_grid(L)
    assert bool((mask[signal > 1.0] == 1.0).all())  # the density is fully inside
    # soft: a band of intermediate values as wide as the edge, falling off with the radius
    soft = (mask > 0.01) & (mask < 0.99)
    assert int(soft.sum()) > 0
    radii = r[soft]
    assert float(radii.max() - radii.min()) >= edge - 2.0
    ring = [float(mask[(r >= k - 0.5) & (r < k + 0.5)].mean()) for k in range(4, L // 2)]
    assert all(x >= y - 1e-12 for x, y in zip(ring, ring[1:], strict=False))
    assert ring[0] == 1.0 and ring[-1] == 0.0
    # no jump larger than a raised cosine of this width allows between neighbouring voxels
    step = max(float((mask - torch.roll(mask, 1, d)).abs().max()) for d in range(3))
    assert step <= math.sin(math.pi / (2 * math.ceil(edge))) + 1e-9


@pytest.mark.parametrize("L", [32, 64])
def test_never_covers_the_box_even_when_the_density_fills_it(L: int) -> None:
    """A map that is density everywhere (far above the noise) would give a core of the whole
    box: the mask ends inside the inscribed sphere and within the volume cap; where the cap
    binds, the threshold is raised and the mask says so."""
    g = _gen(6)
    filling = 10.0 + torch.rand(L, L, L, generator=g, dtype=F64)  # everything above 4 σ
    a, b = _halves(L, filling, 0.1, seed=7)
    m = half_map_mask(a, b)
    assert 0.2 < m.fraction <= HALF_MAP_MASK_MAX_FRACTION + 1e-12
    assert m.fraction == pytest.approx(float(m.mask.mean()))
    r = radius_grid(L)
    assert float(m.mask[r >= L / 2].max()) == 0.0  # zero at every face and corner
    assert float(m.mask[r <= L / 4].min()) == 1.0
    # a cap that binds: 10 % of the box
    small = half_map_mask(a, b, max_fraction=0.1)
    assert 0.0 < small.fraction <= 0.1 + 1e-12
    assert small.fallback is not None and "threshold raised" in small.fallback
    assert small.threshold > 4.0 * small.noise_sigma
    assert small.to_dict()["kind"] == "fallback"


def test_density_off_centre_does_not_wrap_around_the_box() -> None:
    L = 32
    signal = torch.roll(_blob(L, 3.0), shifts=(14, 0, 0), dims=(0, 1, 2))  # at the face
    a, b = _halves(L, signal, 0.1, seed=8)
    m = half_map_mask(a, b)
    r = radius_grid(L)
    assert float(m.mask[r >= L / 2].max()) == 0.0


def test_no_density_above_the_noise_falls_back_to_a_sphere_within_the_cap() -> None:
    L = 32
    a, b = _halves(L, torch.zeros(L, L, L, dtype=F64), 1.0, seed=9)
    m = half_map_mask(a, b, n_sigma=8.0)  # nothing reaches 8 σ in 32³ Gaussian voxels
    assert m.fallback is not None and "sphere" in m.fallback
    assert m.to_dict()["kind"] == "fallback"
    assert 0.0 < m.fraction <= HALF_MAP_MASK_MAX_FRACTION
    _, edge = half_map_mask_widths(L)
    radius = min(L // 2 - edge, (3 * HALF_MAP_MASK_MAX_FRACTION / (4 * math.pi)) ** (1 / 3) * L
                 - edge / 2)
    torch.testing.assert_close(m.mask, spherical_mask(L, radius, soft_edge_px=edge))


def test_rejects_bad_arguments() -> None:
    a = torch.zeros(8, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match="cubic"):
        half_map_mask(a, torch.zeros(8, 8, 9, dtype=F64))
    with pytest.raises(ValueError, match="max_fraction"):
        half_map_mask(a, a, max_fraction=1.0)
