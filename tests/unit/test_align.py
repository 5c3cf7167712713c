"""Map alignment: known rotation, sub-pixel shift and hand of a non-symmetric synthetic map."""

from __future__ import annotations

import pytest
import torch

from cryospin.evaluate.align import align_maps, mirror_map, super_fibonacci_rotations
from cryospin.evaluate.pose_error import HAND_FLIP
from cryospin.forward.resample import fourier_crop_3d, fourier_pad_3d
from cryospin.forward.rigid import transform_map
from cryospin.rotations import geodesic_distance_deg, random_rotations


def _gaussians(seed: int):
    """A non-symmetric map: 5 anisotropic Gaussians; returns V(points `(..., 3)` xyz)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(5, 3, generator=g, dtype=torch.float64) * 4
    A = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    prec = torch.linalg.inv(0.5 * A @ A.transpose(-1, -2) + 2 * torch.eye(3, dtype=torch.float64))
    amp = torch.rand(5, generator=g, dtype=torch.float64) + 0.5

    def V(p: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(p.shape[:-1], dtype=torch.float64)
        for m, P, a in zip(means, prec, amp, strict=True):
            d = p - m
            out = out + a * torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, P, d))
        return out

    return V


def _coords(L: int) -> torch.Tensor:
    c = torch.arange(L, dtype=torch.float64) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1)  # (L, L, L, 3)


@pytest.mark.parametrize(("L", "flip", "seed"), [(32, False, 0), (24, True, 1)])
def test_recovers_rotation_shift_and_hand(L: int, flip: bool, seed: int) -> None:
    V = _gaussians(seed)
    r = _coords(L)
    reference = V(r)
    Q0 = random_rotations(1, generator=torch.Generator().manual_seed(10 + seed))[0]
    t0 = torch.tensor([1.4, -2.3, 0.6], dtype=torch.float64)  # sub-pixel
    # aligned(r) = moving_h(Q^T (r - t)) = V(r)  <=>  moving(r) = V(Q H r + t), H = D if flipped
    M = Q0 @ HAND_FLIP if flip else Q0
    moving = V(r @ M.T + t0)  # evaluated analytically: no interpolation in the data
    res = align_maps(reference, moving)
    assert res.flipped is flip
    assert float(geodesic_distance_deg(res.rotation, Q0)) < 2.0
    assert torch.allclose(res.translation_px, t0, atol=0.25)
    rel_err = float(((res.aligned - reference) ** 2).sum() / (reference**2).sum())
    assert rel_err < 0.01
    Q, t, flipped, aligned = res  # unpacks as documented
    assert aligned.shape == reference.shape and aligned.dtype == moving.dtype


def test_integer_shift_no_hand_search() -> None:
    L = 16
    V = _gaussians(2)
    r = _coords(L) * 1.5  # the map scaled down to fit the small box
    t0 = torch.tensor([3.0, 0.0, -2.0], dtype=torch.float64)
    res = align_maps(V(r), V(r + 1.5 * t0), search_hand=False)  # moving(r) = ref(r + t0)
    assert res.flipped is False
    assert float(geodesic_distance_deg(res.rotation, torch.eye(3, dtype=torch.float64))) < 1.0
    assert torch.allclose(res.translation_px, t0, atol=0.1)


def test_mirror_map_matches_definition() -> None:
    for L in (8, 9):
        V = _gaussians(3)
        r = _coords(L)
        D = HAND_FLIP
        expected = V(r @ D.T)  # V(D r)
        torch.testing.assert_close(mirror_map(V(r))[1:], expected[1:])  # z = -L/2 has no pair
        torch.testing.assert_close(mirror_map(mirror_map(V(r))), V(r))


def test_transform_map_convention() -> None:
    """out(r) = V(Q^T (r - t)): compare with the analytic map on a smooth function."""
    L = 32
    V = _gaussians(4)
    r = _coords(L)
    Q = random_rotations(1, generator=torch.Generator().manual_seed(5))[0]
    t = torch.tensor([0.5, 1.0, -1.5], dtype=torch.float64)
    s = 0.6  # widen the Gaussians (sigma >= 2.3 px) so that trilinear interpolation is accurate
    out = transform_map(V(s * r), Q, t)
    expected = V(s * ((r - t) @ Q))  # rows: Q^T (r - t)
    inner = r.norm(dim=-1) < L // 2 - 3  # sample points that stay inside the box
    peak = float(expected.abs().max())
    # trilinear interpolation error bound (h²/8)·Σ|∂²V/∂x_i²| <= 3/(8 σ_min²)·peak, with
    # σ_min = sqrt(2)/s px the narrowest Gaussian width (covariances >= 2·I before scaling)
    sigma_min = 2**0.5 / s
    assert float((out - expected)[inner].abs().max()) < 3 / (8 * sigma_min**2) * peak
    # the other conventions are far off
    assert float((out - V(s * ((r - t) @ Q.T)))[inner].abs().max()) > 0.2 * peak
    assert float((out - V(s * ((r + t) @ Q)))[inner].abs().max()) > 0.2 * peak
    # batched rotations
    out2 = transform_map(V(s * r), torch.stack([Q, Q]), torch.stack([t, t]))
    torch.testing.assert_close(out2[1], out)


def test_super_fibonacci_rotations_cover_so3() -> None:
    R = super_fibonacci_rotations(500)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand(500, 3, 3))
    assert torch.allclose(torch.linalg.det(R), torch.ones(500, dtype=torch.float64))
    # every random rotation has a grid point within ~30° (500 points: spacing ~ 20°)
    probes = random_rotations(200, generator=torch.Generator().manual_seed(6))
    d = geodesic_distance_deg(probes[:, None], R[None]).min(dim=1).values
    assert float(d.max()) < 30.0


def test_fourier_crop_pad_round_trip() -> None:
    L = 32
    V = _gaussians(7)
    v = V(_coords(L))  # inside the box, sigma >= 1.4 px: power at Nyquist ~ 1e-4
    up = fourier_pad_3d(v, 64)
    assert up.shape == (64, 64, 64)
    torch.testing.assert_close(fourier_crop_3d(up, L), v, atol=1e-3 * float(v.abs().max()), rtol=0)
    # upsampled map interpolates the original at the even voxels
    torch.testing.assert_close(up[::2, ::2, ::2], v, atol=1e-3 * float(v.abs().max()), rtol=0)
