"""The impose-symmetry step: a C1 run moves to the frame of its map's point group.

Imposing a group ``G`` from a random start makes the symmetric model build its map about fixed
axes from nothing; measured, it stalls in a local minimum (``docs/conventions.md``,
"Symmetry"). So, as RELION and cryoSPARC do, a run with ``model.symmetry`` trains in C1
for the first ``search_min_epochs`` epochs of its global search
(``schedule.impose_symmetry = during_search``, the default; ``after_search``: all of them;
:func:`cryospin.train.schedule.impose_epoch`), and then, once:

1. the volume's real-space map ``V`` is searched for ``G``'s axes
   (:func:`cryospin.symmetry_search.place_group`; with ``auto``,
   :func:`~cryospin.symmetry_search.detect_symmetry` chooses the group), giving the frame
   ``M`` `(3, 3)` and the centre ``c`` `(3,)` xyz px with ``W(r) = V(M r + c)`` symmetric
   under ``G`` in its conventional orientation;
2. the volume becomes ``HartleyVolume.from_real_space(W, symmetry=G)`` (mantissa and
   exponent fitted again; the caller gives it a new optimiser);
3. every particle's pose becomes ``R M`` with shift ``t + (R c)_xy``
   (:func:`~cryospin.symmetry_search.poses_in_group_frame`; the same images up to the
   resampling), the pose table's Adam moments zeroed.

When the group found is ``C1`` (``auto`` found nothing), nothing changes. Under torchrun each
rank searches the same (synchronised) volume, all take rank 0's frame and centre, and each
converts its own rows; with ``auto`` all take rank 0's group too (each rank's own choice could
differ where a score lies within rounding of the threshold).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.pose import PoseTable
from cryospin.rotations import relion_euler_from_matrix
from cryospin.symmetry_search import (
    SymmetrySearch,
    detect_symmetry,
    map_in_group_frame,
    place_group,
    poses_in_group_frame,
)
from cryospin.train.config import AMORTIZED_METHODS, Config
from cryospin.train.distributed import Shard
from cryospin.train.metrics import SymmetryRecord
from cryospin.train.schedule import impose_epoch
from cryospin.train.state import TrainState
from cryospin.volume import HartleyVolume

__all__ = ["SymmetryStep", "apply_frame", "find_frame", "impose_on_state", "impose_symmetry",
           "initial_group", "rank0_frame", "record_of", "step_due"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SymmetryStep:
    """What :func:`impose_symmetry` did.

    Attributes
    ----------
    group : str
        The canonical symbol imposed (``"C1"``: none, nothing changed).
    score : float
        The group's score on the C1 map (:func:`cryospin.symmetry_search.group_score`).
    rotation : `(3, 3)` float64
        ``M`` (conventional -> map coordinates).
    centre_px : `(3,)` float64
        ``c``, xyz pixels of the training box from ``L//2``.
    seconds : float
        Wall time of the step.
    """

    group: str
    score: float
    rotation: Tensor
    centre_px: Tensor
    seconds: float


def initial_group(config: Config, saved: str | None) -> str:
    """The point group of the volume at the start of a session: the checkpoint's (``saved``),
    else ``model.symmetry`` when it is imposed from the start (``impose_symmetry = start``, or
    a method that never switches), else ``C1`` (imposed after the global search)."""
    if saved is not None:
        return saved
    symmetry = config.model.symmetry
    if symmetry.lower() == "auto":
        return "C1"
    if (config.schedule.impose_symmetry == "start"
            or config.schedule.method in AMORTIZED_METHODS):
        return symmetry
    return "C1"


def step_due(config: Config, epoch: int, state: TrainState) -> bool:
    """Whether epoch ``epoch`` starts with the step: :func:`cryospin.train.schedule.
    impose_epoch` (after the global search, early stop included, or after its minimum epochs;
    the first stage-2 epoch without one), in stage 2, with a group (or ``auto``) still to
    impose on a C1 volume."""
    return (config.model.symmetry.upper() != "C1" and state.pose_table is not None
            and state.volume.point_group.upper() == "C1"
            and initial_group(config, None).upper() == "C1"
            and epoch == impose_epoch(config.schedule, state.search_stopped_after))


def impose_on_state(config: Config, state: TrainState, shard: Shard | None) -> SymmetryRecord:
    """:func:`impose_symmetry` on the state's volume and pose table (stage 2); the new volume
    gets a new optimiser (:meth:`TrainState.replace_volume`). Distributed (``shard``): every
    rank searches, and all take rank 0's group, frame and centre (one frame whatever the
    rounding of each rank's search). Returns the metrics record."""
    assert state.pose_table is not None  # stage 2
    step = find_frame(state.volume, config.model.symmetry)
    if shard is not None:
        step = rank0_frame(step, shard)
    volume = apply_frame(state.volume, state.pose_table, step)
    if volume is not state.volume:
        state.replace_volume(config, volume)
    _log(step)
    return record_of(step)


_SYMBOL_CHARS = 8  # a point-group symbol's characters sent between ranks ("C1", "D12", "I4")


def rank0_frame(step: SymmetryStep, shard: Shard) -> SymmetryStep:
    """``step`` with rank 0's group, score, frame and centre (a sum over ranks of rank 0's
    numbers; the group symbol travels as its character codes, so that with ``auto`` every
    rank imposes the group rank 0 detected)."""
    codes = [float(ord(c)) for c in step.group.ljust(_SYMBOL_CHARS)[:_SYMBOL_CHARS]]
    numbers = torch.cat([step.rotation.flatten(), step.centre_px,
                         torch.tensor([step.score, *codes], dtype=torch.float64)])
    agreed = shard.all_sum(numbers if shard.rank == 0 else torch.zeros_like(numbers))
    group = "".join(chr(round(float(v))) for v in agreed[13:]).strip()
    return dataclasses.replace(step, group=group, rotation=agreed[:9].reshape(3, 3),
                               centre_px=agreed[9:12], score=float(agreed[12]))


def _search(map_real: Tensor, symmetry: str) -> SymmetrySearch:
    """``auto``: the detected group; else the given one placed on ``map_real``."""
    if symmetry.lower() == "auto":
        return detect_symmetry(map_real)
    return place_group(map_real, symmetry)


def find_frame(volume: HartleyVolume, symmetry: str) -> SymmetryStep:
    """Step 1 (module docstring) on the real-space map of the C1 ``volume``: the group
    (``symmetry``, or the detected one for ``"auto"``), its frame ``M`` and centre ``c``."""
    t0 = time.perf_counter()
    with torch.no_grad():
        real = volume.to_real_space().detach().cpu()
    search = _search(real, symmetry)
    fit = search.chosen
    return SymmetryStep(fit.group, fit.score, fit.frame.double().cpu(),
                        search.centre_px.double().cpu(), time.perf_counter() - t0)


def apply_frame(volume: HartleyVolume, pose_table: PoseTable,
                step: SymmetryStep) -> HartleyVolume:
    """Steps 2 and 3: the volume rebuilt from ``W(r) = V(M r + c)`` with ``step.group``
    (device and dtype of ``volume``) and ``pose_table`` converted in place (Adam moments
    zeroed); ``volume`` itself, nothing changed, when the group is C1."""
    if step.group.upper() == "C1":
        return volume
    with torch.no_grad():
        real = volume.to_real_space().detach()
    aligned = map_in_group_frame(real.cpu(), step.rotation, step.centre_px)
    new = HartleyVolume.from_real_space(aligned.to(real.dtype),
                                        symmetry=step.group).to(real.device)
    device = pose_table.rotations.device
    rotations, shifts = poses_in_group_frame(pose_table.rotations, pose_table.shifts_px,
                                             step.rotation.to(device), step.centre_px.to(device))
    pose_table.replace_poses(rotations, shifts)
    return new


def impose_symmetry(volume: HartleyVolume, pose_table: PoseTable,
                    symmetry: str) -> tuple[HartleyVolume, SymmetryStep]:
    """The step (module docstring) on a C1 ``volume`` and ``pose_table`` (changed in place:
    its poses in the new frame, Adam moments zeroed). ``symmetry``: a group symbol or
    ``"auto"``. Returns the new volume (device and dtype of ``volume``; ``volume`` itself when
    the group is C1) and the :class:`SymmetryStep`."""
    step = find_frame(volume, symmetry)
    return apply_frame(volume, pose_table, step), step


def record_of(step: SymmetryStep) -> SymmetryRecord:
    """The ``metrics.jsonl`` record (``extra["symmetry"]``) of ``step``."""
    return {"group": step.group, "score": float(step.score),
            "rotation": [[float(v) for v in row] for row in step.rotation.tolist()],
            "centre_px": [float(v) for v in step.centre_px.tolist()]}


def _log(step: SymmetryStep) -> None:
    """One INFO line (``run.log``): the group, its score, ``M`` as RELION Euler angles, ``c``."""
    if step.group == "C1":
        logger.info("symmetry: no group found in the map (C1 kept), %.1f s", step.seconds)
        return
    rot, tilt, psi = (float(a) for a in relion_euler_from_matrix(step.rotation))
    c = step.centre_px.tolist()
    logger.info("symmetry %s imposed (score %.3f): frame M = Euler (rot, tilt, psi) "
                "(%.1f, %.1f, %.1f) deg, centre (%.2f, %.2f, %.2f) px, %.1f s; volume and "
                "poses moved to its frame", step.group, step.score, rot, tilt, psi,
                c[0], c[1], c[2], step.seconds)
