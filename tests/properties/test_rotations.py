"""Property tests of cryospin.rotations in float64."""

from __future__ import annotations

import math

import pytest
import torch

from cryospin.rotations import (
    geodesic_distance_deg,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    random_rotations,
    relion_euler_from_matrix,
    relion_matrix_from_euler,
    rotation_6d_to_matrix,
    skew,
    so3_exp,
    so3_log,
)

F64 = torch.float64


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_so3(R: torch.Tensor, atol: float = 1e-12) -> None:
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=atol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype),
                               atol=atol, rtol=0)


def test_6d_lands_in_so3_and_round_trips() -> None:
    x = torch.randn(200, 6, generator=_rng(), dtype=F64)
    R = rotation_6d_to_matrix(x)
    _assert_so3(R)
    torch.testing.assert_close(rotation_6d_to_matrix(matrix_to_rotation_6d(R)), R)


def test_random_rotations_are_uniform_enough() -> None:
    R = random_rotations(20000, generator=_rng(1))
    _assert_so3(R)
    # for Haar measure, E[R] = 0 and the angle has density (1 - cos t)/pi: E[angle] = pi/2 + 2/pi
    assert R.mean(0).abs().max() < 0.02
    angle = torch.deg2rad(geodesic_distance_deg(torch.eye(3, dtype=F64), R))
    assert abs(angle.mean().item() - (math.pi / 2 + 2 / math.pi)) < 0.02


def test_exp_matches_matrix_exponential_and_log_round_trips() -> None:
    omega = torch.randn(100, 3, generator=_rng(2), dtype=F64)
    omega = omega / omega.norm(dim=-1, keepdim=True) * torch.rand(100, 1, generator=_rng(3),
                                                                  dtype=F64) * (math.pi - 1e-6)
    R = so3_exp(omega)
    torch.testing.assert_close(R, torch.linalg.matrix_exp(skew(omega)))
    torch.testing.assert_close(so3_log(R), omega, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e-4, 3e-3, 0.5])
def test_exp_small_angles_match_matrix_exponential(scale: float) -> None:
    omega = torch.randn(20, 3, generator=_rng(4), dtype=F64) * scale
    torch.testing.assert_close(so3_exp(omega), torch.linalg.matrix_exp(skew(omega)),
                               atol=1e-15, rtol=0)


@pytest.mark.parametrize("point", [0.0, 1e-8])
def test_exp_gradient_finite_and_correct_at_and_near_zero(point: float) -> None:
    omega = torch.full((3,), point, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(so3_exp, (omega,))
    # analytic derivative at 0: d exp([w]x)/dw_i = [e_i]x
    if point == 0.0:
        jac = torch.autograd.functional.jacobian(so3_exp, omega.detach())
        for i in range(3):
            e = torch.zeros(3, dtype=F64)
            e[i] = 1
            torch.testing.assert_close(jac[..., i], skew(e))
    # a loss through exp at 0 has a finite gradient
    R0 = random_rotations(1, generator=_rng(5))[0]
    loss = ((so3_exp(omega) @ R0) ** 3).sum()
    (grad,) = torch.autograd.grad(loss, omega)
    assert torch.isfinite(grad).all()


def test_log_near_pi_and_identity() -> None:
    axis = torch.nn.functional.normalize(torch.randn(50, 3, generator=_rng(6), dtype=F64), dim=-1)
    for angle in (math.pi - 1e-9, math.pi, 1e-9, 0.0):
        R = so3_exp(axis * angle)
        back = so3_exp(so3_log(R))
        torch.testing.assert_close(back, R, atol=1e-12, rtol=0)


def test_quaternion_round_trip_and_geodesic_distance() -> None:
    R = random_rotations(500, generator=_rng(7))
    torch.testing.assert_close(quaternion_to_matrix(matrix_to_quaternion(R)), R)
    omega = torch.tensor([0.0, 0.0, math.radians(37.0)], dtype=F64)
    d = geodesic_distance_deg(R, so3_exp(omega) @ R)
    torch.testing.assert_close(d, torch.full_like(d, 37.0))


def test_relion_matrix_closed_form_and_round_trip() -> None:
    rot, tilt, psi = (torch.tensor(v, dtype=F64) for v in (30.0, 60.0, -45.0))
    A = relion_matrix_from_euler(rot, tilt, psi)
    # third row = projection direction (sin tilt cos rot, sin tilt sin rot, cos tilt)
    t, r = math.radians(60.0), math.radians(30.0)
    expected = torch.tensor([math.sin(t) * math.cos(r), math.sin(t) * math.sin(r), math.cos(t)],
                            dtype=F64)
    torch.testing.assert_close(A[2], expected)
    R = random_rotations(1000, generator=_rng(8))
    torch.testing.assert_close(relion_matrix_from_euler(*relion_euler_from_matrix(R)), R,
                               atol=1e-13, rtol=0)


@pytest.mark.parametrize("tilt", [0.0, 1e-9, 180.0, 180.0 - 1e-9])
def test_relion_round_trip_at_poles(tilt: float) -> None:
    rot = torch.tensor([10.0, -120.0], dtype=F64)
    psi = torch.tensor([-70.0, 33.0], dtype=F64)
    A = relion_matrix_from_euler(rot, torch.full_like(rot, tilt), psi)
    torch.testing.assert_close(relion_matrix_from_euler(*relion_euler_from_matrix(A)), A,
                               atol=1e-13, rtol=0)
