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

Everything here depends on the configuration, the epoch and ``search_stopped_after`` only, so
a resumed run (which restores ``search_stopped_after`` from the checkpoint) follows the same
plan as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math

from cryospin.train.config import ScheduleConfig

__all__ = [
    "with_step_budget",
    "stage1_batches",
    "last_search_epoch",
    "final_epoch",
    "is_search_epoch",
    "search_stops",
    "decay_fraction",
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


def final_epoch(schedule: ScheduleConfig, search_stopped_after: int | None) -> int:
    """The run's last epoch: ``epochs``, or after an early stop at ``s`` the
    ``epochs - switch_epoch - search_epochs`` local epochs after ``s`` (none when ``epochs``
    would have cut the search short)."""
    if search_stopped_after is None:
        return schedule.epochs
    local = schedule.epochs - schedule.switch_epoch - schedule.search_epochs
    return search_stopped_after + max(local, 0)


def is_search_epoch(schedule: ScheduleConfig, epoch: int,
                    search_stopped_after: int | None) -> bool:
    """Whether stage-2 epoch ``epoch`` starts its batches with the global search."""
    return schedule.switch_epoch < epoch <= last_search_epoch(schedule, search_stopped_after)


def search_stops(schedule: ScheduleConfig, epoch: int, jump_fraction: float | None) -> bool:
    """Whether the global search ends early after search epoch ``epoch`` in which a fraction
    ``jump_fraction`` of the particles jumped (``EpochStats.jump_fraction``).

    True only for a search epoch ``switch_epoch + s`` with
    ``search_min_epochs <= s < search_epochs`` (the last one ends the search anyway) and
    ``jump_fraction < search_stop_fraction``; never with ``search_min_epochs = None`` or
    without a measured fraction.
    """
    low = schedule.search_min_epochs
    s = epoch - schedule.switch_epoch
    if low is None or jump_fraction is None or math.isnan(jump_fraction):
        return False
    return low <= s < schedule.search_epochs and jump_fraction < schedule.search_stop_fraction


def decay_fraction(schedule: ScheduleConfig, epoch: int,
                   search_stopped_after: int | None) -> float:
    """Progress in [0, 1] of the stage-2 learning-rate decay at ``epoch``: 0 up to the last
    search epoch, then linear in the epoch, 1 at the run's last epoch (:func:`final_epoch`)."""
    first = last_search_epoch(schedule, search_stopped_after)  # last epoch at the full rate
    span = final_epoch(schedule, search_stopped_after) - first
    if span <= 0 or epoch <= first:
        return 0.0
    return min((epoch - first) / span, 1.0)
