"""Copy consensus: a pseudo-symmetric particle's split between its copies, undone when the
search ends (``optim.copy_consensus``).

A particle with a pseudo-symmetry ``G`` (a trimer whose protomers differ a little) gives
nearly the same image at a pose ``R`` and at its copies ``R g``. On a small data set the
global search can find the views modulo ``G`` while leaving the particles split between the
copies, and the split is stable in a way that neither more search nor moving each particle to
its best copy undoes: the copy a particle sits on follows its *true* view (neighbouring views
sit on the same copy), so every region of views is consistent with itself and a particle moved
to another copy lands where no particle of its own view lies (benchmarks/RESULTS.md, "The demo
test's size, seed 3"; "Copy consensus").

The step, at the start of the first epoch after the last search epoch, in a C1 run (after
the volume is re-made from the poses there, :mod:`cryospin.train.rebackproject`):

1. The map from the current poses (that re-made volume; made here when that step is off) and
   its point group (:func:`cryospin.symmetry_search.detect_symmetry`). When the map shows a
   group (its copies agree: a converged pseudo-symmetric particle, or an exactly symmetric
   one), or no cyclic group scores at least :data:`MIN_SCORE`, nothing happens. Otherwise the
   best cyclic group is taken for the pseudo-symmetry: maps of the spike left split scored
   0.36–0.69 for C3 where converged ones scored 0.73–0.85, and an asymmetric particle's best
   cyclic group 0.11 (benchmarks/RESULTS.md, "Copy consensus").
2. Every particle moves to a random one of its ``|G|`` copies (seeded): the regions of views
   lose their coherence, and the map made from the poses becomes an even blend of the copies
   in every direction.
3. Rounds of: the map from the poses (a Wiener backprojection up to the shells the search's
   discs read, :func:`cryospin.train.rebackproject.search_reach_px`); every particle to
   whichever of its pose and copies fits that map best on the search's pose-step disc
   (:func:`cryospin.train.autodecode.search_refine_disc`). The copy most particles sit on
   gives the blend its asymmetric part, so each round moves more particles to it, until fewer
   than :data:`SETTLED_FRACTION` move or after :data:`MAX_ROUNDS` rounds.
4. The new poses are kept only if the images fit the map made from them (every frequency)
   better, by their mean NLL on that disc, than the old poses fit theirs; the volume is then
   that map, with a new optimiser. Otherwise the old poses are put back and the volume stays.

The step needs the views found: when the search ends with many particles still off even
modulo ``G``, the rounds settle into another split and the old poses are kept.

Where the step works, the poses' Adam moments are zeroed whichever poses it keeps (the local
epochs start afresh). Distributed:
rank 0 backprojects every particle (the gathered pose table) and detects the group, every rank
moves the particles it holds, and the moved fractions and NLLs are summed over the ranks.
The step's choices are discrete (the group's placement, each particle's copy), so where one
and several processes round the map differently they may choose differently near a tie.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import Tensor

from cryospin.forward.hartley import hartley3
from cryospin.io.particle_set import ParticleSet
from cryospin.point_group import parse_point_group
from cryospin.symmetry_search import GroupFit, SymmetrySearch, detect_symmetry, place_group
from cryospin.train.autodecode import (
    SymmetryCopies,
    move_to_best_copies,
    pose_nll,
    search_refine_disc,
)
from cryospin.train.config import Config
from cryospin.train.data import LossDisc, TrainingData
from cryospin.train.distributed import Shard, local_batches
from cryospin.train.impose import SymmetryStep, rank0_frame
from cryospin.train.metrics import ConsensusRecord
from cryospin.train.rebackproject import map_from_poses, search_reach_px
from cryospin.train.schedule import last_search_epoch
from cryospin.train.state import TrainState
from cryospin.volume import HartleyVolume

__all__ = ["MAX_ROUNDS", "MIN_SCORE", "SETTLED_FRACTION", "consensus_due", "consensus_group",
           "consensus_on_state"]

logger = logging.getLogger(__name__)

#: The score a cyclic group needs in a map that shows no group to be taken for a
#: pseudo-symmetry (module docstring; :func:`cryospin.symmetry_search.group_score`).
MIN_SCORE = 0.25

#: Rounds of step 3 at most.
MAX_ROUNDS = 10

#: Step 3 ends when fewer than this fraction of the particles moved in a round.
SETTLED_FRACTION = 0.005

#: Images per batch of the rounds' passes (no gradients: larger than a training batch).
_BATCH = 256


def consensus_due(config: Config, epoch: int, state: TrainState) -> bool:
    """Whether epoch ``epoch`` starts with the step: ``optim.copy_consensus`` not ``off``, a
    C1 volume, the run in stage 2, at least one search epoch run and ``epoch`` the first
    after the last one (the search's early stop included)."""
    s = config.schedule
    if (config.optim.copy_consensus.lower() == "off" or state.pose_table is None
            or s.search_epochs <= 0):
        return False
    if state.volume.point_group.upper() != "C1":
        return False
    last = last_search_epoch(s, state.search_stopped_after)
    return last > s.switch_epoch and epoch == last + 1


def consensus_group(search: SymmetrySearch, min_score: float = MIN_SCORE) -> GroupFit | None:
    """The pseudo-symmetry the step works with: None when the map shows a group
    (``search.chosen`` is not C1) or no cyclic group of order ≥ 2 scores ``min_score``; else
    the best-scoring cyclic group."""
    best = _best_cyclic(search)
    if search.chosen.group.upper() != "C1" or best is None:
        return None
    return best if best.score >= min_score else None


def _best_cyclic(search: SymmetrySearch) -> GroupFit | None:
    """The best-scoring cyclic group of order ≥ 2 among ``search.fits`` (None: none)."""
    cyclic = [f for f in search.fits if f.order > 1 and parse_point_group(f.group).kind == "C"]
    return max(cyclic, key=lambda f: f.score, default=None)


def _map(config: Config, state: TrainState, particles: ParticleSet, data: TrainingData,
         shard: Shard | None, reach: int | None, like: Tensor,
         label: str) -> tuple[Tensor, Tensor]:
    """The backprojection from the current poses up to shell ``reach`` (None: all;
    :func:`cryospin.train.rebackproject.map_from_poses`): the real map `(L, L, L)` on the CPU
    and its Hartley transform on ``like``'s device and in its dtype."""
    real = map_from_poses(config, state, particles, data, shard, label=label, radius_px=reach)
    return real, hartley3(real.to(like.device, like.dtype))


@torch.no_grad()
def _mean_nll(state: TrainState, volume_ht: Tensor, data: TrainingData, shard: Shard | None,
              disc: LossDisc | None, refine_shifts: bool, seed: int) -> float:
    """The images' mean NLL `()` under ``volume_ht`` at their poses, on ``disc`` (summed
    over the ranks)."""
    table = state.pose_table
    assert table is not None
    total = torch.zeros((), dtype=torch.float64)
    for batch, _ in local_batches(data.epoch_batches(_BATCH, torch.Generator().manual_seed(seed)),
                                  shard):
        if batch.indices.numel() == 0:
            continue
        rot, shift = table.gather(batch.indices)
        view = batch if disc is None else batch.restrict(disc)
        total += pose_nll(volume_ht, rot, shift if refine_shifts else None, view, data,
                          disc).double().sum().cpu()
    if shard is not None:
        total = shard.all_sum(total)
    return float(total) / len(data)


@torch.no_grad()
def _round(state: TrainState, volume_ht: Tensor, data: TrainingData, shard: Shard | None,
           disc: LossDisc | None, copies: SymmetryCopies, refine_shifts: bool,
           seed: int) -> float:
    """Every particle of this rank to the best of its pose and copies under ``volume_ht`` on
    ``disc`` (:func:`cryospin.train.autodecode.move_to_best_copies`); the fraction moved
    (summed over the ranks)."""
    table = state.pose_table
    assert table is not None
    moved = torch.zeros((), dtype=torch.float64)
    for batch, _ in local_batches(data.epoch_batches(_BATCH, torch.Generator().manual_seed(seed)),
                                  shard):
        if batch.indices.numel() > 0:
            moved += move_to_best_copies(table, volume_ht, copies, batch, data, refine_shifts,
                                         disc)
    if shard is not None:
        moved = shard.all_sum(moved)
    return float(moved) / len(data)


@torch.no_grad()
def _scramble(state: TrainState, copies: SymmetryCopies, refine_shifts: bool,
              seed: int) -> None:
    """Every row of the pose table to a random one of its ``|G|`` copies (the pose itself
    included; the same draw on every rank)."""
    table = state.pose_table
    assert table is not None
    n = len(table)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, copies.rotations.shape[0] + 1, (n,), generator=generator)
    rows = torch.nonzero(pick > 0).flatten().to(table.rotations.device)
    rot, shift = table.gather(rows)
    cand_rot, cand_shift = copies.poses(rot, shift if refine_shifts else None)
    k = (pick[pick > 0] - 1).to(rows.device)
    sel = torch.arange(len(rows), device=rows.device)
    table.rotations[rows] = cand_rot[sel, k].to(table.rotations)
    if cand_shift is not None:
        table.shifts_px[rows] = cand_shift[sel, k].to(table.shifts_px)


def _detect(real: Tensor, shard: Shard | None,
            given: str) -> tuple[GroupFit | None, str, float, Tensor]:
    """What the step does on the map ``real`` (rank 0's decision, distributed): the
    pseudo-symmetry (``given`` placed in the map, or with ``auto`` :func:`consensus_group`;
    None when there is none), the group the map shows (``C1``: none; with a given group,
    that group), the score (of the pseudo-symmetry, else of the group shown, else of the best
    cyclic group, 0 when none) and the map's centre `(3,)` (xyz px)."""
    t0 = time.perf_counter()
    if given.lower() == "auto":
        search = detect_symmetry(real.float())
        fit = consensus_group(search)
        shown = search.chosen.group
    else:
        search = place_group(real.float(), given)
        fit = search.chosen
        shown = fit.group
    best = _best_cyclic(search)
    score = (fit.score if fit is not None else search.chosen.score if shown != "C1"
             else 0.0 if best is None else best.score)
    frame = fit.frame if fit is not None else torch.eye(3, dtype=torch.float64)
    step = SymmetryStep(fit.group if fit is not None else "C1", float(score),
                        frame.double().cpu(), search.centre_px.double().cpu(),
                        time.perf_counter() - t0)
    if shard is not None:  # rank 0's decision on every rank
        step = rank0_frame(step, shard)
        shown = rank0_frame(dataclasses.replace(step, group=shown), shard).group
    if step.group == "C1":
        return None, shown, step.score, step.centre_px
    return (GroupFit(step.group, parse_point_group(step.group).order, step.score,
                     step.rotation), shown, step.score, step.centre_px)


def consensus_on_state(config: Config, state: TrainState, particles: ParticleSet,
                       data: TrainingData, shard: Shard | None, *,
                       remade: bool) -> ConsensusRecord:
    """The step (module docstring) on the state's pose table (changed in place); returns the
    metrics record (on every rank).

    ``remade``: the state's volume is the backprojection from the current poses (the volume
    re-made after the search, :mod:`cryospin.train.rebackproject`, has just run); it is then
    the map the group is detected on, and the old poses' fit is taken against it. Otherwise
    that map is made here first. When the new poses are kept, the volume is replaced by the
    backprojection from them (every frequency) with a new optimiser.
    """
    t0 = time.perf_counter()
    table = state.pose_table
    assert table is not None
    like = next(state.volume.parameters()).detach()
    reach = search_reach_px(config, data.box_px, "C1")
    disc = search_refine_disc(config, data)
    refine_shifts = config.model.predict_shifts
    seed = config.run.seed
    if remade:
        with torch.no_grad():
            volume_ht = state.volume().detach()
            real = state.volume.to_real_space().detach().cpu()
    else:
        real, volume_ht = _map(config, state, particles, data, shard, None, like,
                               "copy consensus: map from the poses")
    given = config.optim.copy_consensus
    fit, shown, score, centre_px = _detect(real, shard, given)
    record: ConsensusRecord = {"group": "C1", "given": given.lower() != "auto",
                               "detected": shown, "score": score, "rounds": 0,
                               "moved_fractions": [], "nll_before": None, "nll_after": None,
                               "kept": False, "seconds": 0.0}
    if fit is None:
        record["seconds"] = time.perf_counter() - t0
        logger.info("copy consensus: %s; nothing to do (%.1f s)",
                    f"the map shows {shown} (score {score:.3f}): its copies agree"
                    if shown != "C1" else "the map shows no point group and no cyclic "
                    f"pseudo-symmetry scoring >= {MIN_SCORE:g} (the best {score:.3f})",
                    record["seconds"])
        return record
    copies = SymmetryCopies.placed(fit.group, fit.frame, centre_px, table.rotations.device)
    logger.info("copy consensus: %s; every particle to a random copy of its pose, then up to "
                "%d rounds of each to its best copy under the map from the poses",
                f"{fit.group} given (score {fit.score:.3f} in the map)" if record["given"]
                else f"the map shows no point group but a pseudo-{fit.group} (score "
                     f"{fit.score:.3f})", MAX_ROUNDS)
    saved = (table.rotations.clone(), table.shifts_px.clone())
    nll_before = _mean_nll(state, volume_ht, data, shard, disc, refine_shifts, seed)
    _scramble(state, copies, refine_shifts, seed)
    moved_fractions: list[float] = []
    for round_ in range(1, MAX_ROUNDS + 1):
        _, volume_ht = _map(config, state, particles, data, shard, reach, like,
                            f"copy consensus: round {round_}")
        moved = _round(state, volume_ht, data, shard, disc, copies, refine_shifts,
                       seed + round_)
        moved_fractions.append(moved)
        if moved < SETTLED_FRACTION:
            break
    new_real, volume_ht = _map(config, state, particles, data, shard, None, like,
                               "copy consensus: map from the new poses")
    nll_after = _mean_nll(state, volume_ht, data, shard, disc, refine_shifts, seed)
    kept = nll_after < nll_before
    if kept:
        table.reset_optimizer_state()
        state.replace_volume(config, HartleyVolume.from_real_space(
            new_real.to(like.dtype)).to(like.device))
    else:
        table.replace_poses(*saved)
    record.update({"group": fit.group, "rounds": len(moved_fractions),
                   "moved_fractions": moved_fractions, "nll_before": nll_before,
                   "nll_after": nll_after, "kept": kept,
                   "seconds": time.perf_counter() - t0})
    logger.info("copy consensus on the pseudo-%s (%sscore %.3f in the map): %d rounds after "
                "scrambling the copies (moved %s); mean NLL %.2f against %.2f before: %s "
                "(%.1f s)", fit.group, "given, " if record["given"] else "", fit.score,
                len(moved_fractions),
                ", ".join(f"{100 * m:.1f} %" for m in moved_fractions), nll_after, nll_before,
                "the new poses and their map kept" if kept else "the old poses kept",
                record["seconds"])
    return record
