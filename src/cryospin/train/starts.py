"""Several starts of one reconstruction, the best kept (``cryospin reconstruct --starts K``).

Ab initio reconstruction is not convex: a run can settle on a wrong structure, and whether it
does can depend on its seed alone (:mod:`cryospin.train.choose`). :func:`fit_starts` runs the
same reconstruction ``K`` times, one after the other, from seeds ``run.seed``, ``run.seed +
1``, ..., and chooses the start whose images fit best (the lowest final loss,
:func:`cryospin.train.choose.choose_run`).

The run folder holds ``starts.json`` (the marker: the number of starts and their seeds),
``config.yaml`` (the shared configuration, seed = the first start's), ``particle_set.json``,
``run.log`` (everything, every start included) and ``start_1`` ... ``start_K``, each an
ordinary run folder (its own ``config.yaml``, checkpoints, ``map.mrc``, ``poses.star``, report).
On resume a finished start is skipped, an interrupted one resumed from its checkpoint, a
missing one started. Once every start has finished, the choice is recorded
(:func:`cryospin.train.choice_record.record_choice`): ``choice.json`` (every start's final
loss, and its map aligned onto the chosen one's) and ``chosen``, a relative link to the chosen
start's folder (so that ``RUN/chosen/map.mrc`` is the result), replaced atomically.

A starts folder can grow: :func:`add_start` names one more start in the marker, and the next
:func:`fit_starts` with ``resume`` runs it and chooses again (``reconstruct --halves`` adds a
start to a half whose images fit clearly worse than the other half's, :mod:`cryospin.train.halves`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryospin import __version__
from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError, OutputError
from cryospin.io.identity import check_same_particles, particle_set_identity, save_identity
from cryospin.io.particle_set import ParticleSet
from cryospin.rundir import (
    CHECKPOINT,
    METRICS,
    RunFiles,
    StartsFiles,
    marker_count,
)
from cryospin.train.choice_record import MapAgreement, record_choice
from cryospin.train.choose import RunOutcome, choose_run, run_outcome
from cryospin.train.config import Config, ScheduleConfig, save_config
from cryospin.train.distributed import WorldInfo, synchronise
from cryospin.train.fit import TrainingInterrupted, fit
from cryospin.train.progress import format_duration
from cryospin.train.runlog import header_line, run_log, start_run_log
from cryospin.train.setup import record_resume, run_status, workflow_folder

__all__ = ["StartsResult", "is_starts_run", "starts_of", "start_seeds", "add_start",
           "settled_epochs", "fit_starts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartsResult:
    """Outcome of :func:`fit_starts`.

    Attributes
    ----------
    run_dir : Path
    finished : bool
        Every start trained to its last epoch and its outputs written.
    epochs_completed : tuple[int, ...]
        Epochs done by each start.
    outcomes : tuple[RunOutcome, ...]
        Each start as :func:`cryospin.train.choose.run_outcome` reads it (empty when not
        finished).
    chosen : int or None
        Index (from 0) of the chosen start in ``outcomes`` (None when not finished).
    agreement : tuple[MapAgreement or None, ...]
        Each start's map aligned onto the chosen one's (None for the chosen start; empty when
        not finished).
    """

    run_dir: Path
    finished: bool
    epochs_completed: tuple[int, ...]
    outcomes: tuple[RunOutcome, ...] = ()
    chosen: int | None = None
    agreement: tuple[MapAgreement | None, ...] = ()


def is_starts_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a ``--starts`` run (its ``starts.json`` marker)."""
    return StartsFiles(run_dir).marker.is_file()


def start_seeds(seed: int, starts: int) -> list[int]:
    """The seeds of ``starts`` starts from ``seed``: ``seed, seed + 1, ...``."""
    return [seed + k for k in range(starts)]


def starts_of(run_dir: str | Path) -> int:
    """The number of starts of the ``--starts`` run in ``run_dir`` (its marker).

    Raises
    ------
    InputError
        No marker, or one that cannot be read.
    """
    return marker_count(StartsFiles(run_dir).marker, "starts", kind="--starts")


def add_start(run_dir: str | Path) -> int:
    """Name one more start in the marker of the ``--starts`` folder ``run_dir`` (its seed the
    next: the first start's + the count); returns the new count. The start runs, and the
    choice is made again, at the next :func:`fit_starts` with ``resume``. The marker is
    replaced atomically.

    Raises
    ------
    InputError
        No marker, or one that cannot be read.
    """
    files = StartsFiles(run_dir)
    count = starts_of(files.dir) + 1
    try:
        marker = json.loads(files.marker.read_text(encoding="utf-8"))
        first_seed = int(marker["seeds"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise InputError(f"{files.marker.name} is unreadable", files.marker) from None
    marker.update(starts=count, seeds=start_seeds(first_seed, count),
                  folders=[files.start_dir(k).name for k in range(1, count + 1)])
    atomic_write_text(files.marker, json.dumps(marker, indent=2) + "\n")
    return count


def settled_epochs(run_dir: str | Path, schedule: ScheduleConfig) -> tuple[int, ...] | None:
    """The epochs each start of the ``--starts`` folder ``run_dir`` has done when every start
    its marker names has finished (:func:`cryospin.train.setup.run_status` under
    ``schedule``) and ``choice.json`` and the ``chosen`` link cover them all; None otherwise
    (:func:`fit_starts` has something left to do)."""
    files = StartsFiles(run_dir)
    count = starts_of(files.dir)
    done = []
    for k in range(1, count + 1):
        status, epochs = run_status(files.start_dir(k), schedule)
        if status != "finished":
            return None
        done.append(epochs)
    try:
        runs = json.loads(files.choice.read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tuple(done) if len(runs) == count and files.chosen.is_dir() else None


def fit_starts(
    config: Config,
    particles: ParticleSet,
    run_dir: str | Path,
    *,
    starts: int | None = None,
    resume: bool = False,
    argv: list[str] | None = None,
    stop_after: int | None = None,
) -> StartsResult:
    """Run the starts one after the other, then choose among them and record the choice
    (module docstring).

    Parameters
    ----------
    config : Config
        Shared by every start; start ``k`` (from 1) runs with ``run.seed + k - 1``.
    particles : ParticleSet
    run_dir : path
        The ``--starts`` run folder.
    starts : int, optional
        Number of starts of a new run (at least 1; ``reconstruct --starts`` gives 2 or more:
        one start is a plain run, but a half of ``--halves`` is a starts folder from its first
        start, :func:`add_start`); on resume, the marker's (when given, it must agree).
    resume : bool
        Continue the run in ``run_dir`` (finished starts are skipped).
    argv : list of str, optional
        Command line, recorded in the config files.
    stop_after : int, optional
        Stop each start after this epoch (every start is brought to it), without choosing.

    Returns
    -------
    StartsResult

    Raises
    ------
    TrainingInterrupted
        On Ctrl-C or SIGTERM, naming ``run_dir`` (continue with ``--resume run_dir``).
    OutputError
        When another process holds ``run_dir`` or it already holds a run (without resume).
    InputError
        On resume, when ``particles`` are not the ones the run started with, or ``starts``
        disagrees with the run's; fewer than 1 start.
    """
    files = StartsFiles(run_dir)
    if resume:
        count = starts_of(files.dir)
        if starts is not None and starts != count:
            raise InputError(f"the run has {count} starts, not {starts} (--starts cannot "
                             "change on --resume)", files.dir)
    else:
        if starts is None or starts < 1:
            raise InputError(f"--starts needs at least 1 start, got {starts}")
        count = starts
    with workflow_folder(files.dir, config, argv) as world:  # each start holds its own too
        if not world.is_main:  # rank 0 writes; every rank trains
            return _train_starts(files, config, particles, count, world, argv=argv,
                                 stop_after=stop_after)
        if resume:
            identity = check_same_particles(files.particle_set, particles, files.dir)
            record_resume(files, config, particles, argv, identity)
        else:
            _begin(files, config, particles, argv, count)
        with run_log(files.log, header=header_line(argv, resumed=resume)):
            start_run_log(files.log)
            return _train_starts(files, config, particles, count, world, argv=argv,
                                 stop_after=stop_after)


def _begin(files: StartsFiles, config: Config, particles: ParticleSet,
           argv: list[str] | None, count: int) -> None:
    """New ``--starts`` run: check the folder is unused, write the marker, config and
    particles' identity."""
    if files.marker.exists() or any(
        (files.start_dir(k) / name).exists() for k in range(1, count + 1)
        for name in (CHECKPOINT, METRICS)
    ):
        raise OutputError("already holds a run (use --resume to continue it, or choose "
                          "another -o)", files.dir)
    save_config(files.config, config, argv)
    save_identity(files.particle_set, particle_set_identity(particles))
    marker = {
        "cryospin_version": __version__,
        "kind": "several starts, the lowest final loss chosen",
        "starts": count,
        "seeds": start_seeds(int(config.run.seed), count),
        "folders": [files.start_dir(k).name for k in range(1, count + 1)],
    }
    atomic_write_text(files.marker, json.dumps(marker, indent=2) + "\n")


def _train_starts(files: StartsFiles, config: Config, particles: ParticleSet, count: int,
                  world: WorldInfo, *, argv: list[str] | None,
                  stop_after: int | None) -> StartsResult:
    """Every start (skipping finished ones), then the choice when all have finished (rank 0;
    the other ranks return without it)."""
    done: list[int] = []
    finished = True
    for k, seed in enumerate(start_seeds(int(config.run.seed), count), start=1):
        folder = files.start_dir(k)
        status, epochs_done = run_status(folder, config.schedule)
        if status == "finished":
            log.info("%s (seed %d) is finished (%d epochs)", folder.name, seed, epochs_done)
            done.append(epochs_done)
            continue
        synchronise(world)  # every rank has read the status before rank 0 changes the folder
        if world.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            if status == "new":
                RunFiles(folder).metrics.unlink(missing_ok=True)  # killed before a checkpoint
        synchronise(world)
        log.info("start %d of %d (%s, seed %d): %s%s", k, count, folder.name, seed,
                 "resuming it" if status == "partial" else "starting it",
                 f"; the ETAs below are this start's, {count - k} more follow"
                 if k < count else "")
        start_config = dataclasses.replace(config, run=dataclasses.replace(config.run,
                                                                            seed=seed))
        t0 = time.perf_counter()
        try:
            result = fit(start_config, particles, folder, resume=status == "partial",
                         argv=argv, stop_after=stop_after)
        except TrainingInterrupted as exc:
            raise TrainingInterrupted(files.dir, exc.last_epoch,
                                      terminated=exc.terminated) from None
        done.append(result.epochs_completed)
        finished = finished and result.finished
        if status == "new" and result.finished and k < count:  # a whole start: the ETA's unit
            took = time.perf_counter() - t0
            log.info("start %d of %d took %s; the %d left, about %s", k, count,
                     format_duration(took), count - k, format_duration(took * (count - k)))
    if not finished or not world.is_main:
        return StartsResult(files.dir, finished, tuple(done))
    outcomes = tuple(run_outcome(files.start_dir(k)) for k in range(1, count + 1))
    chosen = choose_run(outcomes)
    if count > 1:
        log.info("every start has finished: aligning the other starts' maps onto the chosen "
                 "one's (%s)", outcomes[chosen].run_dir.name)
    agreement = record_choice(files.dir, outcomes, chosen)
    log.info("the choice: %s (%s, the link %s)", outcomes[chosen].run_dir.name,
             files.choice, files.chosen)
    return StartsResult(files.dir, True, tuple(done), outcomes, chosen, tuple(agreement))
