"""Stage 2 (auto-decoding): per-particle pose refinement alternating with volume updates.

For each batch: ``pose_steps`` steps of the per-row Adam of :class:`cryospin.pose.PoseTable`
(``R ← exp([ω]×) · R``, ``t ← t + δt``) against the current volume (held fixed), then one Adam
step of the volume with the refined poses. Only the rows of the batch are touched.

Optionally (:class:`RotationSearch`, the first epochs after the switch), each batch first runs
a global search: the NLL of every image against every rotation of a fixed, near-uniform grid
of SO(3) is evaluated on a small low-frequency disc (two matrix products), and a particle's
rotation is replaced by the best grid rotation when that fits better than its current one.
This rescues the particles whose stage-1 pose sits in a wrong basin, which local refinement
cannot leave.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cryospin.forward.model import render
from cryospin.forward.shifts import shift_hartley
from cryospin.forward.slicing import extract_central_slices
from cryospin.losses import gaussian_nll
from cryospin.pose import PoseTable
from cryospin.rotations import geodesic_distance_deg, quaternion_to_matrix
from cryospin.train.autoencode import EpochStats
from cryospin.train.data import Batch, LossDisc, TrainingData, batch_indices, sub_disc
from cryospin.train.metrics import RunningMean, check_finite_loss

__all__ = [
    "autodecode_epoch",
    "pose_nll",
    "refine_poses",
    "RotationSearch",
    "super_fibonacci_rotations",
    "search_rotations",
]

STAGE = "autodecode"


def super_fibonacci_rotations(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` deterministic, near-uniform rotations `(n, 3, 3)` (super-Fibonacci spiral).

    Unit quaternions ``q_i = (r sin α, r cos α, ρ sin β, ρ cos β)`` with ``s = i + ½``,
    ``r = √(s/n)``, ``ρ = √(1 − s/n)``, ``α = 2π s / √2``, ``β = 2π s / ψ`` (``ψ`` the real
    root of ``ψ⁴ = ψ + 4``), as in Alexa, "Super-Fibonacci spirals", CVPR 2022.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    psi = 1.533751168755204288118041
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r, rho = (s / n).sqrt(), (1.0 - s / n).sqrt()
    alpha, beta = 2 * math.pi * s / math.sqrt(2.0), 2 * math.pi * s / psi
    q = torch.stack(
        [r * alpha.sin(), r * alpha.cos(), rho * beta.sin(), rho * beta.cos()], dim=-1
    )  # (n, 4)
    return quaternion_to_matrix(q).to(dtype)


@dataclass(frozen=True)
class RotationSearch:
    """A global rotation search: the grid and the low-frequency disc it is scored on.

    Attributes
    ----------
    rotations : `(R, 3, 3)`
        Candidate rotations.
    disc : LossDisc
        Frequencies of the score (a sub-disc of the training disc).
    """

    rotations: Tensor
    disc: LossDisc

    @classmethod
    def build(cls, data: TrainingData, num_rotations: int, radius_px: float) -> RotationSearch:
        """Super-Fibonacci grid of ``num_rotations`` on the disc ``|k| ≤ radius_px``."""
        grid = super_fibonacci_rotations(num_rotations).to(data.frequencies.device)
        return cls(grid, sub_disc(data.frequencies, data.box_px, radius_px))


def search_rotations(
    volume_ht: Tensor,
    search: RotationSearch,
    batch: Batch,
    data: TrainingData,
    shifts_px: Tensor | None = None,
    chunk: int = 4096,
) -> tuple[Tensor, Tensor]:
    """Best grid rotation of every image of ``batch`` and its NLL on ``search.disc``.

    With observed ``y`` `(B, P')`, CTF ``c`` and the slice ``s_r`` of grid rotation ``r``,
    ``NLL[b, r] = Σ_p (y − c s_r)² / (2σ²) = (Σ y² − 2 (y∘c)·s_r + (c²)·(s_r²)) / (2σ²)``:
    two matrix products per chunk of ``chunk`` rotations.

    Parameters
    ----------
    volume_ht : `(L, L, L)`
        Hartley volume (held fixed).
    search : RotationSearch
    batch : Batch
        On the full training disc.
    data : TrainingData
    shifts_px : `(B, 2)`, optional
        Current in-plane shifts of the images.
    chunk : int
        Grid rotations per matrix product (bounds memory at ``B × chunk``).
    With ``shifts_px`` `(B, 2)`, the observations are shifted by ``−t`` first (equivalent to
    shifting the prediction by ``t``: the shift is orthogonal on a negation-closed disc).

    Returns
    -------
    best_rotation : `(B, 3, 3)`
    best_nll : `(B,)`
    """
    disc = search.disc
    restricted = batch.restrict(disc)
    y = restricted.hartley  # (B, P')
    if shifts_px is not None:
        y = shift_hartley(y, y[:, disc.negation_index], -shifts_px, disc.frequencies,
                          data.box_px)  # (B, P')
    c = torch.ones_like(y) if restricted.ctf is None else restricted.ctf  # (B, P')
    yc, c2 = y * c, c * c  # (B, P')
    y2 = y.square().sum(-1, keepdim=True)  # (B, 1)
    best_nll = torch.full((y.shape[0],), float("inf"), dtype=y.dtype, device=y.device)
    best_idx = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    for start in range(0, search.rotations.shape[0], chunk):
        grid = search.rotations[start:start + chunk]
        slices = extract_central_slices(volume_ht, grid.to(volume_ht.dtype),
                                        frequencies=disc.frequencies)  # (R, P')
        sq = y2 - 2.0 * yc @ slices.T + c2 @ slices.square().T  # (B, R)
        value, index = sq.min(dim=1)
        better = value < best_nll
        best_nll = torch.where(better, value, best_nll)
        best_idx = torch.where(better, index + start, best_idx)
    best_nll = best_nll * (0.5 / data.noise_variance)
    return search.rotations[best_idx], best_nll


def _apply_search(
    pose_table: PoseTable, volume_ht: Tensor, search: RotationSearch, batch: Batch,
    data: TrainingData, refine_shifts: bool,
) -> int:
    """Replace the rows of ``batch`` whose best grid rotation beats their pose; return count."""
    idx = batch.indices
    rot, shift = pose_table.gather(idx)
    shift_used = shift if refine_shifts else None
    grid_rot, grid_nll = search_rotations(volume_ht, search, batch, data, shift_used)
    sub = batch.restrict(search.disc)
    pred = render(volume_ht, rot, shift_used, sub.ctf, frequencies=search.disc.frequencies,
                  negation_index=search.disc.negation_index)  # (B, P')
    current = gaussian_nll(pred[:, None, :], sub.hartley, data.noise_variance)[:, 0]  # (B,)
    better = grid_nll < current  # (B,)
    if bool(better.any()):
        rows = idx[better]
        pose_table.rotations[rows] = grid_rot[better].to(pose_table.rotations.dtype)
        for buf in (pose_table.exp_avg_rot, pose_table.exp_avg_sq_rot):
            buf[rows] = 0
        pose_table.step[rows] = 0
    return int(better.sum())


def pose_nll(
    volume_ht: Tensor, rotations: Tensor, shifts_px: Tensor | None, batch: Batch,
    data: TrainingData,
) -> Tensor:
    """Per-image NLL `(B,)` of poses ``rotations`` `(B, 3, 3)`, ``shifts_px`` `(B, 2)` or None."""
    pred = render(
        volume_ht,
        rotations,
        shifts_px,
        batch.ctf,
        frequencies=data.frequencies,
        negation_index=data.negation_index,
    )  # (B, P)
    return gaussian_nll(pred[:, None, :], batch.hartley, data.noise_variance)[:, 0]  # (B,)


def refine_poses(
    pose_table: PoseTable,
    volume_ht: Tensor,
    batch: Batch,
    data: TrainingData,
    *,
    steps: int,
    refine_shifts: bool,
    epoch: int = 0,
    batch_number: int = 0,
) -> None:
    """``steps`` per-row Adam steps on the poses of ``batch.indices`` against a fixed volume.

    The loss of each row is that image's NLL (summed over the batch, so rows do not interact).
    """
    idx = batch.indices
    volume_ht = volume_ht.detach()
    for _ in range(steps):
        omega, dt = pose_table.perturbation(idx)
        rot, shift = pose_table.compose(idx, omega, dt if refine_shifts else None)
        nll = pose_nll(volume_ht, rot, shift if refine_shifts else None, batch, data)  # (B,)
        total = nll.sum()
        check_finite_loss(total, STAGE, epoch, batch_number)
        if refine_shifts:
            g_omega, g_dt = torch.autograd.grad(total, (omega, dt))
            pose_table.apply_gradients(idx, g_omega, g_dt)
        else:
            (g_omega,) = torch.autograd.grad(total, (omega,))
            pose_table.apply_gradients(idx, g_omega, None)


def autodecode_epoch(
    volume: nn.Module,
    pose_table: PoseTable,
    data: TrainingData,
    decoder_optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    pose_steps: int,
    refine_shifts: bool,
    generator: torch.Generator,
    epoch: int,
    progress: Callable[[int, float], None] | None = None,
    search: RotationSearch | None = None,
) -> EpochStats:
    """One pass over the particles in random order (drawn from ``generator``).

    Parameters
    ----------
    volume : HartleyVolume
    pose_table : PoseTable
        Updated in place (its buffers), rows of each batch only.
    data : TrainingData
    decoder_optimizer : torch.optim.Optimizer
        Over ``volume.parameters()``.
    batch_size, pose_steps : int
    refine_shifts : bool
        Whether shifts are refined and used.
    generator : torch.Generator
        CPU generator of the batch order.
    epoch : int
        For error messages.
    progress : callable, optional
        Called after each batch with ``(images_in_batch, batch_loss)``.
    search : RotationSearch, optional
        Run a global rotation search on each batch before the pose steps.

    Raises
    ------
    NonFiniteLossError
        If a loss is NaN/Inf.
    """
    running = RunningMean()
    rot_change = RunningMean()
    shift_change = RunningMean()
    for b, idx in enumerate(batch_indices(len(data), batch_size, generator), start=1):
        batch = data.batch(idx)
        rot0, shift0 = pose_table.gather(batch.indices)
        with torch.no_grad():
            volume_fixed = volume()
            if search is not None:
                _apply_search(pose_table, volume_fixed, search, batch, data, refine_shifts)
        refine_poses(
            pose_table, volume_fixed, batch, data, steps=pose_steps,
            refine_shifts=refine_shifts, epoch=epoch, batch_number=b,
        )
        rot, shift = pose_table.gather(batch.indices)
        nll = pose_nll(volume(), rot, shift if refine_shifts else None, batch, data)  # (B,)
        loss = nll.mean()
        check_finite_loss(loss, STAGE, epoch, b)
        decoder_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        decoder_optimizer.step()
        n = int(idx.numel())
        running.add(float(loss.detach()), n)
        rot_change.add(float(geodesic_distance_deg(rot0, rot).mean()), n)
        if refine_shifts:
            shift_change.add(float((shift - shift0).norm(dim=-1).mean()), n)
        if progress is not None:
            progress(n, float(loss.detach()))
    return EpochStats(
        loss=running.mean,
        num_images=int(running.weight),
        mean_pose_change_deg=rot_change.mean,
        mean_shift_change_px=shift_change.mean if refine_shifts else None,
    )
