"""Stage 2 (auto-decoding): per-particle pose refinement alternating with volume updates.

For each batch: ``pose_steps`` steps of the per-row Adam of :class:`cryospin.pose.PoseTable`
(``R ← exp([ω]×) · R``, ``t ← t + δt``) against the current volume (held fixed), then one Adam
step of the volume with the refined poses. Only the rows of the batch are touched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cryospin.forward.model import render
from cryospin.losses import gaussian_nll
from cryospin.pose import PoseTable
from cryospin.rotations import geodesic_distance_deg
from cryospin.train.autoencode import EpochStats
from cryospin.train.data import Batch, TrainingData, batch_indices
from cryospin.train.metrics import RunningMean, check_finite_loss

__all__ = ["autodecode_epoch", "pose_nll", "refine_poses"]

STAGE = "autodecode"


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
