"""The switch from stage 1 to stage 2: every particle's best head seeds the pose table.

One inference pass of the trained encoder picks each particle's best head
(:func:`~cryospin.train.autoencode.infer_best_poses`); with ``schedule.switch_poses =
last_epoch`` the winners recorded while training the last stage-1 epoch are used instead, and
only the particles that epoch did not visit (a step budget's cut epoch) are inferred. With
``optim.switch_hypotheses = K > 1`` the inference pass keeps each particle's ``K`` best heads,
refined locally before the best is kept (:mod:`cryospin.train.hypotheses`). A search-only run
(``schedule.search_only``) has no encoder: every particle starts from a random rotation (the
run's seed), which the first global-search epoch replaces. Under
``torchrun`` each rank infers its own particles into the rows it owns; the head usage and the
mean loss are summed over the ranks.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from cryospin.losses import head_usage
from cryospin.pose import PoseTable
from cryospin.rotations import random_rotations
from cryospin.train.autoencode import BestPoses, HeadPoses, infer_best_poses, infer_head_poses
from cryospin.train.config import Config
from cryospin.train.data import TrainingData
from cryospin.train.distributed import Shard
from cryospin.train.feedback import Feedback
from cryospin.train.hypotheses import HypothesisSettings, refine_hypotheses
from cryospin.train.metrics import EpochExtra, HypothesesRecord, SwitchRecord
from cryospin.train.state import build_pose_table
from cryospin.volume import HartleyVolume

__all__ = ["switch_poses", "full_record", "full_pose_table", "hypothesis_count"]

logger = logging.getLogger(__name__)


def switch_poses(
    config: Config, encoder: nn.Module | None, volume: HartleyVolume, data: TrainingData,
    shard: Shard | None = None, feedback: Feedback | None = None, *,
    record: BestPoses | None = None, loss_radius_px: float | None = None,
) -> tuple[PoseTable, EpochExtra]:
    """The switch: best head of every particle -> pose table (distributed: of this rank's
    particles, into the rows it owns; head usage and loss over all ranks), and its
    ``metrics.jsonl`` record (``{"switch": ...}``). ``feedback`` shows the inference pass's
    progress; ``loss_radius_px``: the last stage-1 step's loss radius (None: the full disc).
    With ``record`` (the last stage-1 epoch's winners, ``schedule.switch_poses =
    last_epoch``) there is no inference pass; without an encoder (a search-only run), random
    rotations."""
    t0 = time.perf_counter()
    if encoder is None:
        if not config.schedule.search_only:
            raise ValueError("only a search-only run switches without an encoder")
        return _random_start(config, data, t0)
    hypotheses: HypothesesRecord | None = None
    owned = None if shard is None else shard.owned(len(data))
    count = len(data) if owned is None else int(owned.numel())
    if record is not None:
        best = record if owned is None else record.rows(owned)
        missing = torch.nonzero(best.best_head < 0).flatten()  # a step budget's cut epoch
        if missing.numel():
            rows = missing if owned is None else owned.to(missing.device)[missing]
            with (feedback or Feedback()).start("switch: inference pass (particles not "
                                                "seen in the last epoch)", int(rows.numel()),
                                                ) as progress:
                fill = infer_best_poses(
                    encoder, volume, data, batch_size=config.run.inference_batch_size,
                    loss_radius_px=loss_radius_px, lowpass_input=config.model.encoder_lowpass,
                    indices=rows.cpu(), progress=progress.update,
                )
            best.write(missing, fill.rotations, fill.shifts_px, fill.best_head, fill.loss)
    else:
        with (feedback or Feedback()).start("switch: inference pass", len(data),
                                            scale=len(data) / max(count, 1)) as progress:
            heads = infer_head_poses(
                encoder, volume, data, keep=hypothesis_count(config),
                batch_size=config.run.inference_batch_size, loss_radius_px=loss_radius_px,
                lowpass_input=config.model.encoder_lowpass, indices=owned,
                progress=progress.update,
            )
        best = heads.best()
        if hypothesis_count(config) > 1:
            best, hypotheses = _refine(config, volume, data, heads, owned, shard, feedback)
    rotations, shifts = best.rotations.float(), best.shifts_px
    usage_t = head_usage(best.best_head.cpu(), config.model.num_heads)
    mean_loss = float(best.loss.mean())
    if shard is not None:  # rows of the other ranks' particles: identity, never touched here
        n, m = len(data), float(best.loss.numel())
        rotations = shard.expand_rows(rotations, n, torch.eye(3))
        shifts = None if shifts is None else shard.expand_rows(shifts, n, torch.zeros(2))
        sums = shard.all_sum(torch.cat([usage_t.double() * m,
                                        best.loss.double().sum().reshape(1).cpu()]))
        usage_t, mean_loss = sums[:-1] / n, float(sums[-1]) / n
    table = build_pose_table(config, rotations, shifts)
    usage = usage_t.tolist()
    info: EpochExtra = {
        "switch": {
            "head_usage": usage,
            "mean_loss": mean_loss,
            "wall_time_s": time.perf_counter() - t0,
            "poses": "last_epoch" if record is not None else "inference",
        }
    }
    if hypotheses is not None:
        info["switch"]["hypotheses"] = hypotheses
    logger.info("switch to auto-decoding: head usage %s",
                " ".join(f"{u:.2f}" for u in usage))
    return table.to(data.device), info


def _random_start(config: Config, data: TrainingData,
                  t0: float) -> tuple[PoseTable, EpochExtra]:
    """Uniformly random rotations for every particle, `(N, 3, 3)` (the same on every rank:
    a generator seeded by the run's seed; shifts 0 px), for the global search to replace."""
    n = len(data)
    gen = torch.Generator(device="cpu").manual_seed(config.run.seed + 2)
    rotations = random_rotations(n, generator=gen, dtype=torch.float32)
    table = build_pose_table(config, rotations, torch.zeros(n, 2))
    record: SwitchRecord = {"head_usage": [], "mean_loss": None,
                            "wall_time_s": time.perf_counter() - t0, "poses": "random"}
    logger.info("search only: %d particles start from random rotations", n)
    return table.to(data.device), {"switch": record}


def hypothesis_count(config: Config) -> int:
    """Hypotheses per particle at the switch: ``optim.switch_hypotheses``, at most the number
    of heads."""
    return min(config.optim.switch_hypotheses, config.model.num_heads)


def _refine(
    config: Config, volume: HartleyVolume, data: TrainingData, heads: HeadPoses,
    owned: torch.Tensor | None, shard: Shard | None, feedback: Feedback | None,
) -> tuple[BestPoses, HypothesesRecord]:
    """Each particle's ``optim.switch_hypotheses`` heads refined, the best kept
    (:func:`~cryospin.train.hypotheses.refine_hypotheses`), and the record of it (over all
    ranks)."""
    t0 = time.perf_counter()
    o, m = config.optim, config.model
    settings = HypothesisSettings(
        steps=o.switch_refine_steps, radius_px=o.switch_refine_radius_px, lr_rot=o.pose_lr,
        lr_shift=o.shift_lr, max_shift_px=m.max_shift_px if m.predict_shifts else None,
        batch_size=o.batch_size,
    )
    n = int(heads.heads.shape[0])
    indices = torch.arange(n) if owned is None else owned.cpu()
    count = hypothesis_count(config)
    label = f"switch: refining {count} hypotheses per particle"
    scale = len(data) / max(n, 1)
    with (feedback or Feedback()).start(label, len(data), scale=scale) as progress:
        with torch.no_grad():
            volume_ht = volume()
        best = refine_hypotheses(volume_ht, heads, data, indices, settings, progress.update)
    other = torch.tensor([float((best.best_head != heads.heads[:, 0]).sum()), float(n)])
    if shard is not None:
        other = shard.all_sum(other)
    record: HypothesesRecord = {
        "count": count, "steps": o.switch_refine_steps,
        "radius_px": o.switch_refine_radius_px,
        "other_than_winner_fraction": float(other[0] / max(float(other[1]), 1.0)),
        "wall_time_s": time.perf_counter() - t0,
    }
    logger.info("switch: %.1f %% of the particles kept another hypothesis than the winner "
                "(%d per particle, %d steps each, %.0f s)",
                100 * record["other_than_winner_fraction"], count,
                o.switch_refine_steps, record["wall_time_s"])
    return best, record


def full_record(record: BestPoses | None, shard: Shard | None) -> BestPoses | None:
    """The switch record with every particle's row: ``record`` itself for one process; when
    distributed, gathered to rank 0 (None on the other ranks; collectives on every rank)."""
    if shard is None or record is None:
        return record
    rot, head, loss = (shard.gather_rows(t)
                       for t in (record.rotations, record.best_head, record.loss))
    shifts = None if record.shifts_px is None else shard.gather_rows(record.shifts_px)
    if rot is None or head is None or loss is None:  # not rank 0
        return None
    return BestPoses(rot, shifts, head, loss)


def full_pose_table(pose_table: PoseTable | None, shard: Shard | None) -> PoseTable | None:
    """The pose table with every particle's row: ``pose_table`` itself for one process; when
    distributed, gathered to rank 0 (None on the other ranks; a collective)."""
    if shard is None or pose_table is None:
        return pose_table
    return shard.gather_pose_table(pose_table)
