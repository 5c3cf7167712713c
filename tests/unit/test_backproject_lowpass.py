"""Low-pass backprojection (float64): only the image frequencies that reach the shells
``round(|k|) <= radius_px`` inserted, the map zero beyond."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests._synthetic import random_ctf_params

from cryospin.backproject import (
    BackprojectionSums,
    accumulate_backprojection,
    backproject,
    insert_radius_px,
    reconstruct_from_sums,
)
from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import hartley3
from cryospin.rotations import random_rotations
from cryospin.symmetry import point_group_rotations
from cryospin.volume import radial_shells

APIX = 3.0
NAMES = ("numerator_a", "denominator_a", "numerator_b", "denominator_b")


def _particles(n: int, L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   CTFParams, np.ndarray]:
    """Random images `(n, L, L)`, poses, shifts (px), CTFs and half sets, float64."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, L, L, generator=g, dtype=torch.float64)
    R = random_rotations(n, generator=g).double()
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64)
    half = np.arange(n) % 2 + 1
    return images, R, shifts, random_ctf_params(n, g), half


def _distance(L: int) -> torch.Tensor:
    """``|k|`` (cycles per box) on the centred `(L, L, L)` grid."""
    k = torch.arange(L, dtype=torch.float64) - L // 2
    return (k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2).sqrt()


@pytest.mark.parametrize("L, radius, symbol, symmetrize, ctf_as", [
    (16, 5.0, None, "insert", "params"),
    (15, 4.3, None, "insert", "grid"),
    (12, 3.0, "C4", "insert", "params"),    # grid-preserving: the (L+1)³ box and its fold
    (13, 4.0, "D7", "insert", "params"),    # |G|/|P| insertions per image
    (13, 4.0, "D7", "resample", "params"),  # the C1 sums averaged over the group
])
def test_low_pass_sums_are_exact_on_their_ball(L: int, radius: float, symbol: str | None,
                                               symmetrize: str, ctf_as: str) -> None:
    """With ``radius_px`` the four sums equal the full ones, to rounding, on every voxel of
    the shells ``round(|k|) <= radius_px``, and are zero where no inserted frequency reaches
    (``|k| > insert_radius_px + √3``): shifts, CTF parameters or CTF images, with and
    without a point group."""
    n = 11
    images, R, shifts, params, half = _particles(n, L, seed=L)
    ctf: torch.Tensor | CTFParams = params if ctf_as == "params" else compute_ctf(params, L, APIX)
    group = None if symbol is None else point_group_rotations(symbol)
    kw = dict(half_set=half, box_px=L, pixel_size_angstrom=APIX, batch_size=4,
              symmetry=group, symmetrize=symmetrize)
    full = accumulate_backprojection(images, R, shifts, ctf, **kw)  # type: ignore[arg-type]
    low = accumulate_backprojection(images, R, shifts, ctf, radius_px=radius,
                                    **kw)  # type: ignore[arg-type]
    ball = radial_shells(L, 3) <= radius
    far = _distance(L) > insert_radius_px(radius) + math.sqrt(3.0)
    assert bool(ball.any()) and bool(far.any())
    for name in NAMES:
        a, b = getattr(low, name), getattr(full, name)
        scale = float(b.abs().max())
        assert scale > 0
        assert float((a - b)[ball].abs().max()) < 1e-12 * scale, name
        if symmetrize == "insert":  # resampling spreads the sums by a voxel more
            assert float(a[far].abs().max()) == 0.0, name
        assert float((a - b).abs().max()) > 1e-6 * scale, name  # frequencies were skipped


def test_insert_radius_is_the_reach_of_a_shell() -> None:
    """A voxel of shell ``round(|k|) = r`` lies within ``r + 0.5``, and a sample reaches
    voxels up to ``√3`` away: the radius is the sum, no larger."""
    assert insert_radius_px(5.0) == pytest.approx(5.5 + math.sqrt(3.0), abs=1e-15)
    L = 32
    shells, dist = radial_shells(L, 3), _distance(L)
    assert float(dist[shells <= 5].max()) < 5.5 < insert_radius_px(5.0) - math.sqrt(3.0) + 1e-12


def _sums(L: int, radius: float | None, seed: int) -> BackprojectionSums:
    images, R, shifts, ctf, half = _particles(40, L, seed)
    return accumulate_backprojection(images, R, shifts, ctf, half_set=half, box_px=L,
                                     pixel_size_angstrom=APIX, radius_px=radius)


@pytest.mark.parametrize("wiener", [True, False])
def test_low_pass_map_equals_the_full_sums_map_on_the_ball(wiener: bool) -> None:
    """``reconstruct_from_sums(..., radius_px=r)`` of the low-pass sums equals that of the
    full sums (so the skipped frequencies change nothing on the ball), the maps' Hartley
    transforms are zero beyond shell ``r`` and the FSC is zero on the shells outside."""
    L, r = 16, 4.6
    low, full = _sums(L, r, seed=3), _sums(L, None, seed=3)
    a = reconstruct_from_sums(low, wiener=wiener, radius_px=r)
    b = reconstruct_from_sums(full, wiener=wiener, radius_px=r)
    for x, y in zip(a[:3], b[:3], strict=True):
        scale = float(y.abs().max())
        assert scale > 0
        assert float((x - y).abs().max()) < 1e-10 * scale
    outside = radial_shells(L, 3) > 4
    for m in a[:3]:
        h = hartley3(m)
        assert float(h[outside].abs().max()) < 1e-12 * float(h.abs().max())
    assert np.all(a[3].fsc[5:] == 0) and np.all(np.abs(a[3].fsc[:5]) > 0)
    assert np.allclose(a[3].fsc, b[3].fsc, rtol=0, atol=1e-12)


def test_radius_beyond_the_ball_changes_nothing() -> None:
    """``radius_px >= L//2`` gives the map of every frequency (to rounding)."""
    L = 12
    images, R, shifts, ctf, half = _particles(10, L, seed=5)
    whole = backproject(images, R, shifts, ctf, pixel_size_angstrom=APIX, half_set=half)
    low = backproject(images, R, shifts, ctf, pixel_size_angstrom=APIX, half_set=half,
                      radius_px=L // 2)
    scale = float(whole.volume.abs().max())
    assert float((low.volume - whole.volume).abs().max()) < 1e-12 * scale
    assert np.allclose(low.fsc.fsc, whole.fsc.fsc, atol=1e-12)
