"""The epoch plan: stage 1's step budget, and stage 2's when the global search may stop early;
pure functions of the schedule, the batches per epoch and the epoch after which the search
stopped.

A step budget (``switch_steps = T``, ``P`` batches per epoch) is turned into epochs by
:func:`with_step_budget`: stage 1 runs ``K' = ceil(T / P)`` epochs, the last one cut after
``T − (K' − 1) P`` batches (:func:`stage1_batches`), and the ``epochs − switch_epoch`` stage-2
epochs follow (``epochs' = K' + epochs − switch_epoch``). Everything below then works on that
schedule.

Epochs are counted from 1 (``cryospin.train.config``). With ``K = switch_epoch``,
``S = search_epochs`` and ``E = epochs``, stage 2 runs the search in epochs ``K+1 .. K+S`` and
local refinement in ``K+S+1 .. E``. When the search stops early after epoch ``s < K+S``
(``search_stopped_after = s``; :func:`search_stops`), the ``E - K - S`` local epochs follow at
once, in epochs ``s+1 .. s + E - K - S``: the run ends ``K + S - s`` epochs before ``E``, and the
learning-rate decay runs from ``s`` to that new last epoch (:func:`decay_fraction`).
``search_stopped_after = None`` (the search did not stop early) gives the plan without early
stop, for any ``search_min_epochs``.

The learning rates and radii follow the same plan: stage 1's loss radius under frequency
marching (:func:`stage1_loss_radius`, :func:`loss_radius_schedule`) and its annealed encoder
learning rate (:func:`stage1_encoder_lr`, :func:`encoder_lr_schedule`), stage 2's decaying volume
and pose learning rates (:func:`stage2_decoder_lr`, :func:`stage2_pose_lrs`) and the global
search's disc radius (:func:`search_radius_px`).

Everything here depends on the configuration, the epoch and ``search_stopped_after`` only, so
a resumed run (which restores ``search_stopped_after`` from the checkpoint) follows the same
plan as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from cryospin.train.config import Config, ScheduleConfig
from cryospin.train.metrics import SearchStopRule

__all__ = [
    "with_step_budget",
    "stage1_batches",
    "last_search_epoch",
    "final_epoch",
    "earliest_search_stop",
    "is_search_epoch",
    "PLATEAU_MIN_DROP",
    "search_stops",
    "impose_epoch",
    "decay_fraction",
    "stage1_loss_radius",
    "stage1_encoder_lr",
    "encoder_lr_schedule",
    "loss_radius_schedule",
    "final_stage1_radius",
    "stage2_decoder_lr",
    "stage2_pose_lrs",
    "search_radius_px",
]


def with_step_budget(schedule: ScheduleConfig, batches_per_epoch: int) -> ScheduleConfig:
    """The schedule in epochs: ``schedule`` itself without ``switch_steps``; with it,
    ``switch_epoch = ceil(switch_steps / batches_per_epoch)`` and ``epochs`` = that plus the
    ``epochs − switch_epoch`` stage-2 epochs of ``schedule`` (``switch_steps`` kept)."""
    steps = schedule.switch_steps
    if steps is None:
        return schedule
    per_epoch = max(int(batches_per_epoch), 1)
    stage1 = math.ceil(int(steps) / per_epoch)
    stage2 = max(schedule.epochs - schedule.switch_epoch, 0)
    return dataclasses.replace(schedule, switch_epoch=stage1, epochs=stage1 + stage2)


def stage1_batches(schedule: ScheduleConfig, epoch: int, batches_per_epoch: int) -> int | None:
    """How many batches stage-1 epoch ``epoch`` runs: None (all of them) without a step budget
    or before the last stage-1 epoch, else the budget's remainder (``1 .. batches_per_epoch``).
    ``schedule`` as returned by :func:`with_step_budget`."""
    steps = schedule.switch_steps
    if steps is None or epoch < schedule.switch_epoch:
        return None
    left = int(steps) - (epoch - 1) * int(batches_per_epoch)
    return None if left >= batches_per_epoch else max(left, 0)


def last_search_epoch(schedule: ScheduleConfig, search_stopped_after: int | None) -> int:
    """The last epoch with a global search (``switch_epoch`` when there is none)."""
    if search_stopped_after is not None:
        return search_stopped_after
    return schedule.switch_epoch + schedule.search_epochs


def impose_epoch(schedule: ScheduleConfig, search_stopped_after: int | None) -> int:
    """The epoch that starts with the impose-symmetry step (:mod:`cryospin.train.impose`):
    the first after the global search, or with ``impose_symmetry = during_search`` the first
    after its ``search_min_epochs`` (all of it without a minimum)."""
    last = last_search_epoch(schedule, search_stopped_after)
    low = schedule.search_min_epochs
    if schedule.impose_symmetry == "during_search" and low is not None:
        last = min(last, schedule.switch_epoch + low)
    return last + 1


def final_epoch(schedule: ScheduleConfig, search_stopped_after: int | None) -> int:
    """The run's last epoch: ``epochs``, or after an early stop at ``s`` the
    ``epochs - switch_epoch - search_epochs`` local epochs after ``s`` (none when ``epochs``
    would have cut the search short)."""
    if search_stopped_after is None:
        return schedule.epochs
    local = schedule.epochs - schedule.switch_epoch - schedule.search_epochs
    return search_stopped_after + max(local, 0)


def earliest_search_stop(schedule: ScheduleConfig, epoch: int,
                         search_stopped_after: int | None) -> int | None:
    """The earliest epoch after which the global search can still end early
    (:func:`search_stops`), for a run in epoch ``epoch`` (itself included: the stop comes at an
    epoch's end): ``max(epoch, switch_epoch + search_min_epochs)`` while that is a search epoch
    before the last; None when the search has stopped, has no early stop
    (``search_min_epochs`` None) or cannot stop early any more."""
    low = schedule.search_min_epochs
    if search_stopped_after is not None or low is None:
        return None
    earliest = max(epoch, schedule.switch_epoch + low, schedule.switch_epoch + 1)
    return earliest if earliest < schedule.switch_epoch + schedule.search_epochs else None


def is_search_epoch(schedule: ScheduleConfig, epoch: int,
                    search_stopped_after: int | None) -> bool:
    """Whether stage-2 epoch ``epoch`` starts its batches with the global search."""
    return schedule.switch_epoch < epoch <= last_search_epoch(schedule, search_stopped_after)


#: The plateau rule (``schedule.search_plateau_fraction``): a search epoch's jump fraction that
#: fell by less than this share of the previous search epoch's has stopped falling.
PLATEAU_MIN_DROP = 0.25


def search_stops(schedule: ScheduleConfig, epoch: int, jump_fraction: float | None,
                 previous_fraction: float | None = None,
                 loss_drop_nats: float | None = None) -> SearchStopRule | None:
    """Whether the global search ends early after search epoch ``epoch`` in which a fraction
    ``jump_fraction`` of the particles jumped (``EpochStats.jump_fraction``; the search epoch
    before it: ``previous_fraction``): the rule that stops it, or None (it goes on).

    Only after a search epoch ``switch_epoch + s`` with ``search_min_epochs <= s <
    search_epochs`` (the last one ends the search anyway), and then when one of these holds:

    * ``"few"``: few particles jumped, ``jump_fraction < search_stop_fraction``;
    * ``"plateau"``: the jumps no longer fall, ``jump_fraction <
      search_plateau_fraction`` and ``jump_fraction > (1 - PLATEAU_MIN_DROP) *
      previous_fraction``. On a pseudo-symmetric particle a few per cent of the particles flip
      between near-identical copies in every search epoch, and more search epochs do not
      settle them (6VYB, 60,000 particles: 2.9, 2.8, 2.7, 2.8, 2.7, 2.7 % in search epochs
      3-8; benchmarks/RESULTS.md);
    * ``"settled"``: the fit no longer improves, ``loss_drop_nats`` (the search epoch
      before's mean loss less this one's, nats per image) below ``search_settled_nats``: the
      particles that still jump do not make the images fit better (a symmetric particle's
      jumps between its exact copies in C1: the D7 ring at 64 px, 40 % jumping, its loss
      falling by 0.1-0.5 nats per search epoch; benchmarks/RESULTS.md).

    Never with ``search_min_epochs = None`` or without a measured fraction; the plateau rule
    never without ``previous_fraction``, the settled rule never without ``loss_drop_nats``.
    When several hold, the first in this order is named.
    """
    low = schedule.search_min_epochs
    s = epoch - schedule.switch_epoch
    if (low is None or jump_fraction is None or math.isnan(jump_fraction)
            or not low <= s < schedule.search_epochs):
        return None
    if jump_fraction < schedule.search_stop_fraction:
        return "few"
    if previous_fraction is not None and not math.isnan(previous_fraction) and (
            jump_fraction < schedule.search_plateau_fraction
            and jump_fraction > (1.0 - PLATEAU_MIN_DROP) * previous_fraction):
        return "plateau"
    if loss_drop_nats is not None and math.isfinite(loss_drop_nats) \
            and loss_drop_nats < schedule.search_settled_nats:
        return "settled"
    return None


def decay_fraction(schedule: ScheduleConfig, epoch: int,
                   search_stopped_after: int | None) -> float:
    """Progress in [0, 1] of the stage-2 learning-rate decay at ``epoch``: 0 up to the last
    search epoch, then linear in the epoch, 1 at the run's last epoch (:func:`final_epoch`)."""
    first = last_search_epoch(schedule, search_stopped_after)  # last epoch at the full rate
    span = final_epoch(schedule, search_stopped_after) - first
    if span <= 0 or epoch <= first:
        return 0.0
    return min((epoch - first) / span, 1.0)


def stage1_loss_radius(
    step: int, total_steps: int, start_px: float | None, end_px: float
) -> float | None:
    """Loss radius of stage-1 step ``step`` (0-based) under frequency marching.

    The radius grows linearly from ``start_px`` at step 0 to ``end_px`` at the last step
    ``total_steps − 1`` (the switch); ``None`` when ``start_px`` is None (no marching).
    Pure: the same step always gives the same radius (resume is exact).
    """
    if start_px is None:
        return None
    frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return float(start_px) + frac * (float(end_px) - float(start_px))


def _stage1_steps(schedule: ScheduleConfig, batches_per_epoch: int) -> int:
    """Stage 1's optimizer steps: the step budget, or its epochs' batches (at least one
    epoch's: a run that never trains stage 1 still has a schedule)."""
    if schedule.switch_steps is not None:
        return int(schedule.switch_steps)
    return max(schedule.switch_epoch, 1) * batches_per_epoch


def loss_radius_schedule(config: Config, box_px: int, batches_per_epoch: int,
                         epoch: int) -> Callable[[int], float | None] | None:
    """``b -> loss radius`` (px) of batch ``b`` (from 1) of stage-1 epoch ``epoch`` (None: no
    marching); ``box_px`` the training box, ``config.schedule`` as run
    (:func:`with_step_budget`)."""
    s = config.schedule
    if s.loss_radius_start_px is None:
        return None
    full = float(box_px // 2 - 1 if config.data.loss_radius_px is None
                 else config.data.loss_radius_px)
    end = full if s.loss_radius_end_px is None else min(float(s.loss_radius_end_px), full)
    start = min(float(s.loss_radius_start_px), end)
    per_epoch = batches_per_epoch
    total = _stage1_steps(s, per_epoch)

    def radius(b: int) -> float | None:
        return stage1_loss_radius((epoch - 1) * per_epoch + b - 1, total, start, end)

    return radius


def stage1_encoder_lr(step: int, total_steps: int, start_lr: float, final_lr: float,
                      decay_start: float) -> float:
    """Encoder learning rate of stage-1 step ``step`` (0-based) of ``total_steps``: ``start_lr``
    up to step ``decay_start * total_steps``, then linear to ``final_lr`` at the last step
    (``total_steps - 1``), ``final_lr`` after it."""
    first, last = decay_start * total_steps, total_steps - 1
    if step <= first:
        return start_lr
    if step >= last:
        return final_lr
    return start_lr + (step - first) / (last - first) * (final_lr - start_lr)


def encoder_lr_schedule(config: Config, batches_per_epoch: int,
                        epoch: int) -> Callable[[int], float] | None:
    """``b -> encoder learning rate`` of batch ``b`` (from 1) of stage-1 epoch ``epoch`` (None:
    constant, ``optim.encoder_lr_final`` unset); ``config.schedule`` as run
    (:func:`with_step_budget`)."""
    o, s = config.optim, config.schedule
    if o.encoder_lr_final is None:
        return None
    start, final, decay_start = o.encoder_lr, o.encoder_lr_final, o.encoder_lr_decay_start
    per_epoch = batches_per_epoch
    total = _stage1_steps(s, per_epoch)

    def lr(b: int) -> float:
        return stage1_encoder_lr((epoch - 1) * per_epoch + b - 1, total, start, final,
                                 decay_start)

    return lr


def final_stage1_radius(config: Config, box_px: int, batches_per_epoch: int) -> float | None:
    """Loss radius (px) of the last stage-1 step (the inference pass at the switch uses it);
    None without marching."""
    s = config.schedule
    schedule = loss_radius_schedule(config, box_px, batches_per_epoch, max(s.switch_epoch, 1))
    if schedule is None:
        return None
    return schedule(stage1_batches(s, max(s.switch_epoch, 1), batches_per_epoch)
                    or batches_per_epoch)


def _stage2_decay(config: Config, epoch: int, start: float, final: float | None,
                  search_stopped_after: int | None) -> float:
    """``start`` up to the last search epoch, then geometric decay to ``final`` (None: constant)
    reached at the last epoch (both earlier after an early stop of the search:
    :func:`decay_fraction`)."""
    if final is None:
        return start
    frac = decay_fraction(config.schedule, epoch, search_stopped_after)
    if frac == 0.0:
        return start
    return start * (final / start) ** frac


def stage2_decoder_lr(config: Config, epoch: int,
                      search_stopped_after: int | None = None) -> float:
    """Volume learning rate of stage-2 epoch ``epoch`` (pure; see ``optim.decoder_lr_final``).

    Constant ``decoder_lr_after_switch`` up to the last search epoch, then geometric decay
    reaching ``decoder_lr_final`` at the last epoch; ``search_stopped_after``: the epoch after
    which the global search stopped early (None: it did not), which moves both earlier.
    """
    o = config.optim
    return _stage2_decay(config, epoch, o.decoder_lr_after_switch, o.decoder_lr_final,
                         search_stopped_after)


def stage2_pose_lrs(config: Config, epoch: int,
                    search_stopped_after: int | None = None) -> tuple[float, float]:
    """(rotation, shift) learning rates of stage-2 epoch ``epoch`` (pure; see
    ``optim.pose_lr_final``): the rotation rate decays like the volume's (also after an early
    stop of the search), the shift rate by the same factor."""
    o = config.optim
    rot = _stage2_decay(config, epoch, o.pose_lr, o.pose_lr_final, search_stopped_after)
    return rot, o.shift_lr * (rot / o.pose_lr)


def search_radius_px(config: Config, stage2_epoch: int, largest_px: float) -> float | None:
    """The global search's disc radius (px) in stage-2 epoch ``stage2_epoch`` (from 1): from
    ``optim.search_radius_px`` to ``optim.search_radius_end_px`` over the search epochs, at
    most ``largest_px`` (the training disc's); None after the search epochs."""
    count = config.schedule.search_epochs
    if stage2_epoch > count:
        return None
    o = config.optim
    start = o.search_radius_px
    end = start if o.search_radius_end_px is None else o.search_radius_end_px
    radius = start + (end - start) * (stage2_epoch - 1) / max(count - 1, 1)
    return min(radius, largest_px)
