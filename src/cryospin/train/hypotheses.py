"""The switch's multi-hypothesis refinement: each particle's K best heads, refined, one kept.

Local refinement moves a pose only within a basin around the true pose (measured on the D7
ring at 64 px: particles that start within 15° of it end at ~2°, those 20° or more off do not
move), and the encoder's winner at the switch is the head with the lowest NLL against a volume
still blurred by the encoder's errors, not always the head nearest the truth: on that data set
the winner was within 15° for 61 % of the particles, the best of the 7 heads for 83 %
(benchmarks/RESULTS.md, "Stage 1 learning poses"). So with ``optim.switch_hypotheses = K > 1``
the switch keeps each particle's ``K`` lowest-NLL heads (the inference pass's
:func:`~cryospin.train.autoencode.infer_head_poses`), refines each of them locally — ``steps``
per-row Adam steps of :func:`~cryospin.train.autodecode.refine_poses` against the switch's
volume, held fixed, on the disc ``|k| ≤ radius_px`` — and keeps the one with the lowest NLL
after its steps. No global search: every hypothesis is one of the encoder's poses, moved
locally; the cost is ``K · steps`` pose steps per particle, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.pose import PoseTable
from cryospin.train.autodecode import pose_nll, refine_poses
from cryospin.train.autoencode import BestPoses, HeadPoses
from cryospin.train.data import Batch, LossDisc, TrainingData, sub_disc

__all__ = ["HypothesisSettings", "refine_hypotheses"]


@dataclass(frozen=True)
class HypothesisSettings:
    """How the switch refines its hypotheses.

    Attributes
    ----------
    steps : int
        Per-row Adam steps on each hypothesis.
    radius_px : float or None
        Disc (cycles per box) of the NLL they minimise and are compared on; None: the training
        disc.
    lr_rot : float
        Adam step size of the rotations, radians.
    lr_shift : float
        Adam step size of the shifts, pixels (used only when the hypotheses have shifts).
    max_shift_px : float or None
        Shifts are clamped to ``[−max_shift_px, max_shift_px]`` per axis.
    batch_size : int
        Particles per batch (each with ``K`` hypotheses).
    """

    steps: int
    radius_px: float | None
    lr_rot: float
    lr_shift: float
    max_shift_px: float | None
    batch_size: int


def refine_hypotheses(
    volume_ht: Tensor,
    hypotheses: HeadPoses,
    data: TrainingData,
    indices: Tensor,
    settings: HypothesisSettings,
    progress: Callable[[int], None] | None = None,
) -> BestPoses:
    """Refine every particle's hypotheses against ``volume_ht`` and keep the best of each.

    Parameters
    ----------
    volume_ht : `(L, L, L)`
        Hartley volume, held fixed.
    hypotheses : HeadPoses
        `(n, K, ...)` poses of the particles ``indices``, in that order.
    data : TrainingData
    indices : `(n,)` int64
        Particle indices of the rows of ``hypotheses``.
    settings : HypothesisSettings
    progress : callable, optional
        Called after each batch with its number of particles.

    Returns
    -------
    BestPoses
        `(n, ...)`: the kept hypothesis's refined pose, its head number (``best_head``) and its
        NLL on the settings' disc after the steps (``loss``).
    """
    n = int(hypotheses.heads.shape[0])
    disc = None if settings.radius_px is None else sub_disc(data.frequencies, data.box_px,
                                                            settings.radius_px)
    out = BestPoses.empty(n, hypotheses.shifts_px is not None, hypotheses.loss.device)
    volume_ht = volume_ht.detach()
    for rows in torch.arange(n).split(settings.batch_size):
        batch = data.batch(indices[rows].cpu())
        if disc is not None:
            batch = batch.restrict(disc)
        rot, shift, nll = _refine_batch(volume_ht, hypotheses, rows, batch, data, disc, settings)
        best = nll.argmin(dim=1)  # (b,)
        pick = torch.arange(len(rows), device=best.device)
        out.write(rows.to(best.device), rot[pick, best],
                  None if shift is None else shift[pick, best],
                  hypotheses.heads[rows.to(best.device)][pick, best], nll[pick, best])
        if progress is not None:
            progress(len(rows))
    return out


def _refine_batch(
    volume_ht: Tensor, hypotheses: HeadPoses, rows: Tensor, batch: Batch, data: TrainingData,
    disc: LossDisc | None, settings: HypothesisSettings,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The ``K`` refined hypotheses of the particles ``rows`` (`(b, K, 3, 3)`, `(b, K, 2)` or
    None) and their NLL `(b, K)` after the steps."""
    b, k = len(rows), hypotheses.heads.shape[1]
    dev = hypotheses.rotations.device
    r = rows.to(dev)
    shifts = None if hypotheses.shifts_px is None else hypotheses.shifts_px[r].reshape(b * k, 2)
    table = PoseTable(hypotheses.rotations[r].reshape(b * k, 3, 3), shifts,
                      lr_rot=settings.lr_rot, lr_shift=settings.lr_shift,
                      max_shift_px=settings.max_shift_px if shifts is not None else None)
    expanded = Batch(  # each image K times, rows 0 .. b·K − 1 of the temporary table
        indices=torch.arange(b * k, device=dev),
        images=batch.images,
        hartley=batch.hartley.repeat_interleave(k, dim=0),
        ctf=None if batch.ctf is None else batch.ctf.repeat_interleave(k, dim=0),
    )
    with_shifts = shifts is not None
    refine_poses(table, volume_ht, expanded, data, steps=settings.steps,
                 refine_shifts=with_shifts, disc=disc)
    rot, shift = table.gather(expanded.indices)
    with torch.no_grad():
        nll = pose_nll(volume_ht, rot, shift if with_shifts else None, expanded, data,
                       disc)
    return (rot.reshape(b, k, 3, 3), None if not with_shifts else shift.reshape(b, k, 2),
            nll.reshape(b, k))
