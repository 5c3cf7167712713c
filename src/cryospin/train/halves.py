"""Gold-standard half-map reconstruction (``cryospin reconstruct --halves``).

Phases of :func:`fit_halves`:

1. **split** — every particle goes to half 1 (A) or 2 (B): ``rlnRandomSubset`` when the
   particles carry a 1/2 split, else a random split seeded by ``run.seed``
   (:func:`split_halves`). Saved as ``RUN_DIR/half_set.npy``; ``RUN_DIR/halves.json`` marks the
   folder as a halves run and ``RUN_DIR/config.yaml`` holds the shared configuration.
2. **two independent reconstructions** — ``RUN_DIR/half_A`` and ``RUN_DIR/half_B`` are
   ``--starts`` folders (:func:`cryospin.train.starts.fit_starts`; with ``max_starts`` = 1,
   ``--max-starts 1``, ordinary run folders instead, :func:`cryospin.train.fit.fit`), each
   on its half's particles, from scratch, same configuration except the seed: half A's
   starts use ``run.seed``, ``+ 1``, ..., half B's ``run.seed + HALF_B_SEED_OFFSET``, ``+ 1``,
   ..., so the two halves do not start from the same random volume, whose high-frequency
   features could otherwise steer both halves alike and inflate their FSC. Each half folder
   holds ``particles.ind.npy``, the 0-based indices of its particles in the original particle
   file, named as ``input.ind`` in its runs' ``config.yaml``. Each half runs ``starts`` starts
   at first (``--starts K``; default 1) and keeps the lowest final loss among them
   (``half_A/chosen``): each chooses by its own images' fit. On resume, a finished half is
   skipped, an interrupted start resumed from its checkpoint, a missing one started.
   **A half that fits its images clearly worse gets another start.** Once both halves have
   finished, their own fit is compared (:func:`half_fit`, from each half's particle scores)
   and, while the half whose images fit clearly worse has fewer than ``max_starts`` starts
   (``--max-starts``, default :data:`DEFAULT_MAX_STARTS`), it gets one more
   (:func:`cryospin.train.starts.add_start`; its seed the half's next), its choice is made
   again, and the halves are compared again (:func:`half_to_restart`). Only a half's own
   images decide its choice, and only the two halves' fit to their own images (never their
   maps against each other) decides a restart, so the halves stay independent.
3. **combination** (:func:`combine_halves`) — half B's ``map.mrc`` (of its chosen start, with
   several starts: :meth:`cryospin.rundir.HalvesFiles.half_run`) is aligned onto half A's
   (rotation, translation and hand, :func:`cryospin.evaluate.align.align_maps`; with
   ``model.symmetry`` the aligned half B is averaged over the group again, the half maps being
   symmetric backprojections, :mod:`cryospin.train.outputs`; each half imposes the group in
   its own run, :mod:`cryospin.train.impose`, so each half map lies in the group's
   conventional frame and the alignment moves B by a symmetry of that frame; ``auto`` is
   refused); the FSC is
   computed unmasked and within a soft mask whose threshold comes from the halves' noise
   (:func:`cryospin.evaluate.masks.half_map_mask`), with the phase-randomisation correction
   (:func:`cryospin.evaluate.postprocess.postprocess_half_maps`); the halves are averaged with
   the FSC weighting; the weighted map is sharpened by the B-factor of its Guinier plot
   between 10 Å and the resolution and low-passed there
   (:func:`cryospin.evaluate.sharpen.postprocess_map`); half B's poses are moved into A's
   frame.

Outputs in ``RUN_DIR``: ``half_A.mrc``, ``half_B.mrc`` (aligned into A's frame), ``map.mrc``
(FSC-weighted average), ``mask.mrc``, ``map_masked.mrc``, ``postprocess.mrc`` and
``postprocess_masked.mrc`` (sharpened, low-passed), ``locres.mrc`` (local resolution),
``postprocess.star`` (RELION layout, with the Guinier plot),
``fsc.json`` (with ``half_runs``: the two run folders combined), ``fsc.png``, ``poses.star``
(all particles, A's frame, ``rlnRandomSubset`` 1/2)
and ``poses.pkl`` (``poses.cs`` for a ``.cs`` input).
``run.log``: what the run logged, both halves included (each half's folder has its own,
:mod:`cryospin.train.runlog`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cryospin import __version__
from cryospin.atomic import atomic_path, atomic_write_text
from cryospin.cpus import available_cpus, default_cpu_threads
from cryospin.errors import InputError, OutputError
from cryospin.evaluate.align import AlignResult, align_maps
from cryospin.evaluate.gold_standard import GoldStandardFSC, poses_in_aligned_frame
from cryospin.evaluate.postprocess import (
    HalfMapsPostprocessed,
    local_resolution_brief,
    postprocess_half_maps,
    postprocess_summary,
    write_postprocessed,
)
from cryospin.forward.symmetrize import symmetrize_volume
from cryospin.half_sets import half_set_assignment
from cryospin.io.cs import write_cryosparc
from cryospin.io.identity import check_same_particles, particle_set_identity, save_identity
from cryospin.io.mrc import read_map, write_map
from cryospin.io.particle_set import ParticleSet
from cryospin.io.particles import (
    load_indices,
    write_cryodrgn_poses,
    write_particles_star,
)
from cryospin.io.pkl import write_indices_pkl
from cryospin.io.star import read_relion_star
from cryospin.io.star_tables import numbers
from cryospin.point_group import parse_point_group
from cryospin.rundir import (  # HALF_NAMES and HalvesFiles: also imported from here
    CHECKPOINT,
    HALF_INDICES,
    HALF_NAMES,
    HALVES_MARKER,
    METRICS,
    STARTS_MARKER,
    HalvesFiles,
    RunFiles,
    marker_count,
)
from cryospin.symmetry import grid_cosets, point_group_rotations
from cryospin.train.config import Config, save_config
from cryospin.train.distributed import WorldInfo, synchronise
from cryospin.train.fit import TrainingInterrupted, fit
from cryospin.train.progress import format_duration
from cryospin.train.runlog import header_line, run_log, start_run_log
from cryospin.train.scores import SCORE_COLUMN, SCORE_CS_FIELD, selected_indices
from cryospin.train.setup import record_resume, run_status, workflow_folder
from cryospin.train.starts import (
    add_start,
    fit_starts,
    is_starts_run,
    settled_epochs,
    starts_of,
)

__all__ = [
    "HALF_NAMES",
    "HALF_B_SEED_OFFSET",
    "HalvesFiles",
    "HalvesResult",
    "is_halves_run",
    "starts_per_half",
    "split_halves",
    "fit_halves",
    "combine_halves",
    "HALF_FIT_GAP",
    "HalfFit",
    "half_fit",
    "DEFAULT_MAX_STARTS",
    "max_starts_per_half",
    "half_to_restart",
    "more_starts_advice",
    "format_summary",
]

log = logging.getLogger(__name__)

#: Half B's seed is ``run.seed`` plus this (independent initialisation of the two halves).
HALF_B_SEED_OFFSET = 1000

#: The halves' mean particle scores may differ by this share of the larger before the run
#: warns that one half fits its images clearly worse, and that half gets another start
#: (:func:`half_fit`, :func:`half_to_restart`; measured at the demo test's size: converged
#: pairs 0.4–4.3 %, a failed half 10.0–56.0 %, a mediocre one 5.4–11.9 %).
HALF_FIT_GAP = 0.05

#: The most starts a half gets by default (``--max-starts``): a half whose images fit clearly
#: worse than the other's (:data:`HALF_FIT_GAP`) gets more until then.
DEFAULT_MAX_STARTS = 3


@dataclass(frozen=True)
class HalvesResult:
    """Outcome of :func:`fit_halves`.

    Attributes
    ----------
    run_dir : Path
    finished : bool
        Both halves trained to the last epoch and the combined outputs written.
    epochs_completed : tuple[int, int]
        Epochs done by half A and half B (with several starts per half: the fewest of its
        starts').
    half_sizes : tuple[int, int]
        Particles in each half.
    split_source : str
        ``"rlnRandomSubset"`` or ``"random"``.
    gold_standard : GoldStandardFSC or None
        The FSC curves (None when not finished).
    alignment : AlignResult or None
        Half B's map onto half A's (None when not finished).
    starts : tuple[int, int]
        Starts run by half A and half B (1: one run).
    max_starts : int
        The most starts a half may get (1: each half one run, never another).
    postprocessed : HalfMapsPostprocessed or None
        The sharpened map, its B-factor and the local resolution (None when not finished).
    """

    run_dir: Path
    finished: bool
    epochs_completed: tuple[int, int]
    half_sizes: tuple[int, int]
    split_source: str
    gold_standard: GoldStandardFSC | None = None
    alignment: AlignResult | None = None
    starts: tuple[int, int] = (1, 1)
    max_starts: int = 1
    postprocessed: HalfMapsPostprocessed | None = None


class Combined(NamedTuple):
    """What :func:`combine_halves` computed (the files it wrote aside)."""

    gold_standard: GoldStandardFSC
    alignment: AlignResult
    postprocessed: HalfMapsPostprocessed


def is_halves_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a ``--halves`` run (its ``halves.json`` marker)."""
    return HalvesFiles(run_dir).marker.is_file()


def split_halves(particles: ParticleSet, seed: int) -> tuple[np.ndarray, str]:
    """Half set (1 or 2) of every particle, `(N,)` int64, and where it came from.

    ``particles.random_subset`` (``rlnRandomSubset``) is honoured when it is a 1/2 split with
    both halves present; otherwise a random split seeded by ``seed`` into halves of
    ``ceil(N/2)`` and ``floor(N/2)`` particles
    (:func:`cryospin.half_sets.half_set_assignment`).
    """
    n = len(particles)
    rs = getattr(particles, "random_subset", None)
    usable = rs is not None and set(np.unique(np.asarray(rs)).tolist()) == {1, 2}
    half = half_set_assignment(n, random_subset=rs if usable else None, seed=seed)
    return half, ("rlnRandomSubset" if usable else "random")


# ----------------------------------------------------------------------------- setup


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _load_half_set(files: HalvesFiles, n: int) -> np.ndarray:
    try:
        half = np.load(files.half_set, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the half split ({exc})", files.half_set) from None
    if half.shape != (n,) or not set(np.unique(half).tolist()) <= {1, 2}:
        raise InputError(
            f"the half split has {half.shape[0] if half.ndim else 0} entries but there are {n} "
            "particles (were the particles changed?)", files.half_set,
        )
    return half.astype(np.int64)


def _start(
    files: HalvesFiles, config: Config, particles: ParticleSet, argv: list[str] | None,
    starts: int, max_starts: int,
) -> tuple[np.ndarray, str]:
    """New halves run: check the folder, split, write the marker, split and config."""
    if files.marker.exists() or any(
        (files.half_dir(w) / name).exists() for w in (1, 2)
        for name in (CHECKPOINT, METRICS, STARTS_MARKER)
    ):
        raise OutputError("already holds a run (use --resume to continue it, or choose "
                          "another -o)", files.dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    half, source = split_halves(particles, config.run.seed)
    _save_npy(files.half_set, half)
    save_config(files.config, config, argv)
    save_identity(files.particle_set, particle_set_identity(particles))
    marker = {
        "cryospin_version": __version__,
        "kind": "gold-standard halves",
        "num_particles": int(half.size),
        "half_sizes": [int((half == 1).sum()), int((half == 2).sum())],
        "split_source": source,
        "seed": int(config.run.seed),
        "half_seeds": [int(config.run.seed), int(config.run.seed) + HALF_B_SEED_OFFSET],
        "halves": list(HALF_NAMES),
        "starts": starts,
        "max_starts": max_starts,
        "starts_folders": max_starts > 1,
    }
    atomic_write_text(files.marker, json.dumps(marker, indent=2) + "\n")
    return half, source


def _resume(
    files: HalvesFiles, config: Config, particles: ParticleSet, argv: list[str] | None,
    max_starts: int,
) -> tuple[np.ndarray, str]:
    if not files.marker.is_file():
        raise InputError(f"not a --halves run (no {HALVES_MARKER} here)", files.dir)
    identity = check_same_particles(files.particle_set, particles, files.dir)
    half = _load_half_set(files, len(particles))
    source = _split_source(files)
    record_resume(files, config, particles, argv, identity)
    recorded = max_starts_per_half(files.dir)
    if max_starts != recorded:
        marker = json.loads(files.marker.read_text(encoding="utf-8"))  # read just above
        marker["max_starts"] = max_starts
        atomic_write_text(files.marker, json.dumps(marker, indent=2) + "\n")
        log.info("the most starts a half may get: %d (was %d)", max_starts, recorded)
    return half, source


def _split_source(files: HalvesFiles) -> str:
    """Where the run's split came from (its marker's ``split_source``)."""
    try:
        return str(json.loads(files.marker.read_text(encoding="utf-8"))["split_source"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{HALVES_MARKER} is unreadable", files.marker) from None


def starts_per_half(run_dir: str | Path) -> int:
    """The starts each half of the ``--halves`` run in ``run_dir`` runs (its marker's
    ``starts``; 1 for a marker without it, written before ``--halves --starts``).

    Raises
    ------
    InputError
        No marker, or one that cannot be read.
    """
    return marker_count(HalvesFiles(run_dir).marker, "starts", kind="--halves", default=1)


def max_starts_per_half(run_dir: str | Path) -> int:
    """The most starts a half of the ``--halves`` run in ``run_dir`` may get (its marker's
    ``max_starts``; :func:`starts_per_half` for a marker without it, written before
    ``--max-starts``).

    Raises
    ------
    InputError
        No marker, or one that cannot be read.
    """
    marker = HalvesFiles(run_dir).marker
    return marker_count(marker, "max_starts", kind="--halves",
                        default=starts_per_half(run_dir))


def _starts_folders(run_dir: Path) -> bool:
    """Whether each half of the ``--halves`` run in ``run_dir`` is a ``--starts`` folder (its
    marker's ``starts_folders``; before it was recorded: more than one start per half)."""
    files = HalvesFiles(run_dir)
    try:
        recorded = json.loads(files.marker.read_text(encoding="utf-8")).get("starts_folders")
    except (OSError, ValueError, AttributeError):
        raise InputError(f"{HALVES_MARKER} is unreadable", files.marker) from None
    return starts_per_half(run_dir) > 1 if recorded is None else bool(recorded)


def _half_counts(files: HalvesFiles) -> tuple[int, int]:
    """The starts each half has now (1 for a half that is one run)."""
    a, b = (starts_of(files.half_dir(w)) if is_starts_run(files.half_dir(w)) else 1
            for w in (1, 2))
    return a, b


def _half_config(config: Config, which: int, ind_path: Path) -> Config:
    """The configuration of half ``which``: its particle indices and its seed."""
    seed = config.run.seed + (HALF_B_SEED_OFFSET if which == 2 else 0)
    return dataclasses.replace(
        config,
        input=dataclasses.replace(config.input, ind=str(ind_path.resolve())),
        run=dataclasses.replace(config.run, seed=seed),
    )


def _original_indices(config: Config, local: np.ndarray) -> np.ndarray:
    """Indices of the half's particles in the original file (composing the user's ``--ind``)."""
    if config.input.ind is None:
        return local
    return load_indices(config.input.ind)[local]


# ----------------------------------------------------------------------------- phases


def fit_halves(
    config: Config,
    particles: ParticleSet,
    run_dir: str | Path,
    *,
    resume: bool = False,
    argv: list[str] | None = None,
    stop_after: int | None = None,
    starts: int | None = None,
    max_starts: int | None = None,
) -> HalvesResult:
    """Reconstruct two half sets independently, then combine them (module docstring).

    Parameters
    ----------
    config : Config
        Shared by both halves.
    particles : ParticleSet
        All particles (after any ``--ind`` selection).
    run_dir : path
        The halves run folder.
    resume : bool
        Continue the halves run in ``run_dir`` (finished halves are skipped).
    argv : list of str, optional
        Command line, recorded in the config files.
    stop_after : int, optional
        Stop each half after this epoch (both halves are brought to it), without combining.
    starts : int, optional
        Starts per half at first (default 1); on resume, the marker's (when given, it must
        agree).
    max_starts : int, optional
        The most starts a half may get when its images fit clearly worse than the other's
        (default :data:`DEFAULT_MAX_STARTS`, or ``starts`` when larger; 1: each half one run,
        never another); on resume, the marker's unless given (it may change then, but not
        below ``starts``, and not above 1 in a run whose halves are single runs).

    Returns
    -------
    HalvesResult

    Raises
    ------
    TrainingInterrupted
        On Ctrl-C or SIGTERM, naming ``run_dir`` (continue with ``--resume run_dir``).
    OutputError
        When another process holds ``run_dir`` (:func:`cryospin.runlock.folder_lock`).
    InputError
        On resume, when ``particles`` are not the ones the run started with, or ``starts``
        disagrees with the run's; ``starts`` < 1; ``max_starts`` below ``starts``, or above 1
        on resume of a run whose halves are single runs.
    """
    if config.model.symmetry.lower() == "auto":  # the halves would not share one group
        raise InputError("--symmetry auto cannot be used with --halves (each half could find "
                         "another group): give the group, e.g. the one `cryospin symmetry "
                         "MAP` finds in a plain run's map")
    files = HalvesFiles(run_dir)
    if resume:
        count = starts_per_half(files.dir)
        if starts is not None and starts != count:
            raise InputError(f"each half of the run has {count} start(s), not {starts} "
                             "(--starts cannot change on --resume)", files.dir)
        most = max_starts_per_half(files.dir) if max_starts is None else max_starts
        if most > 1 and not _starts_folders(files.dir):
            raise InputError("each half of this run is a single run (it was made with "
                             "--max-starts 1, or before --max-starts), so it cannot get more "
                             "starts: --max-starts cannot be raised on --resume", files.dir)
    else:
        count = 1 if starts is None else starts
        if count < 1:
            raise InputError(f"--starts must be at least 1, got {count}")
        most = max(DEFAULT_MAX_STARTS, count) if max_starts is None else max_starts
    if most < count:
        raise InputError(f"--max-starts {most} is below the starts each half runs at first "
                         f"({count}, --starts)")
    with workflow_folder(files.dir, config, argv) as world:  # each half holds its own too
        return _fit_halves(files, config, particles, world, resume=resume, argv=argv,
                           stop_after=stop_after, starts=count, max_starts=most)


def _fit_halves(
    files: HalvesFiles,
    config: Config,
    particles: ParticleSet,
    world: WorldInfo,
    *,
    resume: bool,
    argv: list[str] | None,
    stop_after: int | None,
    starts: int,
    max_starts: int,
) -> HalvesResult:
    """:func:`fit_halves` with the run folder held (rank 0 sets it up, the other ranks then
    read the split)."""
    if world.is_main:
        half, source = (_resume(files, config, particles, argv, max_starts) if resume
                        else _start(files, config, particles, argv, starts, max_starts))
    synchronise(world)
    if not world.is_main:
        half, source = _load_half_set(files, len(particles)), _split_source(files)
    log = (run_log(files.log, header=header_line(argv, resumed=resume)) if world.is_main
           else contextlib.nullcontext())
    with log:
        if world.is_main:
            start_run_log(files.log)  # the split and the particles are checked
        return _train_and_combine(files, config, particles, half, source, world, argv=argv,
                                  stop_after=stop_after, starts=starts, max_starts=max_starts)


def _train_and_combine(
    files: HalvesFiles,
    config: Config,
    particles: ParticleSet,
    half: np.ndarray,
    source: str,
    world: WorldInfo,
    *,
    argv: list[str] | None,
    stop_after: int | None,
    starts: int,
    max_starts: int,
) -> HalvesResult:
    """Phases 2 and 3 of :func:`fit_halves` (logged to ``RUN_DIR/run.log``; each half's run
    also to its own): both halves, another start for a half that fits clearly worse while it
    may have one (:func:`half_to_restart`), then the combination. Every rank trains; rank 0
    decides the restarts and combines (the others return without the combination's
    results)."""
    sizes = (int((half == 1).sum()), int((half == 2).sum()))
    if min(sizes) < 2:
        raise InputError(f"each half needs at least 2 particles, got {sizes[0]} and {sizes[1]}",
                         particles.source)
    while True:
        done, finished = _train_both(files, config, particles, half, world, argv=argv,
                                     stop_after=stop_after, starts=starts,
                                     one_run=not _starts_folders(files.dir))
        counts = _half_counts(files)
        if not finished:
            return HalvesResult(files.dir, False, done, sizes, source, starts=counts,
                                max_starts=max_starts)
        synchronise(world)  # every rank has read the counts before rank 0 adds a start
        if world.is_main:
            _restart_worse_half(files, particles.box_px, counts, max_starts)
        synchronise(world)
        if _half_counts(files) == counts:  # no start added: the halves stand
            break
    if not world.is_main:
        return HalvesResult(files.dir, True, done, sizes, source, starts=counts,
                            max_starts=max_starts)
    gold, align, post = combine_halves(files.dir, particles, half, config=config)
    return HalvesResult(files.dir, True, done, sizes, source, gold, align, starts=counts,
                        max_starts=max_starts, postprocessed=post)


def _train_both(files: HalvesFiles, config: Config, particles: ParticleSet, half: np.ndarray,
                world: WorldInfo, *, argv: list[str] | None, stop_after: int | None,
                starts: int, one_run: bool) -> tuple[tuple[int, int], bool]:
    """Train half A, then half B (finished runs skipped); their epochs done and whether both
    finished."""
    sizes = (int((half == 1).sum()), int((half == 2).sum()))
    train_half = _train_half if one_run else _train_half_starts
    done: list[int] = []
    finished = True
    for which in (1, 2):
        t0 = time.perf_counter()
        try:
            outcome = train_half(files, config, particles, half, which, world, argv=argv,
                                 stop_after=stop_after, starts=starts)
        except TrainingInterrupted as exc:
            raise TrainingInterrupted(files.dir, exc.last_epoch,
                                      terminated=exc.terminated) from None
        done.append(outcome.epochs)
        finished = finished and outcome.finished
        if which == 1 and outcome.whole and outcome.finished:  # the ETA's unit: a whole half
            took = time.perf_counter() - t0
            log.info("half A took %s; half B (%d particles), about %s more", format_duration(took),
                     sizes[1], format_duration(took * sizes[1] / sizes[0]))
    return (done[0], done[1]), finished


def half_to_restart(fit: HalfFit | None, counts: tuple[int, int], max_starts: int) -> int | None:
    """The half (1: A, 2: B) that gets another start: the one whose images fit clearly worse
    (:attr:`HalfFit.agree` false, a finite gap), while it has fewer than ``max_starts``
    starts (``counts``: half A's and half B's now); None when the halves agree, cannot be
    compared (``fit`` None or a NaN gap), or the worse half has all its starts."""
    if fit is None or not math.isfinite(fit.relative_gap) or fit.agree:
        return None
    which = 1 if fit.worse == "A" else 2
    return which if counts[which - 1] < max_starts else None


def _restart_worse_half(files: HalvesFiles, box_px: int, counts: tuple[int, int],
                        max_starts: int) -> None:
    """Compare the finished halves' own fit and, when one half fits clearly worse and may get
    another start, add it (:func:`cryospin.train.starts.add_start`; it runs at the next pass
    of the halves)."""
    if max_starts <= 1:
        return
    fit = _halves_fit(files, box_px)
    which = half_to_restart(fit, counts, max_starts)
    if fit is None or which is None:
        return
    half_dir = files.half_dir(which)
    count = add_start(half_dir)
    a, b = fit.mean_score_nats
    log.warning("the halves' own fit: mean particle score %.4g nats (half A) and %.4g (half B), "
                "%.1f %% apart (over %.0f %%): half %s's map explains its images clearly worse, "
                "so it gets another start (start %d of at most %d, --max-starts), chosen "
                "against its others by its own images' fit; then the halves are compared again",
                a, b, 100 * fit.relative_gap, 100 * HALF_FIT_GAP, fit.worse, count, max_starts)


def _halves_fit(files: HalvesFiles, box_px: int) -> HalfFit | None:
    """:func:`half_fit` of the finished halves' chosen runs (their ``poses.star`` scores; None
    when a half's star has none)."""
    scores = [_read_half_poses(RunFiles(files.half_run(w)).star, box_px)[2] for w in (1, 2)]
    if scores[0] is None or scores[1] is None:
        return None
    return half_fit(scores[0], scores[1])


class _HalfOutcome(NamedTuple):
    """What training one half did: its epochs done (with several starts, the fewest of its
    starts'), whether it finished, and whether it ran whole in this call (from its start)."""

    epochs: int
    finished: bool
    whole: bool


def _train_half(files: HalvesFiles, config: Config, particles: ParticleSet, half: np.ndarray,
                which: int, world: WorldInfo, *, argv: list[str] | None,
                stop_after: int | None, starts: int) -> _HalfOutcome:
    """Half ``which`` as one run (skipped when finished)."""
    half_dir = files.half_dir(which)
    local = np.flatnonzero(half == which)
    status, epochs_done = run_status(half_dir, config.schedule)
    if status == "finished":
        log.info("%s is finished (%d epochs)", half_dir.name, epochs_done)
        return _HalfOutcome(epochs_done, True, False)
    ind_path = half_dir / HALF_INDICES
    synchronise(world)  # every rank has read the status before rank 0 changes the folder
    if world.is_main:
        half_dir.mkdir(parents=True, exist_ok=True)
        if status == "new":
            RunFiles(half_dir).metrics.unlink(missing_ok=True)  # crashed before a checkpoint
            _save_npy(ind_path, _original_indices(config, local))
    synchronise(world)
    log.info("%s: %s run on %d particles", half_dir.name,
             "resuming the" if status == "partial" else "starting a", local.size)
    result = fit(_half_config(config, which, ind_path), particles.subset(local), half_dir,
                 resume=status == "partial", argv=argv, stop_after=stop_after)
    return _HalfOutcome(result.epochs_completed, result.finished, status == "new")


def _train_half_starts(files: HalvesFiles, config: Config, particles: ParticleSet,
                       half: np.ndarray, which: int, world: WorldInfo, *,
                       argv: list[str] | None, stop_after: int | None,
                       starts: int) -> _HalfOutcome:
    """Half ``which`` as ``starts`` runs and the choice among them (a ``--starts`` folder;
    finished starts are skipped and the choice made again, unless every start had finished
    and been chosen among: then the half is skipped)."""
    half_dir = files.half_dir(which)
    local = np.flatnonzero(half == which)
    resume = is_starts_run(half_dir)
    settled = settled_epochs(half_dir, config.schedule) if resume else None
    if settled is not None:
        log.info("%s is finished (%d start%s, the chosen %s)", half_dir.name, len(settled),
                 "s" if len(settled) > 1 else "", files.half_run(which).resolve().name)
        return _HalfOutcome(min(settled), True, False)
    ind_path = half_dir / HALF_INDICES
    synchronise(world)  # every rank has looked for the marker before rank 0 writes one
    if world.is_main and not resume:
        half_dir.mkdir(parents=True, exist_ok=True)
        _save_npy(ind_path, _original_indices(config, local))
    count = starts_of(half_dir) if resume else starts
    log.info("%s: %s %d start%s on %d particles%s", half_dir.name,
             "resuming its" if resume else "running", count, "s" if count > 1 else "",
             local.size, ", then half B's" if which == 1 else "")
    result = fit_starts(_half_config(config, which, ind_path), particles.subset(local),
                        half_dir, starts=None if resume else starts, resume=resume, argv=argv,
                        stop_after=stop_after)
    if result.chosen is not None:
        log.info("%s: the chosen start is %s", half_dir.name,
                 result.outcomes[result.chosen].run_dir.name)
    return _HalfOutcome(min(result.epochs_completed), result.finished, not resume)


def _read_half_poses(star: Path, box_px: int
                     ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """A half's poses `(n, 3, 3)`, shifts `(n, 2)` (original pixels) and its particles'
    scores `(n,)` (None when its star has none: a run of an older version)."""
    ps = read_relion_star(star, no_ctf=True, metadata_only=True, box_px=box_px)
    if ps.rotations is None:
        raise InputError("no poses in the half's star file", star)
    n = len(ps)
    shifts = ps.shifts_px if ps.shifts_px is not None else torch.zeros(n, 2, dtype=torch.float64)
    scores = None
    if ps.star_table is not None and SCORE_COLUMN in ps.star_table.columns:
        scores = numbers(ps.star_table[SCORE_COLUMN])
    return ps.rotations.double(), shifts.double(), scores


def combine_halves(
    run_dir: str | Path,
    particles: ParticleSet,
    half_set: np.ndarray,
    *,
    config: Config,
    mask_dilate_px: float | None = None,
    mask_soft_edge_px: float | None = None,
) -> Combined:
    """Align, mask, FSC, combine, sharpen and write the outputs of two finished half runs.

    Parameters
    ----------
    run_dir : path
        Halves run folder holding ``half_A/`` and ``half_B/`` (each with ``map.mrc`` and
        ``poses.star``).
    particles : ParticleSet
        All particles, in the order ``half_set`` refers to.
    half_set : `(N,)` ints in {1, 2}
    config : Config
        For the seed of the phase randomisation and the CPU threads.
    mask_dilate_px, mask_soft_edge_px : float, optional
        Mask dilation and edge (default :func:`cryospin.evaluate.masks.half_map_mask_widths`:
        scaled with the box, 2–6 and 4–12 px).

    Returns
    -------
    Combined
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(default_cpu_threads(config.run.num_threads, threads, available_cpus()))
    try:
        return _combine(HalvesFiles(run_dir), particles, np.asarray(half_set), config,
                        mask_dilate_px, mask_soft_edge_px)
    finally:
        torch.set_num_threads(threads)


def _combine(
    files: HalvesFiles,
    particles: ParticleSet,
    half_set: np.ndarray,
    config: Config,
    mask_dilate_px: float | None,
    mask_soft_edge_px: float | None,
) -> Combined:
    half_runs = [files.half_run(w) for w in (1, 2)]
    half_files = [RunFiles(path) for path in half_runs]
    maps = [torch.tensor(read_map(f.map)[0], dtype=torch.float64) for f in half_files]
    map_a, map_b = maps
    if map_a.shape != map_b.shape:
        raise InputError(f"the half maps differ in shape ({tuple(map_a.shape)} vs "
                         f"{tuple(map_b.shape)})", files.dir)
    L = map_a.shape[-1]
    # the half maps are at the training box (--box crops): voxel = pixel size · L0 / L
    to_original_px = int(particles.box_px) / L
    apix = float(particles.pixel_size_angstrom) * to_original_px
    pixel_size = apix if apix > 0 else None

    log.info("aligning half B onto half A (rotation, shift, hand)")
    align = align_maps(map_a, map_b, search_hand=True)
    b_aligned = align.aligned.double()
    if parse_point_group(config.model.symmetry).order > 1:
        # both halves are symmetric about the same axes; the alignment's resampling is not
        # exactly: average it over the group again (exact for signed permutations)
        b_aligned = symmetrize_volume(b_aligned,
                                      *grid_cosets(point_group_rotations(config.model.symmetry)))
    done = postprocess_half_maps(map_a, b_aligned, pixel_size_angstrom=pixel_size,
                                 seed=config.run.seed, dilate_px=mask_dilate_px,
                                 soft_edge_px=mask_soft_edge_px)
    gold, made = done.gold, done.made_mask
    # poses: A's as they are, B's moved into A's frame by the alignment (incl. hand)
    n = len(particles)
    rotations = torch.zeros(n, 3, 3, dtype=torch.float64)
    shifts = torch.zeros(n, 2, dtype=torch.float64)
    scores: np.ndarray | None = np.zeros(n)
    for which, f in zip((1, 2), half_files, strict=True):
        idx = torch.from_numpy(np.flatnonzero(half_set == which))
        R, s, half_scores = _read_half_poses(f.star, particles.box_px)
        if R.shape[0] != idx.numel():
            raise InputError(f"{R.shape[0]} poses for {idx.numel()} particles of this half",
                             f.star)
        if which == 2:
            # the alignment's translation is in map voxels; the shifts in original pixels
            R, s = poses_in_aligned_frame(R, s, align.rotation,
                                          align.translation_px * to_original_px, align.flipped)
        rotations[idx], shifts[idx] = R, s
        if scores is not None and half_scores is not None and half_scores.shape == (len(idx),):
            scores[idx.numpy()] = half_scores  # each half's own map's scores
        else:
            scores = None
    fit = None if scores is None else half_fit(scores[half_set == 1], scores[half_set == 2])
    counts, most = _half_counts(files), max_starts_per_half(files.dir)
    if fit is not None:
        _log_half_fit(fit, more_starts_advice(files.dir, fit.worse,
                                              counts[0 if fit.worse == "A" else 1],
                                              not _starts_folders(files.dir)))

    write_map(files.half_maps[0], map_a.numpy(), apix)
    write_map(files.half_maps[1], b_aligned.numpy(), apix)
    write_postprocessed(files, done, apix,
                        half_names=(files.half_maps[0].name, files.half_maps[1].name),
                        fsc_title="gold-standard FSC (half A vs aligned half B)")
    summary = gold.to_dict()
    summary["alignment"] = {
        "rotation": align.rotation.tolist(),
        "translation_px": align.translation_px.tolist(),
        "flipped": bool(align.flipped),
        "correlation": float(align.correlation),
    }
    summary["half_sizes"] = [int((half_set == 1).sum()), int((half_set == 2).sum())]
    # the run folders combined, relative to the halves folder (a half's chosen start resolved)
    summary["half_runs"] = [str(path.resolve().relative_to(files.dir.resolve()))
                            for path in half_runs]
    summary["mask"] = made.to_dict() if made is not None else None
    summary.update(postprocess_summary(done))
    summary["starts_per_half"] = list(counts)
    summary["max_starts"] = most
    if fit is not None:
        summary["half_fit"] = fit.to_dict()
    atomic_write_text(files.fsc_json, json.dumps(summary, indent=2) + "\n")

    both = dataclasses.replace(particles.with_poses(rotations, shifts),
                               random_subset=half_set.astype(np.int64))
    write_particles_star(files.star, both, relative_to=config.input.relative_to,
                         columns=None if scores is None else {SCORE_COLUMN: scores})
    write_cryodrgn_poses(files.pkl, rotations, shifts, particles.box_px)
    if both.cs_table is not None:  # a .cs input: its rows with the new poses (and scores)
        write_cryosparc(files.cs, both,
                        fields=None if scores is None else {SCORE_CS_FIELD: scores})
    log.info("wrote %s, %s, %s, %s", files.map, files.postprocessed, files.postprocess,
             files.star)
    if scores is not None:  # indices in the input, through the user's --ind
        ind = None if config.input.ind is None else load_indices(config.input.ind)
        write_indices_pkl(files.selected, selected_indices(scores, ind))
    return Combined(gold, align, done)


@dataclass(frozen=True)
class HalfFit:
    """How well each half's map explains its own images (:func:`half_fit`).

    Attributes
    ----------
    mean_score_nats : tuple[float, float]
        Half A's and half B's mean particle score (nats: the log-likelihood ratio of each
        image under its half's map at its pose against an empty image,
        :mod:`cryospin.train.scores`).
    relative_gap : float
        ``|a − b| / max(a, b)`` (NaN when neither mean is positive).
    """

    mean_score_nats: tuple[float, float]
    relative_gap: float

    @property
    def agree(self) -> bool:
        """Whether the gap is at most :data:`HALF_FIT_GAP` (False when not judged: NaN)."""
        return self.relative_gap <= HALF_FIT_GAP

    @property
    def worse(self) -> str:
        """The half whose images fit worse (``"A"`` or ``"B"``)."""
        return "A" if self.mean_score_nats[0] < self.mean_score_nats[1] else "B"

    def to_dict(self) -> dict[str, object]:
        """For ``fsc.json`` (``half_fit``); a NaN gap as null."""
        gap = self.relative_gap if math.isfinite(self.relative_gap) else None
        return {"mean_score_nats": list(self.mean_score_nats), "relative_gap": gap,
                "threshold": HALF_FIT_GAP, "agree": self.agree}


def half_fit(scores_a: np.ndarray, scores_b: np.ndarray) -> HalfFit:
    """Compare how well each half's map explains its own images.

    The halves are a random split of one particle set, so when both settled on the particle's
    structure their images are explained about equally well: their mean scores differ by a
    few per cent. A half that settled on a wrong structure, or split its particles between
    copies of a pseudo-symmetric one, explains a clearly smaller share of its images' signal
    — while the gold-standard FSC of the two maps can look as good as a converged pair's.
    Measured at one size (32 px, 500 particles per half, SNR 1; benchmarks/RESULTS.md,
    "Gold-standard halves with several starts"): 21 pairs of converged halves 0.6–4.2 %
    apart, 10 pairs with a failed half 10.0–49.7 %, and a pair of a 2.79° half (93 % of its
    particles within 10°) and a 2.15° one 6.8 %; at 64 px and SNR 0.1 (10,000 particles per
    half) five converged pairs 0.2–1.0 %, one with a failed half (ADK, 23.9°) 26.7 %. In 16
    more runs at 32 px (float32): converged pairs 0.4–4.3 %, a failed half 30.1–56.0 %, a
    mediocre one (2.35–4.97°) 5.4–11.9 % ("A half that fits clearly worse gets another
    start").

    Parameters
    ----------
    scores_a, scores_b : `(n_a,)`, `(n_b,)`
        Each half's particle scores, nats.

    Returns
    -------
    HalfFit
    """
    a, b = float(np.mean(scores_a)), float(np.mean(scores_b))
    top = max(a, b)
    gap = abs(a - b) / top if top > 0 else math.nan
    return HalfFit((a, b), gap)


def more_starts_advice(run_dir: str | Path, worse: str, count: int, one_run: bool) -> str:
    """What a run that still disagrees at its combination advises (the log's warning, the
    report's row): half ``worse`` (``"A"`` or ``"B"``) kept the best of its ``count`` starts
    (the restarts stop there only when it has all it may get), and how to give it more —
    ``--resume`` with one more, or, for halves that are single runs (``one_run``), a new run.
    """
    if one_run:
        return ("a new --halves run without --max-starts 1 gives such a half more starts "
                f"(up to {DEFAULT_MAX_STARTS} by default)")
    return (f"half {worse} kept the best of its {count} start{'s' if count > 1 else ''}; "
            f"more: cryospin reconstruct --resume {run_dir} --max-starts {count + 1}")


def _log_half_fit(fit: HalfFit, advice: str) -> None:
    a, b = fit.mean_score_nats
    text = (f"the halves' own fit: mean particle score {a:.4g} nats (half A) and {b:.4g} "
            f"(half B), {100 * fit.relative_gap:.1f} % apart")
    if fit.agree:
        log.info("%s (at most %.0f %%: both halves explain their images alike)", text,
                 100 * HALF_FIT_GAP)
        return
    log.warning("%s: half %s's map explains its images clearly worse than the other half's "
                "explains theirs (over %.0f %%), so one half has probably settled on another "
                "structure or placed part of its particles wrong, and the gold-standard FSC "
                "may not show it; compare half_A.mrc and half_B.mrc; %s", text, fit.worse,
                100 * HALF_FIT_GAP, advice)


def format_summary(result: HalvesResult) -> str:
    """A few lines for the terminal: half sizes, alignment and the resolutions at 0.143."""
    a, b = result.half_sizes
    sa, sb = result.starts
    lines = [f"halves: {a} + {b} particles ({result.split_source}), epochs "
             f"{result.epochs_completed[0]} / {result.epochs_completed[1]}"
             + (f", starts {sa} / {sb} (at most {result.max_starts})" if max(sa, sb) > 1
                else "")]
    gold, align = result.gold_standard, result.alignment
    if gold is None or align is None:
        return "\n".join(lines)
    unit = "Å" if gold.unmasked.pixel_size_angstrom is not None else "px"

    def res(x: float) -> str:
        return f"{x:.2f} {unit}" if math.isfinite(x) else "–"

    lines.append(f"half B aligned onto half A: {'mirrored, ' if align.flipped else ''}"
                 f"correlation {align.correlation:.3f}")
    lines.append(
        f"FSC 0.143: unmasked {res(gold.unmasked.resolution(0.143))}, masked "
        f"{res(gold.masked.resolution(0.143))}, corrected {res(gold.final_resolution)} "
        f"(phases randomised beyond {res(gold.randomise_from_resolution)}); FSC 0.5: "
        f"corrected {res(gold.corrected.resolution(0.5))}"
    )
    done = result.postprocessed
    if done is not None:
        post = done.post
        lines.append(f"sharpened: B-factor {post.bfactor_a2:.0f} Å² (Guinier fit "
                     f"{post.fit.low_angstrom:g}–{post.fit.high_angstrom:.2f} Å)"
                     if post.fit is not None else f"not sharpened: {post.reason}")
        if done.local.points.shape[0]:
            lines.append(local_resolution_brief(done.local, unit))
    files = HalvesFiles(result.run_dir)
    lines.append(f"map {files.map}, sharpened {files.postprocessed}, local resolution "
                 f"{files.local_resolution}, postprocess {files.postprocess}")
    return "\n".join(lines)
