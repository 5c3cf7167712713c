"""Progress arithmetic of a training run: which kind of epoch comes when, how fast each kind
goes, and the ETAs shown while a run trains (:mod:`cryospin.train.feedback` shows them).

Pure functions of the schedule, the epoch and measured throughputs: no clock, no I/O.

An epoch's **phase** is one of

* ``"autoencode"`` — stage 1 (epochs ``1 .. switch_epoch``);
* ``"search"`` — a stage-2 epoch whose batches start with the global rotation search
  (``switch_epoch + 1 .. last_search_epoch``; fewer after an early stop of the search,
  :func:`cryospin.train.schedule.last_search_epoch`);
* ``"local"`` — a stage-2 epoch of local refinement only.

Their speeds differ several-fold, and by box size (:func:`relative_speed`), so the run's ETA
adds up, phase by phase, the images still to train divided by that phase's images/s
(:func:`run_eta_s`): the rate measured in this run for every phase that has run
(``metrics.jsonl`` of earlier epochs, the current epoch so far), else the current phase's rate
scaled by :func:`relative_speed`.

The ETA also counts the backprojections still ahead (:data:`BACKPROJECT`, not an epoch
phase): the volume re-made from the poses when the search ends
(``optim.rebackproject_after_search``) and at the start of each search epoch from the second
(``optim.rebackproject_during_search``; counted up to the maximum number of search epochs,
like the search epochs themselves; :class:`RunEstimate` adds the ETA if the search stopped
at the first chance), and the final map with the particles' scores. Their
"images" are weighted by the insertions each image costs (:func:`insertion_weight`; ``|G| /
|P|`` with a point group in the final map, :func:`cryospin.symmetry.grid_cosets`; one in the
re-made volume; less for a low-pass one, :func:`lowpass_weight`), their rate is the
re-made volume's measured one when it has run, else
estimated like an unmeasured phase. Left out: the per-epoch map and checkpoint writes, the
switch's inference pass (seconds at most).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryospin.backproject import inserted_frequencies
from cryospin.rundir import Stage
from cryospin.train.config import ScheduleConfig
from cryospin.train.schedule import final_epoch, last_search_epoch

__all__ = [
    "AUTOENCODE",
    "SEARCH",
    "LOCAL",
    "PHASES",
    "PHASE_LABELS",
    "BACKPROJECT",
    "relative_speed",
    "insertion_weight",
    "lowpass_weight",
    "backprojection_images",
    "RunPlan",
    "PhaseTotals",
    "phase_totals",
    "add_sample",
    "estimate_rates",
    "eta_s",
    "run_eta_s",
    "RunEstimate",
    "format_run_eta",
    "format_duration",
    "progress_line",
]

#: Stage 1's phase: the stage's own name (:class:`cryospin.rundir.Stage`).
AUTOENCODE: str = Stage.AUTOENCODE
SEARCH = "search"
LOCAL = "local"
PHASES = (AUTOENCODE, SEARCH, LOCAL)
#: How the progress display names each phase.
PHASE_LABELS: Mapping[str, str] = {AUTOENCODE: "stage 1", SEARCH: "stage 2, search",
                                   LOCAL: "stage 2, local"}
#: The backprojections' work (module docstring): not an epoch phase, a rate like one.
BACKPROJECT = "backprojection"
#: The final map's particle-scoring pass, in C1 backprojections of the same particles.
SCORES_WEIGHT = 0.25

def relative_speed(box_px: int) -> dict[str, float]:
    """Images/s of each phase relative to stage 1 at a training box of ``box_px`` pixels,
    for a phase not yet measured in this run (from its first epoch on, the measured rate is
    used): stage 1 1, search 1.6, local 1.6 · 64 / ``box_px``, and a C1 backprojection
    (:data:`BACKPROJECT`) 3.6 · 64 / ``box_px``.

    A search epoch's cost is mostly the grid search on a fixed low-frequency disc, a local
    epoch's the pose and volume steps on the whole training disc, so the local epochs slow
    down with the box and the search epochs much less. Measured (``default`` preset, bf16,
    Intel Xeon with AMX, 2026-12-06; images/s from ``metrics.jsonl``, median over a run's
    epochs of each phase): 32 px (1,000 particles, one thread) stage 1 ~365, search
    870-1,070, local 2,030-2,430; two threads: 64 px (20,000; spike, ADK, D7, coloured
    sets) stage 1 510-590, search 860-1,250, local 860-1,360 (local / search 0.97 with D7
    imposed, else 1.07-1.5);
    128 px (20,000 spike) stage 1 225-250, search 555-670, local 292-305 (local / search
    0.46-0.53). So search / stage 1 is 1.6-2.5 and local / search about 2.3 / 1.2 / 0.52 at
    32 / 64 / 128 px, ~77 / ``box_px``. These factors are below every measured ``default``
    run's but the local epochs with D7 imposed (3 % above), so the estimate errs on the long
    side. The re-made volume's C1 backprojection (the same runs' ``rebackproject`` records):
    5,300 images/s at 32 px (one thread), 1,960-2,200 at 64 px, 455 at 128 px: 14, 3.7-4.2
    and 1.9 times stage 1's rate."""
    search = 1.6
    return {AUTOENCODE: 1.0, SEARCH: search, LOCAL: search * 64.0 / box_px,
            BACKPROJECT: 3.6 * 64.0 / box_px}


def insertion_weight(insertions: int) -> float:
    """A backprojection's cost per image with ``insertions`` insertions per image, in C1
    backprojections (one insertion): ``0.4 + 0.6 · insertions``, the image's transforms
    and CTF being computed once. Measured (``backproject_particles``, 20,000 images at 64 px,
    two threads, the scatter by corner): D7 (7 insertions) 36.1 s against 8.6 s for C1, 4.2
    times (the formula gives 4.6: long by 10 %)."""
    return 0.4 + 0.6 * insertions


def lowpass_weight(box_px: int, radius_px: int | None) -> float:
    """A backprojection's cost per image when only the shells ``round(|k|) <= radius_px`` are
    made (:func:`cryospin.backproject.backproject`'s ``radius_px``), in backprojections of
    every frequency: ``0.15 + 0.85 · f``, ``f`` the share of the ``L²`` image frequencies
    inserted (:func:`cryospin.backproject.inserted_frequencies`); 1 for ``radius_px`` None.

    Measured (20,000 images with their true poses, C1, two threads, Intel Xeon with AMX,
    radius 18): 128 px 10.6 s against 47.2 s (0.22; the formula 0.22), 64 px 4.0 s against
    9.8 s (0.41; the formula 0.42): the transforms and the solve, ~15 % of a whole one, are
    paid in full."""
    if radius_px is None:
        return 1.0
    L = int(box_px)
    keep, _ = inserted_frequencies(L, radius_px)
    return 0.15 + 0.85 * int(keep.numel()) / (L * L)


def backprojection_images(particles: int, insertions: int, *, rebackproject: bool,
                          final: bool) -> tuple[float, float]:
    """The backprojections' work, in C1-backprojected images (:data:`BACKPROJECT`'s unit):
    ``(the re-made volume's, the final map's)`` for ``particles`` images, 0 for one that does
    not come. The re-made volume inserts each image once whatever the group (its sums are
    averaged over the group by resampling, :mod:`cryospin.train.rebackproject`); the final map
    ``insertions`` times (:func:`insertion_weight`) and adds the particles' scores
    (:data:`SCORES_WEIGHT`). Measured, the final map and scores against the re-made volume:
    1.2 times at 64 and 128 px (C1)."""
    return (float(particles) if rebackproject else 0.0,
            particles * (insertion_weight(insertions) + SCORES_WEIGHT) if final else 0.0)


#: ``phase -> (images, seconds)`` trained so far (summed over epochs).
PhaseTotals = Mapping[str, tuple[float, float]]


@dataclass(frozen=True)
class RunPlan:
    """The epochs of a run, as far as they are known now.

    Attributes
    ----------
    switch_epoch : int
        Last stage-1 epoch (0: the switch comes before epoch 1; ``epochs`` for the methods that
        never switch).
    last_search_epoch : int
        Last epoch with the global search (``switch_epoch`` or less: none).
    last_epoch : int
        Last epoch this invocation trains (the run's last, or ``--stop-after``).
    rebackproject_images : float
        The volume re-made from the poses at the start of epoch ``last_search_epoch + 1``, in
        C1-backprojected images (:func:`backprojection_images`; 0: none).
    final_images : float
        The final map and the particles' scores after ``last_epoch``, likewise (0: this
        invocation stops before the run's end).
    search_rebackproject_images : float
        The volume re-made at the start of each search epoch from the second
        (``switch_epoch + 2 .. last_search_epoch``), likewise, per epoch (0: none; a low-pass
        one weighted by :func:`lowpass_weight`).
    """

    switch_epoch: int
    last_search_epoch: int
    last_epoch: int
    rebackproject_images: float = 0.0
    final_images: float = 0.0
    search_rebackproject_images: float = 0.0

    @classmethod
    def from_schedule(cls, schedule: ScheduleConfig, *, switch_epoch: int,
                      search_stopped_after: int | None, last_epoch: int | None = None,
                      particles: int = 0, insertions: int = 1,
                      rebackproject: bool = False,
                      rebackproject_during_search: bool = False,
                      search_rebackproject_weight: float = 1.0) -> RunPlan:
        """The plan of ``schedule`` (``last_epoch`` None: the run's last,
        :func:`~cryospin.train.schedule.final_epoch`, which an early stop shortens), with the
        backprojections of ``particles`` images (``insertions`` each): the final map when
        ``last_epoch`` is the run's last, the re-made volume when ``rebackproject`` and a
        search runs (``optim.rebackproject_after_search``), and at the start of each search
        epoch from the second when ``rebackproject_during_search``, each image weighted by
        ``search_rebackproject_weight`` (:func:`lowpass_weight`; none here for 0
        particles)."""
        final = final_epoch(schedule, search_stopped_after)
        end = final if last_epoch is None else last_epoch
        last_search = last_search_epoch(schedule, search_stopped_after)
        rb, fin = backprojection_images(
            particles, insertions, final=end >= final,
            rebackproject=rebackproject and schedule.search_epochs > 0
            and last_search > switch_epoch)
        return cls(switch_epoch, last_search, end, rb, fin,
                   particles * search_rebackproject_weight if rebackproject_during_search
                   else 0.0)

    def phase(self, epoch: int) -> str:
        """Phase of ``epoch`` (module docstring)."""
        if epoch <= self.switch_epoch:
            return AUTOENCODE
        if epoch <= self.last_search_epoch:
            return SEARCH
        return LOCAL

    def remaining_images(self, epoch: int, images_done: float,
                         images_per_epoch: float) -> dict[str, float]:
        """Images still to train, by phase, from ``images_done`` into ``epoch`` to the end of
        ``last_epoch``, and the backprojections still ahead (:data:`BACKPROJECT`; a re-made
        volume until its epoch starts); phases with none left are absent."""
        out: dict[str, float] = {}
        for e in range(epoch, self.last_epoch + 1):
            left = images_per_epoch - images_done if e == epoch else images_per_epoch
            if left > 0:
                out[self.phase(e)] = out.get(self.phase(e), 0.0) + left
        bp = self.final_images
        if epoch <= self.last_search_epoch < self.last_epoch:
            bp += self.rebackproject_images
        first = max(epoch + 1, self.switch_epoch + 2)  # search epochs that start with one
        bp += self.search_rebackproject_images * max(
            0, min(self.last_search_epoch, self.last_epoch) - first + 1)
        if bp > 0:
            out[BACKPROJECT] = bp
        return out


def phase_totals(rows: Iterable[Mapping[str, object]], plan: RunPlan,
                 box_px: int) -> dict[str, tuple[float, float]]:
    """``phase -> (images, seconds)`` of the epochs in ``metrics.jsonl`` rows
    (:func:`cryospin.rundir.read_metrics`) of a run at training box ``box_px``; rows without a
    positive training time are skipped. A row's re-made volume (``extra.rebackproject``: one
    insertion per image, weighted by :func:`lowpass_weight` of its ``radius_px``) adds to
    :data:`BACKPROJECT`."""
    totals: dict[str, tuple[float, float]] = {}
    for row in rows:
        extra = row.get("extra")
        record = extra.get("rebackproject") if isinstance(extra, Mapping) else None
        if isinstance(record, Mapping):
            n, spent = record.get("images"), record.get("seconds")
            if (isinstance(n, int | float) and isinstance(spent, int | float)
                    and n > 0 and spent > 0):
                radius = record.get("radius_px")
                weight = lowpass_weight(box_px, radius if isinstance(radius, int) else None)
                totals = add_sample(totals, BACKPROJECT, float(n) * weight, float(spent))
        images, seconds = row.get("num_images"), row.get("wall_time_s")
        if not isinstance(images, int | float) or not isinstance(seconds, int | float):
            continue
        if not (seconds > 0 and images > 0):
            continue
        epoch = row.get("epoch")
        phase = (AUTOENCODE if row.get("stage") == Stage.AUTOENCODE
                 else plan.phase(int(epoch)) if isinstance(epoch, int) else None)
        if phase is None:
            continue
        totals = add_sample(totals, phase, float(images), float(seconds))
    return totals


def add_sample(totals: PhaseTotals, phase: str, images: float,
               seconds: float) -> dict[str, tuple[float, float]]:
    """``totals`` with ``images`` trained in ``seconds`` added to ``phase`` (a new mapping)."""
    out = dict(totals)
    done, spent = out.get(phase, (0.0, 0.0))
    out[phase] = (done + images, spent + seconds)
    return out


def estimate_rates(totals: PhaseTotals, current_phase: str,
                   speeds: Mapping[str, float]) -> dict[str, float]:
    """Images/s of every phase: measured where ``totals`` has it; a phase never measured gets
    the current phase's rate (else the first measured one's) times the ratio of their
    ``speeds`` (:func:`relative_speed`; a phase it lacks gets none). Empty when nothing has
    been measured yet."""
    rates = {p: images / seconds for p, (images, seconds) in totals.items()
             if seconds > 0 and images > 0}
    if not rates:
        return {}
    ref = current_phase if current_phase in rates else next(
        p for p in (*PHASES, BACKPROJECT) if p in rates)
    for p in speeds:
        if p not in rates:
            rates[p] = rates[ref] * speeds[p] / speeds[ref]
    return rates


def eta_s(remaining: Mapping[str, float], rates: Mapping[str, float]) -> float | None:
    """Seconds to train ``remaining`` images (by phase) at ``rates`` images/s (None when a
    phase with images left has no rate)."""
    total = 0.0
    for phase, images in remaining.items():
        if images <= 0:
            continue
        rate = rates.get(phase)
        if rate is None or not rate > 0:
            return None
        total += images / rate
    return total


def run_eta_s(plan: RunPlan, epoch: int, images_done: float, images_per_epoch: float,
              totals: PhaseTotals, speeds: Mapping[str, float]) -> float | None:
    """Seconds until the end of ``plan.last_epoch``, ``images_done`` into ``epoch``.

    ``totals`` holds what this run has measured, the current epoch so far included
    (:func:`add_sample`); ``speeds`` those of the run's box (:func:`relative_speed`); None
    before anything was measured.
    """
    rates = estimate_rates(totals, plan.phase(epoch), speeds)
    return eta_s(plan.remaining_images(epoch, images_done, images_per_epoch), rates)


@dataclass(frozen=True)
class RunEstimate:
    """The run's ETA: ``seconds`` to its end as planned now (the global search running to its
    maximum number of epochs; None: unknown), and, while the search can still stop early
    (:func:`cryospin.train.schedule.earliest_search_stop`), ``early_seconds`` if it stopped
    after epoch ``early_epoch`` (None: no such stop ahead)."""

    seconds: float | None
    early_seconds: float | None = None
    early_epoch: int | None = None


def format_run_eta(estimate: RunEstimate | None) -> str:
    """``"11 min 40 s"``; with an earlier end still possible ``"11 min 40 s (7 min 10 s if the
    search stops after epoch 5)"`` (not when the two read the same); ``"?"`` when unknown."""
    if estimate is None:
        return "?"
    text = format_duration(estimate.seconds)
    early, epoch = estimate.early_seconds, estimate.early_epoch
    if (early is not None and epoch is not None and estimate.seconds is not None
            and early < estimate.seconds and format_duration(early) != text):
        text += f" ({format_duration(early)} if the search stops after epoch {epoch})"
    return text


def format_duration(seconds: float | None) -> str:
    """``"42 s"``, ``"7 min 05 s"``, ``"2 h 03 min"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_line(label: str, done: float, total: float, elapsed_s: float, *,
                  what: str = "pass", run_eta: RunEstimate | None = None,
                  with_run_eta: bool = False) -> str:
    """One line of progress: ``"epoch 3/12 (stage 2, search): 1,280/5,000 images (26 %),
    57.1 images/s, ETA epoch 1 min 05 s, run 12 min 30 s"``.

    ``what`` names the pass in the ETA (``"epoch"``); ``with_run_eta`` adds the run's ETA
    (``run_eta``, :func:`format_run_eta`; "?" when None).
    """
    rate = done / elapsed_s if elapsed_s > 0 else float("nan")
    left = (total - done) / rate if done > 0 and rate > 0 else None
    pct = 100.0 * done / total if total > 0 else 100.0
    line = (f"{label}: {int(round(done)):,}/{int(round(total)):,} images ({pct:.0f} %), "
            f"{rate:.1f} images/s, ETA {what} {format_duration(left)}")
    if with_run_eta:
        line += f", run {format_run_eta(run_eta)}"
    return line
