"""The volume re-made from the poses when the global search ends
(``optim.rebackproject_after_search``).

During the search epochs the volume is trained by gradient steps along with poses that are
still jumping between basins; when the search stops it is a blur of those poses. With this
option the first local epoch starts with the volume replaced by the Wiener backprojection of
the training images from the poses as they are then (:func:`cryospin.train.outputs.
final_backprojection`, with the volume's point group when one is imposed), and a new
optimiser for it, so that the local epochs refine the poses against a map made from them.
With a point group the images are inserted once and the sums averaged over the group by
resampling (``symmetrize="resample"``, :mod:`cryospin.backproject`): inexact but as close to
the true map and ~5× faster with D7 than inserting each image at its seven poses, and the
local epochs refine this map anyway (the final map inserts exactly).
It runs at the start of the epoch after the last search epoch (early stop included), after
the impose-symmetry step when both fall on that epoch (:mod:`cryospin.train.impose`); the
epoch's checkpoint holds the new volume, so a resumed run repeats nothing.

Distributed: rank 0 backprojects every particle (the gathered pose table) and the map reaches
the other ranks by a sum with their zeros.
"""

from __future__ import annotations

import logging
import time

import torch

from cryospin.io.particle_set import ParticleSet
from cryospin.train.config import Config
from cryospin.train.data import TrainingData
from cryospin.train.distributed import Shard
from cryospin.train.metrics import RebackprojectRecord
from cryospin.train.outputs import final_backprojection
from cryospin.train.schedule import last_search_epoch
from cryospin.train.state import TrainState
from cryospin.train.switch import full_pose_table
from cryospin.volume import HartleyVolume

__all__ = ["rebackproject_due", "rebackproject_on_state"]

logger = logging.getLogger(__name__)


def rebackproject_due(config: Config, epoch: int, state: TrainState) -> bool:
    """Whether epoch ``epoch`` starts with the step: the option is on, the run is in stage 2,
    at least one search epoch ran and ``epoch`` is the first after the last one."""
    s = config.schedule
    last = last_search_epoch(s, state.search_stopped_after)
    return (config.optim.rebackproject_after_search and state.pose_table is not None
            and s.search_epochs > 0 and last > s.switch_epoch and epoch == last + 1)


def rebackproject_on_state(config: Config, state: TrainState, particles: ParticleSet,
                           data: TrainingData, shard: Shard | None) -> RebackprojectRecord:
    """Replace the state's volume by the backprojection from its pose table (module
    docstring); returns the metrics record (on every rank)."""
    t0 = time.perf_counter()
    old = next(state.volume.parameters())
    group = state.volume.point_group
    L = data.box_px
    table = full_pose_table(state.pose_table, shard)  # rank 0 (or one process): every row
    if table is not None:
        rotations, shifts = table.gather(torch.arange(len(data), device=table.rotations.device))
        real = final_backprojection(
            particles, data.unsharded(), rotations,
            shifts if config.model.predict_shifts else None, seed=config.run.seed,
            symmetry=group, label="volume after the search", poses="current",
            symmetrize="resample")
    else:
        real = torch.zeros(L, L, L)
    if shard is not None:  # rank 0's map on every rank
        real = shard.all_sum(real.to(old.device)).cpu()
    volume = HartleyVolume.from_real_space(real.to(old.dtype), symmetry=group).to(old.device)
    state.replace_volume(config, volume)
    seconds = time.perf_counter() - t0
    logger.info("the volume is now the backprojection from the poses after the search "
                "(%s images, %.1f s); the local epochs refine the poses against it",
                f"{len(data):,}", seconds)
    return RebackprojectRecord(images=len(data), group=group, seconds=seconds)
