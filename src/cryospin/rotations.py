"""Rotations in SO(3): 6D representation, a numerically stable exponential map, quaternions,
geodesic distances, uniform sampling and RELION Euler angles.

Convention (see ``docs/conventions.md``): a rotation matrix ``R`` of shape ``(..., 3, 3)``
left-multiplies xyz column vectors. All functions follow the dtype and device of their inputs,
never mutate them, and keep autograd intact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "rotation_6d_to_matrix",
    "matrix_to_rotation_6d",
    "skew",
    "so3_exp",
    "so3_log",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "geodesic_distance_rad",
    "geodesic_distance_deg",
    "random_rotations",
    "relion_matrix_from_euler",
    "relion_euler_from_matrix",
]

# below this squared angle the exp map uses Taylor series for sin(t)/t and (1-cos t)/t^2
_TAYLOR_THETA2 = 1e-4


def rotation_6d_to_matrix(x: Tensor) -> Tensor:
    """Gram–Schmidt map from the 6D representation to a rotation matrix.

    Parameters
    ----------
    x : `(..., 6)`
        Two 3-vectors ``a1 = x[..., :3]``, ``a2 = x[..., 3:]`` (any scale, not parallel).

    Returns
    -------
    `(..., 3, 3)`
        Rows ``b1 = a1/|a1|``, ``b2`` = normalised part of ``a2`` orthogonal to ``b1``,
        ``b3 = b1 × b2``; a proper rotation (det = +1).
    """
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def matrix_to_rotation_6d(R: Tensor) -> Tensor:
    """Inverse of :func:`rotation_6d_to_matrix`: the first two rows, `(..., 3, 3)` -> `(..., 6)`."""
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def skew(w: Tensor) -> Tensor:
    """Skew-symmetric matrix ``[w]_x`` with ``[w]_x v = w × v``; `(..., 3)` -> `(..., 3, 3)`."""
    zero = torch.zeros_like(w[..., 0])
    wx, wy, wz = w.unbind(-1)
    return torch.stack(
        [
            torch.stack([zero, -wz, wy], -1),
            torch.stack([wz, zero, -wx], -1),
            torch.stack([-wy, wx, zero], -1),
        ],
        dim=-2,
    )


def so3_exp(omega: Tensor) -> Tensor:
    """Rodrigues' formula ``exp([ω]_x) = I + A [ω]_x + B [ω]_x²``, stable at and near ω = 0.

    ``A = sin θ / θ`` and ``B = (1 − cos θ) / θ²`` with ``θ = |ω|`` are evaluated as series in
    ``θ²`` when ``θ² < 1e-4`` (error below 1e-17), so value and gradient are finite and exact
    at ω = 0 (where the gradient of ``exp`` is ``[·]_x``).

    Parameters
    ----------
    omega : `(..., 3)`
        Rotation vector (axis × angle in radians).

    Returns
    -------
    `(..., 3, 3)`
        Rotation matrix.
    """
    theta2 = (omega * omega).sum(-1)
    small = theta2 < _TAYLOR_THETA2
    # keep the non-selected branch finite so torch.where does not leak NaN gradients
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta_safe = theta2_safe.sqrt()
    a_big = torch.sin(theta_safe) / theta_safe
    b_big = (1 - torch.cos(theta_safe)) / theta2_safe
    a_small = 1 - theta2 / 6 + theta2 * theta2 / 120
    b_small = 0.5 - theta2 / 24 + theta2 * theta2 / 720
    a = torch.where(small, a_small, a_big)[..., None, None]
    b = torch.where(small, b_small, b_big)[..., None, None]
    K = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Unit quaternion ``(w, x, y, z)`` `(..., 4)` -> rotation matrix `(..., 3, 3)`.

    The quaternion is normalised first; ``q`` and ``−q`` give the same matrix.
    """
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def matrix_to_quaternion(R: Tensor) -> Tensor:
    """Rotation matrix `(..., 3, 3)` -> unit quaternion ``(w, x, y, z)`` `(..., 4)` with w ≥ 0.

    Shepperd's method: of the four algebraically equal candidates, each row uses the one with
    the largest pivot, so the result is accurate for every rotation, including angle π.
    """
    m = R
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    # four candidate (unnormalised) quaternions, each scaled by 4*pivot
    cand = torch.stack(
        [
            torch.stack(
                [1 + tr, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                 m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack(
                [m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                 m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack(
                [m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack(
                [m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0],
                 m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
        ],
        dim=-2,
    )  # (..., 4, 4)
    pivots = torch.stack(
        [1 + tr, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
         1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2],
         1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)  # (..., 4)
    best = pivots.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def so3_log(R: Tensor) -> Tensor:
    """Inverse of :func:`so3_exp`: rotation matrix `(..., 3, 3)` -> rotation vector `(..., 3)`.

    The angle lies in ``[0, π]``; computed through the quaternion as
    ``2·atan2(|v|, w)·v/|v|``, which is accurate near 0 and near π.
    """
    q = matrix_to_quaternion(R)
    w, v = q[..., 0], q[..., 1:]
    vnorm = v.norm(dim=-1)
    small = vnorm < 1e-12
    vnorm_safe = torch.where(small, torch.ones_like(vnorm), vnorm)
    angle = 2 * torch.atan2(vnorm_safe, w)
    scale = torch.where(small, 2 / w.clamp_min(1e-12), angle / vnorm_safe)
    return v * scale[..., None]


def geodesic_distance_rad(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle of ``R1ᵀ R2`` in radians, `(..., 3, 3)` × `(..., 3, 3)` -> `(...)`, in ``[0, π]``."""
    q = matrix_to_quaternion(R1.transpose(-1, -2) @ R2)
    return 2 * torch.atan2(q[..., 1:].norm(dim=-1), q[..., 0].abs())


def geodesic_distance_deg(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle of ``R1ᵀ R2`` in degrees, in ``[0, 180]``."""
    return torch.rad2deg(geodesic_distance_rad(R1, R2))


def random_rotations(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` rotations drawn uniformly (Haar measure) from SO(3), `(n, 3, 3)`.

    Normalised 4D Gaussian vectors are uniform on S³, hence uniform unit quaternions.
    """
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=device)
    return quaternion_to_matrix(q).to(dtype)


def _rz_passive(angle: Tensor) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack(
        [torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1), torch.stack([z, z, o], -1)], -2
    )


def _ry_passive(angle: Tensor) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack(
        [torch.stack([c, z, -s], -1), torch.stack([z, o, z], -1), torch.stack([s, z, c], -1)], -2
    )


def relion_matrix_from_euler(rot_deg: Tensor, tilt_deg: Tensor, psi_deg: Tensor) -> Tensor:
    """RELION's Euler matrix ``A = Rz(psi)·Ry(tilt)·Rz(rot)`` (ZYZ, passive),
    `(...)` -> `(..., 3, 3)`.

    This is the matrix of RELION's ``Euler_angles2matrix`` (Heymann et al. 2005 convention): its
    third row is the projection direction in the map's frame,
    ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``. How it relates to cryospin's rotation
    matrices is stated in ``docs/conventions.md`` and implemented in :mod:`cryospin.io.star`.
    """
    return (
        _rz_passive(torch.deg2rad(psi_deg))
        @ _ry_passive(torch.deg2rad(tilt_deg))
        @ _rz_passive(torch.deg2rad(rot_deg))
    )


def relion_euler_from_matrix(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`relion_matrix_from_euler`: `(..., 3, 3)` -> (rot, tilt, psi) in degrees.

    ``tilt = atan2(√(A02² + A12²), A22)`` in ``[0, 180]``; ``psi = atan2(A12, −A02)``; ``rot``
    comes from the well-conditioned in-plane combination ``rot + psi = atan2(A01 − A10,
    A00 + A11)`` when ``cos tilt ≥ 0`` and ``psi − rot = atan2(A01 + A10, A11 − A00)`` otherwise,
    so the matrix rebuilt from the angles matches ``A`` to ~1e-15 even within 1e-8° of the poles
    (errors of ``psi`` there enter multiplied by ``sin tilt``). At the exact poles
    (``sin tilt < 1e-12``) only ``rot ± psi`` is defined and ``rot = 0``. ``rot`` and ``psi`` lie
    in ``(−180, 180]``.
    """
    s13, s23 = A[..., 0, 2], A[..., 1, 2]
    sin_tilt = torch.sqrt(s13 * s13 + s23 * s23)
    cos_tilt = A[..., 2, 2]
    tilt = torch.atan2(sin_tilt, cos_tilt)
    pole = sin_tilt < 1e-12
    north = cos_tilt >= 0
    total = torch.atan2(A[..., 0, 1] - A[..., 1, 0], A[..., 0, 0] + A[..., 1, 1])  # psi + rot
    diff = torch.atan2(A[..., 0, 1] + A[..., 1, 0], A[..., 1, 1] - A[..., 0, 0])  # psi - rot
    psi = torch.atan2(s23, -s13)
    psi = torch.where(pole, torch.where(north, total, diff), psi)
    rot = torch.where(north, total - psi, psi - diff)
    rot = torch.where(pole, torch.zeros_like(rot), rot)
    rot = torch.remainder(rot + math.pi, 2 * math.pi) - math.pi  # wrap to (-180, 180]
    rot = torch.where(rot <= -math.pi, rot + 2 * math.pi, rot)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)
