"""Pose error: invariance to a global rotation and to handedness, recovery of known perturbations,
and the hand-flip algebra checked against analytic projections of a non-symmetric map."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryospin.evaluate.pose_error import (
    HAND_FLIP,
    align_rotations,
    flip_hand,
    pose_error,
    write_pose_error_json,
)
from cryospin.rotations import geodesic_distance_deg, random_rotations, so3_exp


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identical_poses_zero_error() -> None:
    R = random_rotations(200, generator=_gen(0))
    t = torch.randn(200, 2, generator=_gen(1), dtype=torch.float64)
    res = pose_error(R, R, t, t)
    assert not res.flipped
    assert res.rotation_error_deg.max() < 1e-5
    assert res.view_direction_error_deg.max() < 1e-5
    assert res.in_plane_error_deg.max() < 1e-5
    assert res.shift_error_px.max() == 0.0


def test_invariant_to_global_rotation() -> None:
    R = random_rotations(300, generator=_gen(2))
    Q = random_rotations(1, generator=_gen(3))[0]
    pred = R @ Q.T  # the map V(Qᵀ r) explains the same data with poses R Qᵀ
    res = pose_error(pred, R, allow_flip=False)
    assert res.rotation_error_deg.max() < 1e-5
    assert res.view_direction_error_deg.max() < 1e-5
    np.testing.assert_allclose(res.alignment, Q.T.numpy(), atol=1e-8)


def test_invariant_to_handedness_when_asked() -> None:
    R = random_rotations(300, generator=_gen(4))
    Q = random_rotations(1, generator=_gen(5))[0]
    pred = flip_hand(R) @ Q.T
    res = pose_error(pred, R)
    assert res.flipped
    assert res.rotation_error_deg.max() < 1e-5
    assert res.view_direction_error_deg.max() < 1e-5
    assert res.in_plane_error_deg.max() < 1e-5
    # without the flip, the mirrored poses cannot be explained by one rotation
    res_noflip = pose_error(pred, R, allow_flip=False)
    assert not res_noflip.flipped
    assert np.median(res_noflip.rotation_error_deg) > 20.0


def test_known_small_perturbations_recovered() -> None:
    n = 400
    R = random_rotations(n, generator=_gen(6))
    Q = random_rotations(1, generator=_gen(7))[0]
    axes = torch.randn(n, 3, generator=_gen(8), dtype=torch.float64)
    axes = torch.nn.functional.normalize(axes, dim=-1)
    angles_deg = torch.linspace(0.5, 5.0, n, dtype=torch.float64)
    pert = so3_exp(axes * torch.deg2rad(angles_deg)[:, None])
    pred = (pert @ R) @ Q.T
    t_gt = torch.randn(n, 2, generator=_gen(9), dtype=torch.float64) * 3
    t_pred = t_gt + torch.tensor([0.3, -0.4], dtype=torch.float64)  # |error| = 0.5 px
    res = pose_error(pred, R, t_pred, t_gt)
    assert not res.flipped
    # the symmetric, zero-mean perturbations leave the alignment nearly unbiased
    np.testing.assert_allclose(res.rotation_error_deg, angles_deg.numpy(), atol=0.2)
    np.testing.assert_allclose(res.shift_error_px, 0.5, atol=1e-12)
    assert res.to_dict()["median_rotation_error_deg"] == pytest.approx(2.75, abs=0.2)


def test_in_plane_and_view_direction_split() -> None:
    n = 50
    R = random_rotations(n, generator=_gen(10))
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    ex = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # a pure in-plane error (rotation about the beam axis, applied on the image side)
    inplane = so3_exp(ez * math.radians(7.0))
    res = pose_error(torch.cat([inplane @ R, R]), torch.cat([R, R]), allow_flip=False)
    np.testing.assert_allclose(res.view_direction_error_deg[:n], 0.0, atol=1e-6)
    np.testing.assert_allclose(res.in_plane_error_deg[:n], 7.0, atol=1e-6)
    # a pure tilt: rotation about x changes the view direction by the same angle, no twist
    tilt = so3_exp(ex * math.radians(4.0))
    res = pose_error(torch.cat([tilt @ R, R]), torch.cat([R, R]), allow_flip=False)
    np.testing.assert_allclose(res.view_direction_error_deg[:n], 4.0, atol=1e-6)
    np.testing.assert_allclose(res.in_plane_error_deg[:n], 0.0, atol=1e-6)


def test_hand_chosen_by_the_alignment_objective_not_the_median() -> None:
    """40 % of the poses right, 30 % + 30 % in two copies rotated by ±130° about one axis (as a
    pseudo-symmetric particle's stuck particles): the right hand's alignment explains the 40 %
    exactly but its median error is 130°; the mirror's explains nothing yet has a smaller
    median (≈ 122°). The hand must be the one with the smaller total error, which the
    alignment minimises."""
    n = 2000
    R = so3_exp(torch.randn(n, 3, generator=_gen(20), dtype=torch.float64))  # spread 1 rad
    A = so3_exp(torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64))
    copy = [so3_exp(torch.tensor([0.0, 0.0, math.radians(d)], dtype=torch.float64))
            for d in (0.0, 130.0, -130.0)]
    which = torch.arange(n) % 10
    group = torch.where(which < 4, 0, torch.where(which < 7, 1, 2))  # 40 / 30 / 30 %
    pred = R @ torch.stack(copy)[group] @ A
    mirror = align_rotations(pred, flip_hand(R))[1]
    assert float(mirror.median()) < math.radians(130.0 - 1.0)  # the median would pick it
    res = pose_error(pred, R)
    assert not res.flipped
    np.testing.assert_allclose(res.alignment, A.numpy(), atol=1e-8)
    assert res.rotation_error_deg[which.numpy() < 4].max() < 1e-5
    np.testing.assert_allclose(np.median(res.rotation_error_deg), 130.0, atol=1e-5)


def test_robust_to_outliers() -> None:
    n = 300
    R = random_rotations(n, generator=_gen(11))
    Q = random_rotations(1, generator=_gen(12))[0]
    pred = R @ Q.T
    bad = random_rotations(90, generator=_gen(13))  # 30% garbage
    pred = torch.cat([pred[:210], bad])
    A, err = align_rotations(pred, R)
    assert float(geodesic_distance_deg(A, Q.T)) < 1e-4
    assert float(torch.rad2deg(err[:210]).max()) < 1e-4


def test_map_offset_is_fitted() -> None:
    n = 200
    R = random_rotations(n, generator=_gen(14))
    t_gt = torch.randn(n, 2, generator=_gen(15), dtype=torch.float64)
    s = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    t_pred = t_gt - (R @ s)[:, :2]  # a map translated by s
    res = pose_error(R, R, t_pred, t_gt)
    np.testing.assert_allclose(res.map_offset_px, s.numpy(), atol=1e-10)
    assert res.shift_error_centered_px.max() < 1e-10
    assert res.shift_error_px.mean() > 0.5


def test_json_and_bad_shapes(tmp_path) -> None:
    R = random_rotations(10, generator=_gen(16))
    res = pose_error(R, R)
    write_pose_error_json(res, tmp_path / "e.json", pred="a.star")
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["n_particles"] == 10 and data["pred"] == "a.star"
    assert data["median_shift_error_px"] is None
    with pytest.raises(ValueError, match="rotation"):
        pose_error(R, R[:5])


# --- the hand-flip algebra, checked with analytic projections of anisotropic Gaussians -------


def _random_gaussians(k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.randn(k, 3, generator=gen, dtype=torch.float64) * 3.0
    A = torch.randn(k, 3, 3, generator=gen, dtype=torch.float64)
    cov = A @ A.transpose(-1, -2) + 1.5 * torch.eye(3, dtype=torch.float64)
    return means, cov


def _project(means, cov, R, L: int) -> torch.Tensor:
    """Exact P(x, y) = ∫ V(Rᵀ (x, y, z)) dz for V = Σ exp(-½ (r-μ)ᵀ Σ⁻¹ (r-μ)); `(N, L, L)`."""
    c = torch.arange(L, dtype=torch.float64) - L // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    xy = torch.stack([xx, yy], -1)  # (L, L, 2)
    out = torch.zeros(R.shape[0], L, L, dtype=torch.float64)
    for mu, S in zip(means, cov, strict=True):
        m = R @ mu  # (N, 3): the rotated map V(Rᵀ r) has mean R μ, covariance R Σ Rᵀ
        C = R @ S @ R.transpose(-1, -2)  # (N, 3, 3)
        Cxy = C[:, :2, :2]
        prec_zz = torch.linalg.inv(C)[:, 2, 2]
        d = xy[None] - m[:, None, None, :2]  # (N, L, L, 2)
        q = torch.einsum("nabi,nij,nabj->nab", d, torch.linalg.inv(Cxy), d)
        out += torch.sqrt(2 * math.pi / prec_zz)[:, None, None] * torch.exp(-0.5 * q)
    return out


def test_flipped_map_with_flipped_poses_gives_identical_images() -> None:
    """V(D r) with poses D R D, and V(Qᵀ r) with poses R Qᵀ, reproduce V's images exactly."""
    gen = _gen(20)
    means, cov = _random_gaussians(4, gen)
    R = random_rotations(6, generator=gen)
    Q = random_rotations(1, generator=gen)[0]
    L = 24
    images = _project(means, cov, R, L)
    D = HAND_FLIP
    # mirrored map V(D r): Gaussians with means D μ and covariances D Σ D
    flipped_images = _project(means @ D, D @ cov @ D, flip_hand(R), L)
    torch.testing.assert_close(flipped_images, images, rtol=0, atol=1e-10)
    # the mirror is not a rotation: with the unflipped poses the images differ
    assert (_project(means @ D, D @ cov @ D, R, L) - images).abs().max() > 1e-2
    # rotated map V(Qᵀ r): means Q μ, covariances Q Σ Qᵀ, poses R Qᵀ
    rotated_images = _project(means @ Q.T, Q @ cov @ Q.T, R @ Q.T, L)
    torch.testing.assert_close(rotated_images, images, rtol=0, atol=1e-10)
    # and the pose error of poses that explain the data with the rotated mirror is zero
    res = pose_error(flip_hand(R) @ Q.T, R)
    assert res.flipped and res.rotation_error_deg.max() < 1e-5


def test_flip_with_central_slices() -> None:
    """The same statement on the discrete forward model (extract_central_slices of V(D r))."""
    slicing = pytest.importorskip("cryospin.forward.slicing")
    hartley = pytest.importorskip("cryospin.forward.hartley")
    L = 20
    gen = _gen(21)
    vol = torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    # V_flip[z] = V[-z] about the centre index L//2 (periodic for even L)
    vol_flip = torch.roll(torch.flip(vol, dims=[0]), shifts=1, dims=0)
    R = random_rotations(5, generator=gen)
    a = slicing.extract_central_slices(hartley.hartley3(vol), R)
    b = slicing.extract_central_slices(hartley.hartley3(vol_flip), flip_hand(R))
    # compare inside the disc |k| <= L//2 - 1, where no sample touches the unpaired Nyquist plane
    k = torch.arange(L, dtype=torch.float64) - L // 2
    disc = (k[:, None] ** 2 + k[None, :] ** 2) <= (L // 2 - 1) ** 2
    torch.testing.assert_close(a[:, disc], b[:, disc], rtol=1e-9, atol=1e-9)
    # without the pose flip the slices of the mirrored map differ
    c = slicing.extract_central_slices(hartley.hartley3(vol_flip), R)
    assert (a[:, disc] - c[:, disc]).abs().max() > 1.0
