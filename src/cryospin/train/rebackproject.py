"""The volume re-made from the poses when the global search ends
(``optim.rebackproject_after_search``) and at the start of every search epoch from the second
on (``optim.rebackproject_during_search``).

During the search epochs the volume is trained by gradient steps along with poses that are
still jumping between basins; when the search stops it is a blur of those poses. With the
first option the first local epoch starts with the volume replaced by the Wiener
backprojection of the training images from the poses as they are then
(:func:`cryospin.train.outputs.final_backprojection`, with the volume's point group when one
is imposed), and a new optimiser for it, so that the local epochs refine the poses against a
map made from them. With the second the same step starts each search epoch after the first:
the search goes on against a map made from the poses it found, which a pseudo-symmetric
particle needs to break its near-symmetry (a volume that trails poses still split between the
copies stays a blend of them; benchmarks/RESULTS.md, "The volume re-made in every search
epoch").
During the search only the frequencies its discs read are re-made
(:func:`search_reach_px`: the global search's and its pose steps' discs plus the trilinear
reach, ``optim.search_refine_radius_px`` set): a low-pass backprojection, which inserts only
the image frequencies that reach them, and beyond it the volume as trained (shell 18 with
the ``default`` preset: 8 % of the image frequencies inserted at 128 px, 31 % at 64 px; a
re-make 4.5× / 2.5× faster; benchmarks/RESULTS.md, "A low-pass re-make during the search").
With a point group the images are inserted once and the sums averaged over the group by
resampling (``symmetrize="resample"``, :mod:`cryospin.backproject`): inexact but as close to
the true map and ~5× faster with D7 than inserting each image at its seven poses, and the
local epochs refine this map anyway (the final map inserts exactly).
It runs at the start of the epoch (the one after the last search epoch, early stop included,
or a search epoch), after the impose-symmetry step when both fall on that epoch
(:mod:`cryospin.train.impose`); the epoch's checkpoint holds the new volume, so a resumed run
repeats nothing.

Distributed: rank 0 backprojects every particle (the gathered pose table) and the map reaches
the other ranks by a sum with their zeros.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import torch

from cryospin.backproject import Symmetrize
from cryospin.forward.hartley import hartley3
from cryospin.io.particle_set import ParticleSet
from cryospin.train.config import Config
from cryospin.train.data import TrainingData
from cryospin.train.distributed import Shard
from cryospin.train.metrics import RebackprojectRecord
from cryospin.train.outputs import final_backprojection
from cryospin.train.schedule import last_search_epoch
from cryospin.train.state import TrainState
from cryospin.train.switch import full_pose_table
from cryospin.volume import HartleyVolume, radial_shells

__all__ = ["RebackprojectWhen", "map_from_poses", "rebackproject_due",
           "rebackproject_on_state", "search_reach_px"]

logger = logging.getLogger(__name__)

#: Which of the two steps (module docstring) an epoch starts with.
RebackprojectWhen = Literal["during_search", "after_search"]

#: The backprojection's label in the log (:func:`cryospin.train.outputs.final_backprojection`).
_LABELS: dict[RebackprojectWhen, str] = {"after_search": "volume after the search",
                                         "during_search": "volume after epoch {epoch}"}


def rebackproject_due(config: Config, epoch: int, state: TrainState) -> RebackprojectWhen | None:
    """Whether epoch ``epoch`` starts with the step, and which: ``"after_search"`` when
    ``optim.rebackproject_after_search``, the run is in stage 2, at least one search epoch ran
    and ``epoch`` is the first after the last one; ``"during_search"`` when
    ``optim.rebackproject_during_search`` and ``epoch`` is a search epoch after the first
    (the search's early stop, at the end of an epoch, ends them); None otherwise."""
    s = config.schedule
    last = last_search_epoch(s, state.search_stopped_after)
    if state.pose_table is None or s.search_epochs <= 0 or last <= s.switch_epoch:
        return None
    if config.optim.rebackproject_after_search and epoch == last + 1:
        return "after_search"
    if config.optim.rebackproject_during_search and s.switch_epoch + 2 <= epoch <= last:
        return "during_search"
    return None


def search_reach_px(config: Config, box_px: int, group: str) -> int | None:
    """The shells ``round(|k|) <= reach`` (cycles per box) that a search epoch's slices read:
    those within ``√3`` (a trilinear sample's corners) of its discs, the global search's
    (``optim.search_radius_px``, ``search_radius_end_px``, ``search_radius_symmetric_px``
    with a point group other than C1) and its pose steps' (``optim.search_refine_radius_px``);
    None when the pose steps fit the whole training disc (that radius unset) or the reach
    covers the ball ``|k| <= L//2`` of box ``box_px``."""
    o = config.optim
    if o.search_refine_radius_px is None:
        return None
    radii = [o.search_radius_px, o.search_radius_end_px or 0.0, o.search_refine_radius_px]
    if group.upper() != "C1":
        radii.append(o.search_radius_symmetric_px or 0.0)
    reach = math.floor(max(radii) + math.sqrt(3.0) + 0.5)  # round() of the farthest corner
    return reach if reach < box_px // 2 else None


def _low_frequencies_replaced(volume: HartleyVolume, real: torch.Tensor,
                              reach_px: int) -> HartleyVolume:
    """A volume (same group, dtype, device) whose Hartley values are those of the real-space
    map ``real`` `(L, L, L)` on the shells ``round(|k|) <= reach_px`` and ``volume``'s
    beyond."""
    with torch.no_grad():
        old = volume()  # (L, L, L) Hartley values (with a group: its average)
        new = hartley3(real.to(device=old.device, dtype=old.dtype))
        low = radial_shells(old.shape[-1], 3, device=old.device) <= reach_px
        merged = torch.where(low, new, old)
    return HartleyVolume(old.shape[-1], init=merged, symmetry=volume.point_group)


def map_from_poses(config: Config, state: TrainState, particles: ParticleSet,
                   data: TrainingData, shard: Shard | None, *, label: str,
                   radius_px: int | None = None, group: str = "C1",
                   symmetrize: Symmetrize = "insert") -> torch.Tensor:
    """The Wiener backprojection `(L, L, L)` (real space, CPU) of the training images from the
    state's pose table (:func:`cryospin.train.outputs.final_backprojection`; ``radius_px``:
    up to that shell, None: every frequency; ``group``, ``symmetrize``: its point group and
    how it is applied), logged under ``label``. Distributed: rank 0 backprojects every
    particle (the gathered pose table) and the map reaches the other ranks by a sum with
    their zeros; a collective."""
    L = data.box_px
    table = full_pose_table(state.pose_table, shard)  # rank 0 (or one process): every row
    if table is not None:
        rotations, shifts = table.gather(torch.arange(len(data), device=table.rotations.device))
        real = final_backprojection(
            particles, data.unsharded(), rotations,
            shifts if config.model.predict_shifts else None, seed=config.run.seed,
            symmetry=group, label=label, poses="current", symmetrize=symmetrize,
            radius_px=radius_px)
    else:
        real = torch.zeros(L, L, L)
    if shard is not None:  # rank 0's map on every rank
        real = shard.all_sum(real.to(next(state.volume.parameters()).device)).cpu()
    return real


def rebackproject_on_state(config: Config, state: TrainState, particles: ParticleSet,
                           data: TrainingData, shard: Shard | None,
                           when: RebackprojectWhen) -> RebackprojectRecord:
    """Replace the state's volume by the backprojection from its pose table, as the step
    ``when`` (module docstring; ``state.epoch`` the last epoch done); returns the metrics
    record (on every rank)."""
    t0 = time.perf_counter()
    old = next(state.volume.parameters())
    group = state.volume.point_group
    label = _LABELS[when].format(epoch=state.epoch)
    reach = search_reach_px(config, data.box_px, group) if when == "during_search" else None
    real = map_from_poses(config, state, particles, data, shard, label=label, radius_px=reach,
                          group=group, symmetrize="resample")
    if reach is None:
        volume = HartleyVolume.from_real_space(real.to(old.dtype), symmetry=group)
    else:
        volume = _low_frequencies_replaced(state.volume, real, reach)
    state.replace_volume(config, volume.to(old.device))
    seconds = time.perf_counter() - t0
    logger.info("the volume is now the backprojection from the poses after %s (%s images, "
                "%s%.1f s); %s", label.removeprefix("volume after "), f"{len(data):,}",
                "" if reach is None else f"up to {reach} cycles/box, the trained volume "
                "beyond; ", seconds,
                "the local epochs refine the poses against it" if when == "after_search"
                else "the search goes on against it")
    return RebackprojectRecord(images=len(data), group=group, seconds=seconds,
                               during_search=when == "during_search", radius_px=reach)
