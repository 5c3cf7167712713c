"""Pose error between estimated and ground-truth poses, up to the global ambiguities of ab initio.

Ambiguities (derived from the projection model of ``docs/conventions.md``,
``P(x, y) = ∫ V(Rᵀ (x, y, z)ᵀ) dz``):

* **Global rotation.** The map ``V'(r) = V(Qᵀ r)`` with poses ``R Qᵀ`` gives the same images as
  ``V`` with poses ``R``, because ``V'((R Qᵀ)ᵀ r) = V(Qᵀ Q Rᵀ r) = V(Rᵀ r)``. Writing
  ``A = Qᵀ``: estimated poses are ``R_pred ≈ R_gt · A`` for one unknown ``A ∈ SO(3)``.
* **Handedness.** The mirrored map ``V_flip(r) = V(D r)``, ``D = diag(1, 1, −1)``, with poses
  ``D R D`` (a proper rotation) gives *identical* images (no image flip):
  ``V_flip((D R D)ᵀ r) = V(D D Rᵀ D r) = V(Rᵀ (x, y, −z))``, and the integral over ``z`` does not
  see the sign of ``z``. Every other mirror is this one composed with a rotation, so with
  handedness unknown ``R_pred ≈ D R_gt D · A``.
* **Shifts** are unchanged by both (the images are identical). A map translated by ``s``
  (``V'(r) = V(r − s)``) needs shifts ``t' = t − (R' s)_xy``; the offset ``s`` is fitted by least
  squares and the shift error is also reported after removing it ("centred").

The per-particle rotation error after alignment equals the geodesic distance between ``A`` and
``A_i = H(R_gt,i)ᵀ R_pred,i`` (``H`` = identity or ``D·D``), so the alignment minimising the sum of
errors is the geodesic median of the ``A_i``: initialised at the best of a subset of the ``A_i``
themselves and refined by Weiszfeld iterations on SO(3).

Reported per particle: rotation error (geodesic angle), view-direction error (angle between the
projection directions, the third rows ``R[2, :]`` = ``Rᵀ e_z``), in-plane error (twist about the
beam axis of the residual ``E = R_aligned R_gtᵀ``), and shift error in pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin.atomic import atomic_write_text
from cryospin.rotations import matrix_to_quaternion, so3_exp, so3_log
from cryospin.symmetry import point_group_rotations

__all__ = [
    "HAND_FLIP",
    "PoseErrorResult",
    "flip_hand",
    "align_rotations",
    "pose_error",
    "write_pose_error_json",
]

#: ``D = diag(1, 1, −1)``: the mirror ``V(D r)`` pairs with poses ``D R D``.
HAND_FLIP = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def flip_hand(R: Tensor) -> Tensor:
    """Poses ``D R D`` `(..., 3, 3)`: the same images with the mirrored map ``V(D r)``."""
    D = HAND_FLIP.to(dtype=R.dtype, device=R.device)
    return D @ R @ D


def _quat_angle_matrix(qa: Tensor, qb: Tensor) -> Tensor:
    """Geodesic angles (rad) between unit quaternions, `(n, 4)` × `(m, 4)` -> `(n, m)`."""
    dots = (qa @ qb.T).abs().clamp(max=1.0)
    return 2 * torch.acos(dots)


def _geodesic_rad(R1: Tensor, R2: Tensor) -> Tensor:
    q = matrix_to_quaternion(R1.transpose(-1, -2) @ R2)
    return 2 * torch.atan2(q[..., 1:].norm(dim=-1), q[..., 0].abs())


def _min_angle_over_group(A: Tensor, cand_g: Tensor) -> tuple[Tensor, Tensor]:
    """``min_g angle(A, C_g,i)`` and its argmin, for ``cand_g`` `(G, N, 3, 3)` -> `(N,)`, `(N,)`."""
    qa = matrix_to_quaternion(A)[None]  # (1, 4)
    q = matrix_to_quaternion(cand_g)  # (G, N, 4)
    dots = (q @ qa[0]).abs().clamp(max=1.0)  # (G, N)
    best, idx = dots.max(dim=0)
    return 2 * torch.acos(best), idx


def align_rotations(
    pred_R: Tensor,
    gt_R: Tensor,
    *,
    symmetry: Tensor | None = None,
    n_candidates: int = 512,
    max_iter: int = 200,
    tol_rad: float = 1e-12,
) -> tuple[Tensor, Tensor]:
    """Global rotation ``A`` minimising ``Σ_i min_g angle(R_gt,i g A, R_pred,i)`` (geodesic median).

    Parameters
    ----------
    pred_R, gt_R : `(N, 3, 3)`
        Estimated and reference rotations (computed in float64).
    symmetry : `(G, 3, 3)`, optional
        The particle's point group (:func:`cryospin.symmetry.point_group_rotations`): poses
        ``R_gt g`` are equivalent to ``R_gt``; each particle's error is the minimum over ``g``.
    n_candidates : int
        How many of the per-particle candidates ``A_i = R_gt,iᵀ R_pred,i`` (evenly spaced in
        index) are scored as starting points.
    max_iter, tol_rad : int, float
        Weiszfeld iterations and the step size (rad) below which they stop.

    Returns
    -------
    A : `(3, 3)` float64
        The alignment: ``R_pred ≈ R_gt g A``; ``R_pred Aᵀ`` are the aligned estimates.
    errors_rad : `(N,)` float64
        ``min_g angle(R_gt,i g A, R_pred,i)``.
    """
    pred = pred_R.to(torch.float64)
    gt = gt_R.to(pred.device, torch.float64)
    cand = gt.transpose(-1, -2) @ pred  # (N, 3, 3): A_i
    n = cand.shape[0]
    pick = torch.linspace(0, n - 1, min(n, n_candidates), device=pred.device).round().long()
    if symmetry is None:
        q_all = matrix_to_quaternion(cand)  # (N, 4)
        costs = torch.zeros(pick.numel(), dtype=torch.float64, device=pred.device)
        for start in range(0, n, 8192):  # bounded memory: (n_candidates, 8192)
            costs += _quat_angle_matrix(q_all[pick], q_all[start : start + 8192]).sum(1)
        A = cand[pick[costs.argmin()]]
        targets = cand
    else:
        G = symmetry.to(pred.device, torch.float64)
        # angle(R_gt g A, R_pred) = angle(A, gᵀ A_i): the candidate set of particle i
        cand_g = G.transpose(-1, -2)[:, None] @ cand[None]  # (G, N, 3, 3)
        q_g = matrix_to_quaternion(cand_g)  # (G, N, 4)
        q_pick = matrix_to_quaternion(cand[pick])  # (P, 4)
        costs = torch.zeros(pick.numel(), dtype=torch.float64, device=pred.device)
        for start in range(0, n, 4096):
            dots = (q_g[:, start : start + 4096] @ q_pick.T).abs().amax(0)  # (n', P)
            costs += (2 * torch.acos(dots.clamp(max=1.0))).sum(0)
        A = cand[pick[costs.argmin()]]
        targets = cand_g[0]
    # Weiszfeld iterations for the geodesic median on SO(3): A <- A exp(Σ w_i v_i / Σ w_i);
    # with symmetry, every particle's nearest equivalent candidate is re-chosen each step
    for _ in range(max_iter):
        if symmetry is not None:
            _, which = _min_angle_over_group(A, cand_g)
            targets = cand_g[which, torch.arange(n, device=pred.device)]
        v = so3_log(A.T @ targets)  # (N, 3), tangent vectors at A
        d = v.norm(dim=-1)
        w = 1.0 / d.clamp_min(1e-9)
        step = (w[:, None] * v).sum(0) / w.sum()
        A = A @ so3_exp(step)
        if float(step.norm()) < tol_rad:
            break
    if symmetry is None:
        return A, _geodesic_rad(gt @ A, pred)
    err, _ = _min_angle_over_group(A, cand_g)
    return A, err


@dataclass(frozen=True)
class PoseErrorResult:
    """Per-particle pose errors after global alignment, with summary statistics.

    Attributes
    ----------
    alignment : `(3, 3)` float64 numpy array
        ``A`` with ``R_pred ≈ H(R_gt) A`` (``H`` = ``D·D`` when ``flipped``).
    flipped : bool
        Whether the estimate has the opposite hand (mirrored map) to the ground truth.
    rotation_error_deg, view_direction_error_deg, in_plane_error_deg : `(N,)` numpy arrays
        Errors of the aligned estimates, degrees.
    shift_error_px : `(N,)` numpy array or None
        ``|t_pred − t_gt|`` in pixels.
    shift_error_centered_px : `(N,)` numpy array or None
        Shift error after removing the best global 3D map offset ``map_offset_px``.
    map_offset_px : `(3,)` numpy array or None
        Fitted offset ``s`` (x, y, z px, estimate's frame): ``t_pred ≈ t_gt − (R_pred s)_xy``.
    """

    alignment: np.ndarray
    flipped: bool
    rotation_error_deg: np.ndarray
    view_direction_error_deg: np.ndarray
    in_plane_error_deg: np.ndarray
    shift_error_px: np.ndarray | None = None
    shift_error_centered_px: np.ndarray | None = None
    map_offset_px: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        """Number of particles compared."""
        return int(self.rotation_error_deg.shape[0])

    def to_dict(self) -> dict:
        """JSON-ready summary (means, medians, the alignment); no per-particle arrays."""

        def stats(name: str, values: np.ndarray | None) -> dict:
            if values is None:
                return {f"mean_{name}": None, f"median_{name}": None}
            return {
                f"mean_{name}": float(np.mean(values)),
                f"median_{name}": float(np.median(values)),
            }

        out: dict = {"n_particles": self.n_particles, "flipped": bool(self.flipped)}
        out.update(stats("rotation_error_deg", self.rotation_error_deg))
        out.update(stats("view_direction_error_deg", self.view_direction_error_deg))
        out.update(stats("in_plane_error_deg", self.in_plane_error_deg))
        out.update(stats("shift_error_px", self.shift_error_px))
        out.update(stats("shift_error_centered_px", self.shift_error_centered_px))
        out["fraction_rotation_error_below_10_deg"] = float(np.mean(self.rotation_error_deg < 10))
        out["alignment_matrix"] = self.alignment.tolist()
        out["map_offset_px"] = None if self.map_offset_px is None else self.map_offset_px.tolist()
        out.update(self.meta)
        return out


def _angle_between_deg(u: Tensor, v: Tensor) -> Tensor:
    """Angle (deg) between 3-vectors `(..., 3)`, computed with atan2 (accurate at 0 and 180°)."""
    cross = torch.linalg.cross(u, v, dim=-1).norm(dim=-1)
    dot = (u * v).sum(-1)
    return torch.rad2deg(torch.atan2(cross, dot))


def _twist_about_z_deg(E: Tensor) -> Tensor:
    """|twist| (deg) of the swing–twist decomposition of ``E`` `(..., 3, 3)` about the z axis."""
    q = matrix_to_quaternion(E)
    w, z = q[..., 0], q[..., 3]
    return torch.rad2deg(2 * torch.atan2(z.abs(), w.abs()))


def pose_error(
    pred_R: Tensor | np.ndarray,
    gt_R: Tensor | np.ndarray,
    pred_shift_px: Tensor | np.ndarray | None = None,
    gt_shift_px: Tensor | np.ndarray | None = None,
    *,
    allow_flip: bool = True,
    symmetry: str | None = None,
) -> PoseErrorResult:
    """Compare estimated poses to the ground truth after the best global rotation (and hand).

    Parameters
    ----------
    pred_R, gt_R : `(N, 3, 3)`
        Rotation matrices in the cryospin convention (``docs/conventions.md``).
    pred_shift_px, gt_shift_px : `(N, 2)`, optional
        Shifts ``(tx, ty)`` in pixels; the shift errors are reported when both are given.
    allow_flip : bool
        Also try the mirrored hand (``R_gt -> D R_gt D``) and keep whichever fits better
        (smaller total rotation error, the objective of the alignment).
    symmetry : str, optional
        Point group of the particle (``"C4"``, ``"D7"``; :mod:`cryospin.symmetry`): each
        particle's errors are measured against its nearest equivalent pose ``R_gt g``.

    Returns
    -------
    PoseErrorResult
    """
    pred = torch.as_tensor(np.asarray(pred_R) if not isinstance(pred_R, Tensor) else pred_R)
    gt = torch.as_tensor(np.asarray(gt_R) if not isinstance(gt_R, Tensor) else gt_R)
    pred, gt = pred.to(torch.float64), gt.to(torch.float64)
    if pred.ndim != 3 or pred.shape[1:] != (3, 3) or gt.shape != pred.shape:
        raise ValueError(
            f"expected two (N, 3, 3) rotation arrays of equal N, got {tuple(pred.shape)} "
            f"and {tuple(gt.shape)}"
        )
    if pred.shape[0] == 0:
        raise ValueError("no poses to compare")

    G = None
    if symmetry is not None:
        G = point_group_rotations(symmetry).to(pred.device)
    A, err = align_rotations(pred, gt, symmetry=G)
    flipped = False
    if allow_flip:
        # the mirrored map V(D r) has the mirrored group D G D (T, I3 and I4 are not closed
        # under g -> D g D: T goes to T turned 180° about z, I3 to I4)
        G_f = None if G is None else flip_hand(G)
        A_f, err_f = align_rotations(pred, flip_hand(gt), symmetry=G_f)
        # the hand whose alignment reaches the smaller value of the objective both minimise
        # (the sum of the errors); not the median, which cannot decide when a minority of the
        # particles is right and the rest sits in pseudo-symmetric copies (seen on 6VYB: 42 %
        # within 10° of the right hand's alignment, median 116°, against 0.3 % and 104° for
        # the mirror's)
        if float(err_f.sum()) < float(err.sum()):
            A, err, flipped, G = A_f, err_f, True, G_f

    # angles are the same in the mirrored frame: compare there, against the nearest
    # equivalent pose H(R_gt) g, g in the group of that hand's map
    ref = flip_hand(gt) if flipped else gt
    if G is not None:
        cand_g = G.transpose(-1, -2)[:, None] @ (ref.transpose(-1, -2) @ pred)[None]
        _, which = _min_angle_over_group(A, cand_g)  # (N,) nearest equivalent pose
        ref = ref @ G[which]
    aligned = pred @ A.T  # (N, 3, 3): ≈ ref
    view_err = _angle_between_deg(aligned[:, 2, :], ref[:, 2, :])
    in_plane = _twist_about_z_deg(aligned @ ref.transpose(-1, -2))

    shift_err = shift_err_c = offset = None
    if pred_shift_px is not None and gt_shift_px is not None:
        tp = torch.as_tensor(np.asarray(pred_shift_px), dtype=torch.float64)
        tg = torch.as_tensor(np.asarray(gt_shift_px), dtype=torch.float64)
        if tp.shape != (pred.shape[0], 2) or tg.shape != tp.shape:
            raise ValueError(
                f"expected (N, 2) shifts with N={pred.shape[0]}, got {tuple(tp.shape)} "
                f"and {tuple(tg.shape)}"
            )
        diff = tp - tg  # (N, 2)
        shift_err = diff.norm(dim=-1)
        # t_pred - t_gt ≈ -(R_pred s)_xy : least squares for s over all particles
        M = -pred[:, :2, :].reshape(-1, 3)  # (2N, 3)
        s = torch.linalg.lstsq(M, diff.reshape(-1, 1)).solution[:, 0]
        shift_err_c = (diff - (M @ s).reshape(-1, 2)).norm(dim=-1)
        offset = s

    def np_or_none(x: Tensor | None) -> np.ndarray | None:
        return None if x is None else x.detach().cpu().numpy()

    return PoseErrorResult(
        alignment=A.cpu().numpy(),
        flipped=flipped,
        rotation_error_deg=np.rad2deg(err.cpu().numpy()),
        view_direction_error_deg=view_err.cpu().numpy(),
        in_plane_error_deg=in_plane.cpu().numpy(),
        shift_error_px=np_or_none(shift_err),
        shift_error_centered_px=np_or_none(shift_err_c),
        map_offset_px=np_or_none(offset),
        meta={} if symmetry is None else {"symmetry": str(symmetry).upper()},
    )


def write_pose_error_json(result: PoseErrorResult, path: str | Path, **extra: object) -> None:
    """Write :meth:`PoseErrorResult.to_dict` (plus ``extra`` keys) as JSON, atomically."""
    data = result.to_dict()
    data.update(extra)
    text = json.dumps(data, indent=2, default=lambda o: None if o is None else str(o))
    atomic_write_text(path, text + "\n")

