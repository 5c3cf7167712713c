"""``fit``: the cryoSPIN training run, as explicit phases.

1. **setup** — run folder, device, threads, seeds, preprocessing (:mod:`cryospin.train.data`),
   the training state (:class:`~cryospin.train.state.TrainState`: volume initialised from the
   data's radial amplitude, encoder, optimisers), or that state restored from
   ``RUN_DIR/checkpoint.pt`` on resume.
2. **stage 1** (epochs ``1 .. switch_epoch``) — :func:`~cryospin.train.autoencode.autoencode_epoch`.
3. **the switch** (:mod:`cryospin.train.switch`) — every particle's best head seeds the
   :class:`~cryospin.pose.PoseTable`; the encoder is dropped; a new volume optimiser with the
   lower learning rate.
4. **stage 2** (epochs ``switch_epoch + 1 .. epochs``) —
   :func:`~cryospin.train.autodecode.autodecode_epoch`; its first ``schedule.search_epochs``
   epochs start each batch with a global rotation search
   (:class:`~cryospin.train.autodecode.RotationSearch`) on a low-frequency disc whose radius
   grows from ``optim.search_radius_px`` to ``optim.search_radius_end_px``. With
   ``schedule.search_min_epochs`` the search stops early, after a search epoch in which fewer
   than ``schedule.search_stop_fraction`` of the particles jumped, or whose jumps stopped
   falling (``schedule.search_plateau_fraction``), or whose mean loss fell by less than
   ``schedule.search_settled_nats`` per image; the local epochs then follow at once
   and the run ends sooner (:mod:`cryospin.train.schedule`; the stop is kept in the
   checkpoint for ``--resume`` and logged in ``metrics.jsonl``).

Stage 1 may use frequency marching: the loss disc grows from
``schedule.loss_radius_start_px`` to ``schedule.loss_radius_end_px`` over the stage-1 steps
(optionally with the encoder's input low-passed to match, ``model.encoder_lowpass``). Every
rate and radius comes from :mod:`cryospin.train.schedule`.

After every epoch: ``map.NNN.mrc``, a line of ``metrics.jsonl``, ``pose_track.npz``
(:mod:`cryospin.train.track`) and ``checkpoint.pt``; at the end ``map.mrc`` (by default a
Wiener backprojection from the final poses, the trained volume kept as ``map_decoder.mrc``,
their FSC as a convergence check) and the poses (:mod:`cryospin.train.outputs`; the names:
:mod:`cryospin.rundir`). ``config.yaml`` is written at the start, and ``particle_set.json``,
the particles' identity that ``--resume`` checks (:mod:`cryospin.io.identity`), and, when the
noise is whitened, the spectrum it was whitened with (``noise_spectrum.json``,
:mod:`cryospin.train.noise_record`). One process at
a time writes into a run folder: ``fit`` holds its lock, ``RUN_DIR/.cryospin.lock``
(:mod:`cryospin.runlock`; under torchrun rank 0 holds it).

Resuming restores every parameter, optimiser state, the pose table and all RNG states, so that
a resumed run equals the uninterrupted one with the same seed; only the configuration fields of
:data:`cryospin.rundir.RESUMABLE_OPTIONS` may change.

While it trains, a run shows its progress (:mod:`cryospin.train.feedback`): a bar per pass in
a terminal, else a log line every ``run.progress_interval_s`` seconds with the ETA of the epoch
and of the run (:mod:`cryospin.train.progress`); the switch's inference pass and the final
backprojection report theirs too. Everything logged during :func:`fit` is also appended to
``RUN_DIR/run.log`` (:mod:`cryospin.train.runlog`; rank 0).

Under ``torchrun`` the same run is computed data-parallel (:mod:`cryospin.train.distributed`):
each rank trains on its particles of every global batch, rank 0 writes every file, and the
checkpoint holds the full pose table (resumable with any number of processes).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch

from cryospin.cpus import available_cpus, default_cpu_threads
from cryospin.errors import OutputError, Terminated
from cryospin.io.particle_set import ParticleSet
from cryospin.rundir import RunFiles, Stage, prepare_run_dir, read_metrics
from cryospin.runlock import describe_command, folder_lock
from cryospin.symmetry import insertions_per_image, point_group_rotations
from cryospin.train.autodecode import (
    JUMP_THRESHOLD_DEG,
    autodecode_epoch,
    epoch_search,
    local_refine_disc,
    search_refine_disc,
)
from cryospin.train.autoencode import BestPoses, EpochStats, autoencode_epoch, infer_best_poses
from cryospin.train.config import AMORTIZED_METHODS, Config, config_to_dict
from cryospin.train.consensus import consensus_due, consensus_on_state
from cryospin.train.data import LossDisc, TrainingData, num_batches
from cryospin.train.distributed import (
    Shard,
    WorldInfo,
    device_for_rank,
    init_distributed,
    synchronise,
    teardown_distributed,
    world_from_env,
    wrap_encoder,
)
from cryospin.train.feedback import Feedback, PassProgress
from cryospin.train.impose import impose_on_state, step_due
from cryospin.train.metrics import EpochExtra, search_stop_message, search_stop_record
from cryospin.train.noise_record import noise_record, write_noise_spectrum
from cryospin.train.outputs import epoch_metrics, write_epoch, write_final
from cryospin.train.progress import (
    BACKPROJECT,
    PHASE_LABELS,
    PhaseTotals,
    RunEstimate,
    RunPlan,
    add_sample,
    lowpass_weight,
    phase_totals,
    relative_speed,
    run_eta_s,
)
from cryospin.train.rebackproject import (
    rebackproject_due,
    rebackproject_on_state,
    search_reach_px,
)
from cryospin.train.relax import place_copies, relax_record, relaxed_group
from cryospin.train.release import return_free_memory
from cryospin.train.runlog import header_line, run_log
from cryospin.train.schedule import (
    earliest_search_stop,
    encoder_lr_schedule,
    final_epoch,
    final_stage1_radius,
    is_search_epoch,
    loss_radius_schedule,
    search_stops,
    stage1_batches,
    stage2_decoder_lr,
    stage2_pose_lrs,
)
from cryospin.train.scores import JUNK_GATE_FRACTION, junk_takes_effect, particle_scores
from cryospin.train.setup import initial_state, load_training_data, open_run, resolve_device
from cryospin.train.state import TrainState, seed_everything
from cryospin.train.switch import full_pose_table, full_record, switch_poses
from cryospin.train.track import PoseTracker

__all__ = ["FitResult", "TrainingInterrupted", "fit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    run_dir : Path
    epochs_completed : int
    stage : str
        Stage of the last completed epoch.
    finished : bool
        All epochs done and the final outputs written (False when stopped by ``stop_after``).
    rotations : `(N, 3, 3)` float32 or None
        Final poses (pose table, or the encoder's best heads if the run never switched); None
        when not finished.
    shifts_px : `(N, 2)` float32 or None
    map_path, star_path, pkl_path : Path or None
        Final outputs (None when not finished).
    """

    run_dir: Path
    epochs_completed: int
    stage: str
    finished: bool
    rotations: torch.Tensor | None = None
    shifts_px: torch.Tensor | None = None
    map_path: Path | None = None
    star_path: Path | None = None
    pkl_path: Path | None = None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, or SIGTERM (``terminated``; :class:`~cryospin.errors.Terminated`), during
    :func:`fit`; the last complete checkpoint is usable for ``--resume``.

    ``exit_status``: 143 (128 + SIGTERM) when terminated, else 130 (128 + SIGINT).
    """

    def __init__(self, run_dir: Path, last_epoch: int, *, terminated: bool = False) -> None:
        self.run_dir = run_dir
        self.last_epoch = last_epoch
        self.terminated = terminated
        self.exit_status = Terminated.exit_status if terminated else 130
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        super().__init__(
            f"{what}; the last complete epoch is {last_epoch}"
            f" — continue with: cryospin reconstruct --resume {run_dir}"
            if last_epoch
            else f"{what} before the first epoch completed (nothing to resume)"
        )


def fit(
    config: Config,
    particles: ParticleSet,
    run_dir: str | Path,
    *,
    resume: bool = False,
    argv: list[str] | None = None,
    stop_after: int | None = None,
) -> FitResult:
    """Train a volume and poses on ``particles``; write everything to ``run_dir``.

    Parameters
    ----------
    config : Config
    particles : ParticleSet
    run_dir : path
        Output folder (created). Without ``resume`` it must not already hold a run.
    resume : bool
        Continue from ``run_dir/checkpoint.pt`` (the last complete epoch).
    argv : list of str, optional
        Command line, recorded in ``config.yaml``.
    stop_after : int, optional
        Stop after this epoch (checkpoint written, final outputs not): for tests and for
        splitting a run over several sessions.

    Returns
    -------
    FitResult

    Raises
    ------
    NonFiniteLossError
        When the loss or a gradient (:class:`~cryospin.train.metrics.NonFiniteGradientError`)
        becomes NaN/Inf (the last good checkpoint is kept).
    OutputError
        When an output cannot be written (disk full, ...); the message names the file, the last
        complete epoch and the ``--resume`` command (the last good checkpoint is kept). When
        another process holds ``run_dir`` (:func:`cryospin.runlock.folder_lock`).
    InputError
        On resume, when ``particles`` are not the ones the run started with
        (:func:`cryospin.io.identity.check_same_particles`), before anything is written.
    TrainingInterrupted
        On Ctrl-C or SIGTERM (the last good checkpoint is kept).
    """
    # ------------------------------------------------------------------ setup
    files = prepare_run_dir(run_dir, resume=resume)
    world = world_from_env()  # torchrun / Slurm: see cryospin.train.distributed
    with contextlib.ExitStack() as held:
        if world.is_main:  # one process per run folder (rank 0 holds it for all ranks)
            held.enter_context(folder_lock(files.dir, command=describe_command(argv)))
            prepare_run_dir(files.dir, resume=resume)  # again, now that no one else writes here
        return _fit_on_device(config, particles, files, world, resume=resume, argv=argv,
                              stop_after=stop_after)


def _fit_on_device(
    config: Config,
    particles: ParticleSet,
    files: RunFiles,
    world: WorldInfo,
    *,
    resume: bool,
    argv: list[str] | None,
    stop_after: int | None,
) -> FitResult:
    """:func:`fit` after the run folder is held: device, threads, distributed set-up."""
    device = device_for_rank(resolve_device(config.run.device), world)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":  # num_threads None: the cores available to the process
        torch.set_num_threads(
            default_cpu_threads(config.run.num_threads, threads_before, available_cpus()))
    created = init_distributed(world, device)
    if not created:  # a workflow's group (--halves, --starts): every rank has checked the
        synchronise(world)  # folder (prepare_run_dir) before rank 0 writes in it
    ended_normally = False
    feedback = Feedback.choose(main=world.is_main, bar=config.run.progress,
                               interval_s=config.run.progress_interval_s)
    log = (run_log(files.log, header=header_line(argv, resumed=resume)) if world.is_main
           else nullcontext())
    try:
        with log, feedback.console():
            result = _fit(config, particles, files, device, resume=resume, argv=argv,
                          stop_after=stop_after, world=world, feedback=feedback)
        ended_normally = True
        return result
    finally:
        torch.set_num_threads(threads_before)
        teardown_distributed(created, synchronise=ended_normally)


@dataclass
class _Run:
    """What stays fixed while the epochs run."""

    config: Config  # as run: a stage-1 step budget in epochs (train/schedule.py)
    given: Config  # as given: config.yaml and the checkpoint keep it
    files: RunFiles
    data: TrainingData
    device: torch.device
    shard: Shard | None  # distributed: this rank's particles and the collectives
    main: bool  # rank 0: writes every file
    feedback: Feedback
    generator: torch.Generator  # the batch order
    switch_epoch: int  # K; the epochs (E) for the methods that never switch
    tracker: PoseTracker | None  # pose_track.npz (rank 0)
    search_disc: LossDisc | None  # the search epochs' pose steps (search_refine_disc)
    local_disc: LossDisc | None  # the local epochs' pose steps (local_refine_disc)
    particles: ParticleSet  # the input (outputs; backprojection CTFs without a training source)

    @property
    def per_epoch(self) -> int:
        """Batches per epoch."""
        return num_batches(len(self.data), self.config.optim.batch_size)

    def loss_radius(self, epoch: int) -> Callable[[int], float | None] | None:
        """``b -> loss radius`` of stage-1 epoch ``epoch`` (None: no frequency marching)."""
        return loss_radius_schedule(self.config, self.data.box_px, self.per_epoch, epoch)

    def final_stage1_radius(self) -> float | None:
        """The last stage-1 step's loss radius (the inference passes use it)."""
        return final_stage1_radius(self.config, self.data.box_px, self.per_epoch)


class _BackprojectionPlan(TypedDict):
    """:meth:`RunPlan.from_schedule`'s backprojection arguments."""

    particles: int
    insertions: int
    rebackproject: bool
    rebackproject_during_search: bool
    search_rebackproject_weight: float


@dataclass
class _Clock:
    """The epoch plan as it stands and the images/s measured so far (progress and ETAs)."""

    end: int  # the run's last epoch (earlier after an early stop of the search)
    last: int  # the last epoch of this session (``stop_after``)
    plan: RunPlan
    totals: PhaseTotals
    scale: float  # distributed: rank 0 reports its own images, the display counts every rank's
    t_start: float
    speeds: Mapping[str, float]  # the phases' relative images/s at this box (not yet measured)
    bar: PassProgress | None = None


def _fit(
    config: Config,
    particles: ParticleSet,
    files: RunFiles,
    device: torch.device,
    *,
    resume: bool,
    argv: list[str] | None,
    stop_after: int | None,
    world: WorldInfo = WorldInfo(),  # noqa: B008 (frozen: one process, rank 0)
    feedback: Feedback | None = None,
) -> FitResult:
    """:func:`fit` on ``device``: setup, the epochs, the final outputs."""
    shard = Shard(world) if world.distributed else None
    given, config, ckpt = open_run(config, particles, files, resume=resume, argv=argv,
                                   main=world.is_main)
    generator = seed_everything(config.run.seed)
    data = load_training_data(config, particles, device, shard, world)
    record = noise_record(data)
    if record is not None and world.is_main:
        write_noise_spectrum(files.noise_spectrum, record)
    state = initial_state(config, files, data, device, shard, ckpt, generator,
                          main=world.is_main)
    del ckpt
    K = config.schedule.switch_epoch
    if config.schedule.method in AMORTIZED_METHODS:
        K = config.schedule.epochs  # the baselines never switch, even when resumed with more
    # pose_track.npz (resume: entries after the checkpoint's epoch are dropped)
    tracker = None if not world.is_main else PoseTracker.start(
        files.dir, num_particles=len(data), num_heads=config.model.num_heads,
        count=config.run.track_particles, seed=config.run.seed, last_epoch=state.epoch,
    )
    run = _Run(config, given, files, data, device, shard, world.is_main,
               Feedback() if feedback is None else feedback, generator, K, tracker,
               search_refine_disc(config, data), local_refine_disc(config, data), particles)
    if run.local_disc is not None:
        logger.info("local epochs: the pose steps fit |k| <= %.3g cycles/box (%.3g Å, of the "
                    "training disc's %.3g), the volume steps the whole disc",
                    run.local_disc.radius_px, config.optim.local_refine_resolution_angstrom,
                    float(data.frequencies.norm(dim=-1).max()))
    end = _train_epochs(run, state, stop_after)
    if state.epoch < end:
        return FitResult(files.dir, state.epoch, state.stage, finished=False)
    return _finish(run, state)


# --------------------------------------------------------------------------- the epochs


def _train_epochs(run: _Run, state: TrainState, stop_after: int | None) -> int:
    """Every epoch after ``state.epoch`` up to the run's last (or ``stop_after``), each
    committed by its checkpoint; returns the run's last epoch."""
    s = run.config.schedule
    end = final_epoch(s, state.search_stopped_after)  # E, less after an early stop
    last = end if stop_after is None else min(end, max(stop_after, state.epoch))
    plan = RunPlan.from_schedule(s, switch_epoch=run.switch_epoch,
                                 search_stopped_after=state.search_stopped_after,
                                 last_epoch=last, **_backprojection_plan(run, state))
    # progress: the images/s measured so far (resume: earlier epochs)
    totals = (phase_totals(read_metrics(run.files.metrics), plan, run.data.box_px)
              if run.main else {})
    n = len(run.data)
    scale = 1.0 if run.shard is None else n / max(int(run.shard.owned(n).numel()), 1)
    # the encoder as trained: in DDP when distributed (checkpoints save `encoder` itself)
    trained = (None if state.encoder is None or run.shard is None
               else wrap_encoder(state.encoder, run.device))
    clock = _Clock(end, last, plan, totals, scale, time.perf_counter(),
                   relative_speed(run.data.box_px))
    try:
        for epoch in range(state.epoch + 1, last + 1):
            if epoch > clock.last:  # the global search stopped early: the run ends sooner
                break
            trained = _epoch(run, state, clock, epoch, trained)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (cryospin.cli.main's handler)
        raise TrainingInterrupted(run.files.dir, state.epoch,
                                  terminated=isinstance(exc, Terminated)) from None
    except OutputError as exc:  # disk full, file-size limit, folder gone: keep the checkpoint
        raise OutputError(f"{exc}; {_resume_hint(run.files.dir, state.epoch)}") from None
    finally:
        if clock.bar is not None:
            clock.bar.close()
    return clock.end


def _epoch(run: _Run, state: TrainState, clock: _Clock, epoch: int,
           trained: torch.nn.Module | None) -> torch.nn.Module | None:
    """One epoch (the switch first when it is due), committed; returns the encoder as trained
    (None after the switch)."""
    extra: EpochExtra = {}
    if state.stage == Stage.AUTOENCODE and epoch > run.switch_epoch:
        pose_table, extra = switch_poses(run.config, state.encoder, state.volume, run.data,
                                         run.shard, run.feedback, record=state.switch_record,
                                         loss_radius_px=run.final_stage1_radius())
        state.switch(run.config, pose_table)
        trained = None
        return_free_memory()  # the encoder and its optimiser are gone
    if step_due(run.config, epoch, state):  # C1 up to here: the group's frame from now on
        extra["symmetry"] = impose_on_state(run.config, state, run.shard)
    when = rebackproject_due(run.config, epoch, state)
    if when is not None:  # the map of the local epochs or of this search epoch, from the poses
        record = rebackproject_on_state(run.config, state, run.particles, run.data, run.shard,
                                        when)
        extra["rebackproject"] = record
        clock.totals = add_sample(
            clock.totals, BACKPROJECT,
            record["images"] * lowpass_weight(run.data.box_px, record["radius_px"]),
            record["seconds"])
    if consensus_due(run.config, epoch, state):  # on the map the local epochs start from
        extra["consensus"] = consensus_on_state(run.config, state, run.particles, run.data,
                                                run.shard, remade=when == "after_search")
    cut = (stage1_batches(run.config.schedule, epoch, run.per_epoch)
           if state.stage == Stage.AUTOENCODE else None)  # the step budget's cut epoch
    n = len(run.data)
    images = n if cut is None else min(n, cut * run.config.optim.batch_size)
    clock.bar = _epoch_progress(run.feedback, clock, epoch, images,
                                _earliest_stop_plan(run, state, clock, epoch))
    t0 = time.perf_counter()
    if state.stage == Stage.AUTOENCODE:
        stats = _stage1_epoch(run, state, epoch, cut, trained, clock.bar)
    else:
        stats = _stage2_epoch(run, state, epoch, clock.bar, extra)
        extra.update(_stop_search_if_done(run, state, clock, epoch, stats))
    wall = time.perf_counter() - t0
    clock.bar.close()
    clock.totals = add_sample(clock.totals, clock.plan.phase(epoch), stats.num_images, wall)
    elapsed = state.elapsed_before_s + (time.perf_counter() - clock.t_start)
    _commit(run, state, epoch, stats, wall=wall, elapsed_s=elapsed, extra=extra)
    state.epoch = epoch
    logger.info(
        "epoch %d/%d %s: loss %.6g, %.1f images/s%s%s%s%s", epoch, clock.end, state.stage,
        stats.loss, stats.num_images / wall if wall > 0 else float("nan"),
        f", pose change {stats.mean_pose_change_deg:.3g} deg"
        if stats.mean_pose_change_deg is not None else "",
        f", {100 * stats.jump_fraction:.1f} % jumped > {JUMP_THRESHOLD_DEG:g} deg"
        if stats.jump_fraction is not None else "",
        f", {100 * stats.empty_fraction:.1f} % of the images more likely empty"
        if stats.empty_fraction is not None else "",
        f", {100 * stats.junk_fraction:.1f} % more likely junk"
        + ("" if stats.junk_weighted else " (not yet weighed in)")
        if stats.junk_fraction is not None else "",
    )
    if "search_stop" in extra:
        logger.info(search_stop_message(extra["search_stop"]))
    return trained


def _stage1_epoch(run: _Run, state: TrainState, epoch: int, cut: int | None,
                  trained: torch.nn.Module | None, bar: PassProgress) -> EpochStats:
    """A stage-1 epoch (``cut``: its batches under a step budget, None: all); the last one
    records its winners for the switch when ``schedule.switch_poses = last_epoch``."""
    config, K = run.config, run.switch_epoch
    assert state.encoder is not None and state.encoder_opt is not None  # stage 1 has them
    if epoch == K < config.schedule.epochs and config.schedule.switch_poses == "last_epoch":
        state.switch_record = BestPoses.empty(len(run.data), config.model.predict_shifts,
                                              run.data.device)
    return autoencode_epoch(
        state.encoder if trained is None else trained, state.volume, run.data,
        state.encoder_opt, state.decoder_opt,
        batch_size=config.optim.batch_size, generator=run.generator, epoch=epoch,
        progress=bar.update, loss_radius=run.loss_radius(epoch),
        lowpass_input=config.model.encoder_lowpass, shard=run.shard,
        grad_scaler=state.grad_scaler, record=state.switch_record if epoch == K else None,
        max_batches=cut, encoder_lr=encoder_lr_schedule(config, run.per_epoch, epoch),
    )


def _stage2_epoch(run: _Run, state: TrainState, epoch: int, bar: PassProgress,
                  extra: EpochExtra) -> EpochStats:
    """A stage-2 epoch at the schedule's learning rates, with the global search in a search
    epoch and the relaxed pseudo-symmetry's copies (its record into ``extra``)."""
    config, stopped = run.config, state.search_stopped_after
    relaxing = relaxed_group(config)
    relax = None if relaxing is None else place_copies(state.volume, relaxing, run.shard)
    assert state.pose_table is not None  # stage 2 has one
    for group in state.decoder_opt.param_groups:
        group["lr"] = stage2_decoder_lr(config, epoch, stopped)
    state.pose_table.lr_rot, state.pose_table.lr_shift = stage2_pose_lrs(config, epoch, stopped)
    search = (epoch_search(config, run.data, epoch - run.switch_epoch,
                           state.volume.point_group)
              if is_search_epoch(config.schedule, epoch, stopped) else None)
    stats = autodecode_epoch(
        state.volume, state.pose_table, run.data, state.decoder_opt,
        batch_size=config.optim.batch_size,
        pose_steps=config.optim.pose_steps_per_batch,
        refine_shifts=config.model.predict_shifts,
        generator=run.generator, epoch=epoch, progress=bar.update, search=search,
        shard=run.shard, anchor_frame=config.optim.anchor_pose_frame,
        symmetry=_group_or_none(state.volume.point_group),
        relax=None if relax is None else relax.copies,
        refine_disc=run.local_disc if search is None else run.search_disc,
        empty_class=config.model.empty_class,
        junk_class=config.model.junk_class,
        junk_weights=junk_takes_effect(state.last_junk_fraction),
    )
    if config.model.junk_class:
        state.last_junk_fraction = stats.junk_fraction
    if relax is not None:
        extra["relax"] = relax_record(relax, stats.relaxed_fraction)
    return stats


def _group_or_none(symbol: str) -> torch.Tensor | None:
    """The rotations `(G, 3, 3)` of point group ``symbol``; None for C1."""
    group = point_group_rotations(symbol)
    return None if group.shape[0] == 1 else group


def _stop_search_if_done(run: _Run, state: TrainState, clock: _Clock, epoch: int,
                         stats: EpochStats) -> EpochExtra:
    """After a search epoch in which few particles jumped, or no fewer than in the one before,
    or whose mean loss hardly fell since the one before (the same on every rank): the search
    stops, the run ends sooner; returns the ``metrics.jsonl`` record (empty: no stop)."""
    s = run.config.schedule
    if (not is_search_epoch(s, epoch, state.search_stopped_after)
            or state.search_stopped_after is not None):
        return {}
    previous, state.last_jump_fraction = state.last_jump_fraction, stats.jump_fraction
    previous_loss, state.last_search_loss = state.last_search_loss, stats.loss
    drop = None if previous_loss is None else previous_loss - stats.loss
    rule = search_stops(s, epoch, stats.jump_fraction, previous, drop)
    if rule is None:
        return {}
    state.search_stopped_after = epoch
    clock.end = final_epoch(s, epoch)
    clock.last = min(clock.last, clock.end)
    clock.plan = RunPlan.from_schedule(s, switch_epoch=run.switch_epoch,
                                       search_stopped_after=epoch, last_epoch=clock.last,
                                       **_backprojection_plan(run, state))
    return {"search_stop": search_stop_record(
        epoch, float(stats.jump_fraction or 0.0), previous, rule=rule,
        threshold_deg=JUMP_THRESHOLD_DEG,
        stop_fraction=s.search_stop_fraction, local_epochs=clock.end - epoch,
        loss_drop_nats=drop, settled_nats=s.search_settled_nats if rule == "settled" else None)}


def _commit(run: _Run, state: TrainState, epoch: int, stats: EpochStats, *, wall: float,
            elapsed_s: float, extra: EpochExtra) -> None:
    """The epoch's outputs: the pose track, then (rank 0) the map, the metrics line and the
    checkpoint, the epoch's commit point (distributed: every rank's rows gathered first)."""
    table = full_pose_table(state.pose_table, run.shard)
    record = (full_record(state.switch_record, run.shard)
              if state.stage == Stage.AUTOENCODE else None)
    config = run.config
    if run.tracker is not None:  # before the checkpoint; draws no random numbers
        radius = run.loss_radius(epoch) if state.pose_table is None else None
        run.tracker.record(
            epoch, encoder=state.encoder, volume=state.volume, data=run.data.unsharded(),
            pose_table=table, batch_size=config.run.inference_batch_size,
            loss_radius_px=None if radius is None else radius(run.per_epoch),
            lowpass_input=config.model.encoder_lowpass,
        )
    if not run.main:
        return
    metrics = epoch_metrics(
        stats, epoch=epoch, stage=state.stage, wall_s=wall, elapsed_s=elapsed_s,
        decoder_lr=float(state.decoder_opt.param_groups[0]["lr"]),
        pose_lr=None if table is None else float(table.lr_rot), extra=extra,
        encoder_lr=(None if state.encoder_opt is None
                    else float(state.encoder_opt.param_groups[0]["lr"])),
    )
    checkpoint = state.to_checkpoint(
        epoch=epoch, config=config_to_dict(run.given), data=run.data.summary(),
        generator=run.generator, elapsed_s=elapsed_s, pose_table=table,
        switch_record=record,
    )
    write_epoch(run.files, state.volume, pixel_size_angstrom=run.data.pixel_size_angstrom,
                keep_map=config.run.keep_epoch_maps, metrics=metrics, checkpoint=checkpoint)


def _finish(run: _Run, state: TrainState) -> FitResult:
    """The final poses (the pose table, or the encoder's best heads if the run never
    switched) and outputs (rank 0)."""
    files = run.files
    if step_due(run.config, state.epoch + 1, state):  # the search ran to the last epoch
        impose_on_state(run.config, state, run.shard)
    pose_table = full_pose_table(state.pose_table, run.shard)  # rank 0 writes the outputs
    if not run.main:
        return FitResult(files.dir, state.epoch, state.stage, finished=True)
    n = len(run.data)
    if pose_table is not None:
        rotations, shifts = pose_table.gather(torch.arange(n, device=run.device))
        shifts_out = shifts if run.config.model.predict_shifts else None
    else:
        assert state.encoder is not None  # the run never switched: it has one
        with run.feedback.start("final poses: inference pass", n) as progress:
            best = infer_best_poses(  # rank 0: every particle (sharded data read them lazily)
                state.encoder, state.volume, run.data.unsharded(),
                batch_size=run.config.run.inference_batch_size,
                loss_radius_px=run.final_stage1_radius(),
                lowpass_input=run.config.model.encoder_lowpass, progress=progress.update,
            )
        rotations, shifts_out = best.rotations, best.shifts_px
    rotations = rotations.detach().cpu()
    shifts_out = None if shifts_out is None else shifts_out.detach().cpu()
    junk = run.config.model.junk_class and junk_takes_effect(state.last_junk_fraction)
    if run.config.model.junk_class and not junk:
        logger.warning(
            "the junk class never took effect: %s of the last stage-2 epoch's images fit junk "
            "better than the map (it weighs in below %g %%); the scores are against an empty "
            "image only%s", "none" if state.last_junk_fraction is None
            else f"{100 * state.last_junk_fraction:.1f} %", 100 * JUNK_GATE_FRACTION,
            "" if run.data.noise_spectrum is not None or not run.data.use_ctf else
            " (with noise that is not white, as real images' is, the low frequencies' excess "
            "power looks like junk: --whiten-noise)")
    with run.feedback.start("final: particle scores", n) as progress, torch.no_grad():
        scores = particle_scores(state.volume(), rotations, shifts_out, run.data.unsharded(),
                                 batch_size=run.config.run.inference_batch_size,
                                 progress=progress.update, junk_class=junk)
    try:
        write_final(files, run.config, run.particles, run.data, state.volume, rotations,
                    shifts_out, feedback=run.feedback, scores=scores, junk_scored=junk)
    except OutputError as exc:  # every epoch is checkpointed: --resume writes these again
        raise OutputError(f"{exc}; {_resume_hint(files.dir, state.epoch)}") from None
    return FitResult(
        files.dir, state.epoch, state.stage, finished=True, rotations=rotations,
        shifts_px=shifts_out, map_path=files.map, star_path=files.star, pkl_path=files.pkl,
    )


# --------------------------------------------------------------------------- helpers


def _earliest_stop_plan(run: _Run, state: TrainState, clock: _Clock,
                        epoch: int) -> RunPlan | None:
    """The plan if the global search stopped early at the first chance from ``epoch`` on
    (:func:`cryospin.train.schedule.earliest_search_stop`), or None when it cannot any more
    before the search or this session's training ends (or the run has no search)."""
    s = run.config.schedule
    if clock.plan.last_search_epoch <= clock.plan.switch_epoch:
        return None
    stop = earliest_search_stop(s, epoch, state.search_stopped_after)
    if stop is None or stop >= min(clock.plan.last_search_epoch, clock.last):
        return None
    return RunPlan.from_schedule(s, switch_epoch=run.switch_epoch, search_stopped_after=stop,
                                 last_epoch=min(clock.last, final_epoch(s, stop)),
                                 **_backprojection_plan(run, state))


def _epoch_progress(feedback: Feedback, clock: _Clock, epoch: int, images: int,
                    early: RunPlan | None) -> PassProgress:
    """The progress display of ``epoch`` (``images`` per epoch), with the run's ETA from the
    images/s measured so far and this epoch's (:func:`cryospin.train.progress.run_eta_s`):
    as planned, and with ``early`` (the plan if the search stopped at the first chance) that
    one's too."""
    plan, totals, speeds = clock.plan, clock.totals, clock.speeds  # as the epoch starts
    phase = plan.phase(epoch)

    def run_eta(done: float, seconds: float) -> RunEstimate:
        live = add_sample(totals, phase, done, seconds)
        planned = run_eta_s(plan, epoch, done, images, live, speeds)
        if early is None:
            return RunEstimate(planned)
        return RunEstimate(planned, run_eta_s(early, epoch, done, images, live, speeds),
                           early.last_search_epoch)

    return feedback.start(f"epoch {epoch}/{clock.end} ({PHASE_LABELS[phase]})", images,
                          what="epoch", run_eta=run_eta, scale=clock.scale)


def _backprojection_plan(run: _Run, state: TrainState) -> _BackprojectionPlan:
    """The backprojections' arguments of :meth:`RunPlan.from_schedule`: every particle, with
    the volume's group, or the configured one while it is still to be imposed (``auto``: C1,
    the group is not known yet)."""
    group = state.volume.point_group
    wanted = run.config.model.symmetry
    if group.upper() == "C1" and wanted.lower() != "auto":
        group = wanted
    searches = run.config.schedule.method not in AMORTIZED_METHODS
    return {"particles": len(run.data), "insertions": insertions_per_image(group),
            "rebackproject": run.config.optim.rebackproject_after_search and searches,
            "rebackproject_during_search": run.config.optim.rebackproject_during_search
            and searches,
            "search_rebackproject_weight": lowpass_weight(
                run.data.box_px, search_reach_px(run.config, run.data.box_px, group))}


def _resume_hint(run_dir: Path, epochs_done: int) -> str:
    """What to do after a failed epoch write (the last complete checkpoint is intact)."""
    if not epochs_done:
        return f"no epoch completed; fix this and run: cryospin reconstruct --resume {run_dir}"
    return (f"the last complete epoch is {epochs_done}; fix this and continue with: "
            f"cryospin reconstruct --resume {run_dir}")
