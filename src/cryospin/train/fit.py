"""``fit``: the cryoSPIN training run, as explicit phases.

1. **setup** — run folder, device, threads, seeds, preprocessing (:mod:`cryospin.train.data`),
   volume initialised from the data's radial amplitude, encoder, optimisers; or everything
   restored from ``RUN_DIR/checkpoint.pt`` on resume.
2. **stage 1** (epochs ``1 .. switch_epoch``) — :func:`~cryospin.train.autoencode.autoencode_epoch`.
3. **the switch** — one inference pass picks every particle's best head; its pose seeds the
   :class:`~cryospin.pose.PoseTable`; the encoder is dropped; a new volume optimiser with the
   lower learning rate.
4. **stage 2** (epochs ``switch_epoch + 1 .. epochs``) —
   :func:`~cryospin.train.autodecode.autodecode_epoch`; its first ``schedule.search_epochs``
   epochs start each batch with a global rotation search
   (:class:`~cryospin.train.autodecode.RotationSearch`) on a low-frequency disc whose radius
   grows from ``optim.search_radius_px`` to ``optim.search_radius_end_px``. With
   ``schedule.search_min_epochs`` the search stops early, after a search epoch in which fewer
   than ``schedule.search_stop_fraction`` of the particles jumped; the local epochs then follow
   at once and the run ends sooner (:mod:`cryospin.train.schedule`; the stop is kept in the
   checkpoint for ``--resume`` and logged in ``metrics.jsonl``).

Stage 1 may use frequency marching: the loss disc grows from
``schedule.loss_radius_start_px`` to ``schedule.loss_radius_end_px`` over the stage-1 steps
(optionally with the encoder's input low-passed to match, ``model.encoder_lowpass``).

After every epoch: ``map.NNN.mrc`` (real-space map, voxel size set), a line of ``metrics.jsonl``,
``pose_track.npz`` (:mod:`cryospin.train.track`) and ``checkpoint.pt`` (atomic; the previous
one survives until the new one is complete). At the end: ``map.mrc``, ``poses.star``
(RELION 3.1, every input column carried), ``poses.pkl`` (cryoDRGN) and, for a ``.cs`` input,
``poses.cs``. ``config.yaml`` is written at the start, and
``particle_set.json``, the particles' identity that ``--resume`` checks
(:mod:`cryospin.io.identity`). One process at a time writes into a run folder: ``fit`` holds its
lock, ``RUN_DIR/.cryospin.lock`` (:mod:`cryospin.runlock`; under torchrun rank 0 holds it).
With ``run.final_map = "backprojection"`` (default) ``map.mrc`` is a CTF-corrected Wiener
backprojection of the training images from the final poses
(:func:`final_backprojection`) and the trained volume is kept as ``map_decoder.mrc``: at a fixed
set of poses the closed-form reconstruction is the better estimate of the map than the volume
after a finite number of stochastic steps (measured: 9.75 Å against 11.06 Å on the 64 px
benchmark, benchmarks/RESULTS.md). ``convergence_fsc.json`` then holds the FSC of ``map.mrc``
and ``map_decoder.mrc``, logged at the end: a convergence check, not a resolution (same
particles, same poses; :mod:`cryospin.evaluate.convergence`; ``--halves`` gives a resolution).

Resuming restores every parameter, optimiser state, the pose table and all RNG states, so that
a resumed run equals the uninterrupted one with the same seed.

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
import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryospin import __version__
from cryospin.atomic import remove_stale_temporaries
from cryospin.cpus import available_cpus, default_cpu_threads
from cryospin.encoder import InPlaneFlipEncoder, MultiHeadPoseEncoder
from cryospin.errors import InputError, OutputError, Terminated
from cryospin.io.identity import check_same_particles, particle_set_identity, save_identity
from cryospin.runlock import describe_command, folder_lock
from cryospin.train.autodecode import JUMP_THRESHOLD_DEG, RotationSearch, autodecode_epoch
from cryospin.train.autoencode import (
    BestPoses,
    EpochStats,
    autoencode_epoch,
    infer_best_poses,
    stage1_loss_radius,
)
from cryospin.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from cryospin.train.config import (
    AMORTIZED_METHODS,
    Config,
    ScheduleConfig,
    config_from_dict,
    config_to_dict,
    read_config_argv,
    record_resolved,
    save_config,
)
from cryospin.train.data import TrainingData, num_batches, prepare_data
from cryospin.train.distributed import (
    Shard,
    WorldInfo,
    device_for_rank,
    init_distributed,
    teardown_distributed,
    world_from_env,
    wrap_encoder,
)
from cryospin.train.feedback import Feedback, PassProgress
from cryospin.train.metrics import EpochMetrics, append_metrics, read_metrics, truncate_metrics
from cryospin.train.precision import (
    PrecisionChoice,
    StepTimes,
    cpu_model_name,
    measure_encoder_step,
    resolve_precision,
)
from cryospin.train.progress import (
    PHASE_LABELS,
    PhaseTotals,
    RunPlan,
    add_sample,
    phase_totals,
    run_eta_s,
)
from cryospin.train.runlog import RUN_LOG, header_line, run_log, start_run_log
from cryospin.train.schedule import (
    decay_fraction,
    final_epoch,
    is_search_epoch,
    search_stops,
    stage1_batches,
    with_step_budget,
)
from cryospin.train.track import PoseTracker

__all__ = [
    "AUTOENCODE",
    "AUTODECODE",
    "FitResult",
    "TrainingInterrupted",
    "RunFiles",
    "resolve_device",
    "prepare_run_dir",
    "fit",
    "stage2_decoder_lr",
    "stage2_pose_lrs",
]

logger = logging.getLogger(__name__)

AUTOENCODE = "autoencode"
AUTODECODE = "autodecode"


class RunFiles:
    """Names of the files in a run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.config = self.dir / "config.yaml"
        self.checkpoint = self.dir / "checkpoint.pt"
        self.metrics = self.dir / "metrics.jsonl"
        self.map = self.dir / "map.mrc"
        self.map_decoder = self.dir / "map_decoder.mrc"
        self.star = self.dir / "poses.star"
        self.pkl = self.dir / "poses.pkl"
        self.cs = self.dir / "poses.cs"  # only for .cs inputs
        self.log = self.dir / RUN_LOG  # cryospin.train.runlog
        self.particle_set = self.dir / "particle_set.json"  # cryospin.io.identity
        self.convergence = self.dir / "convergence_fsc.json"  # cryospin.evaluate.convergence

    def epoch_map(self, epoch: int) -> Path:
        return self.dir / f"map.{epoch:03d}.mrc"


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


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available, else mps, else cpu; others are checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda requested but no CUDA device is available")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise InputError("device mps requested but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {name!r} (auto, cpu, cuda or mps)")
    return torch.device(name)


def prepare_run_dir(run_dir: str | Path, *, resume: bool) -> RunFiles:
    """Create/check the run folder before any work is done.

    Raises
    ------
    OutputError
        When the folder cannot be created or written, or (without ``resume``) already holds a
        run.
    InputError
        When ``resume`` and there is neither a checkpoint nor a ``config.yaml`` (a run killed
        before its first checkpoint, with ``config.yaml`` written, resumes from epoch 1).
    """
    files = RunFiles(run_dir)
    if resume:
        if not files.checkpoint.is_file() and not files.config.is_file():
            raise InputError("no checkpoint.pt here to resume from", files.dir)
    else:
        if files.checkpoint.exists() or files.metrics.exists():
            raise OutputError(
                "already holds a run (use --resume to continue it, or choose another -o)",
                files.dir,
            )
        try:
            files.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder ({exc.strerror})",
                              files.dir) from None
    try:
        with tempfile.TemporaryFile(dir=files.dir):
            pass
    except OSError as exc:
        raise OutputError(f"output folder is not writable ({exc.strerror})", files.dir) from None
    return files


# --------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> torch.Generator:
    """Seed the global generators; return the CPU generator of the batch order."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (global state, for third-party code)
    random.seed(seed)
    return torch.Generator(device="cpu").manual_seed(seed)


def _build_encoder(
    config: Config, box_px: int, device: torch.device, dtype: torch.dtype | None
) -> torch.nn.Module:
    """The stage-1 encoder (trunk in ``dtype`` autocast, None: float32); for
    ``method = cryoai`` each head's pose comes with its 180° in-plane partner, so the trainer
    sees ``2 · num_heads`` hypotheses."""
    m = config.model
    encoder: torch.nn.Module = MultiHeadPoseEncoder(
        box_px,
        m.num_heads,
        width_multiplier=m.width_multiplier,
        predict_shifts=m.predict_shifts,
        max_shift_px=m.max_shift_px,
        head_hidden=m.head_hidden,
        autocast_dtype=dtype,
        input_box_px=m.encoder_input_box(box_px),
        head=m.head,
        input_channels=m.encoder_input,
        pooling=m.pooling,
    )
    if config.schedule.method == "cryoai":
        encoder = InPlaneFlipEncoder(encoder)
    return encoder.to(device)


def _choose_precision(
    config: Config, box_px: int, device: torch.device, shard: Shard | None
) -> PrecisionChoice:
    """Resolve ``model.precision`` (micro-benchmark of this run's encoder step on CPU); under
    torchrun every rank takes the same choice (a split vote falls back to fp32)."""
    m = config.model
    shape = {"box_px": box_px, "encoder_box_px": m.encoder_input_box(box_px),
             "width": m.width_multiplier, "heads": m.num_heads, "hidden": m.head_hidden,
             "shifts": m.predict_shifts}
    if (m.head, m.encoder_input, m.pooling) != ("spread", "image", "vgg16"):
        # another trunk or head: another measurement (bf16 with 2x2 deep maps measured 8x
        # slower than fp32 on an AVX512-BF16 CPU, with 1x1 maps 1.5x faster)
        shape.update(head=m.head, input=m.encoder_input, pooling=m.pooling)

    def measure() -> StepTimes:
        logger.info("timing the encoder step in fp32 and bf16 (once per machine)")
        return measure_encoder_step(
            lambda dtype: _build_encoder(config, box_px, torch.device("cpu"), dtype), box_px)

    choice = resolve_precision(m.precision, device, measure=measure, shape=shape)
    if shard is not None:
        names = ("fp32", "bf16", "fp16")
        votes = shard.all_sum(torch.tensor([float(choice.name == n) for n in names]))
        agreed = [n for n, v in zip(names, votes.tolist(), strict=True)
                  if v == shard.world_size]
        if not agreed:
            choice = PrecisionChoice("fp32", "the ranks chose differently; fp32 on all",
                                     m.precision)
    return choice


def describe_execution(device: torch.device, choice: PrecisionChoice | None) -> str:
    """One line: device (CPU model and kernel capability, or GPU name), precision and why
    (None: no encoder to run, a run resumed after the switch), threads."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        where = (f"cpu ({cpu_model_name()}, capability "
                 f"{torch.backends.cpu.get_cpu_capability()})")
    else:
        where = device.type
    precision = ("precision: no encoder (after the switch)" if choice is None
                 else f"precision {choice.name} ({choice.reason})")
    return f"device {where}, {precision}, {torch.get_num_threads()} threads"


def _build_pose_table(
    config: Config, rotations: torch.Tensor, shifts_px: torch.Tensor | None
) -> Any:
    from cryospin.pose import PoseTable

    m, o = config.model, config.optim
    return PoseTable(
        rotations,
        shifts_px if m.predict_shifts else None,
        lr_rot=o.pose_lr,
        lr_shift=o.shift_lr,
        max_shift_px=m.max_shift_px if m.predict_shifts else None,
    )


def _adam(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def _epoch_progress(feedback: Feedback, plan: RunPlan, totals: PhaseTotals, epoch: int,
                    end: int, images: int, scale: float) -> PassProgress:
    """The progress display of ``epoch`` (``images`` per epoch, the run's last epoch ``end``),
    with the run's ETA from the images/s measured so far and this epoch's
    (:func:`cryospin.train.progress.run_eta_s`)."""
    phase = plan.phase(epoch)

    def run_eta(done: float, seconds: float) -> float | None:
        return run_eta_s(plan, epoch, done, images, add_sample(totals, phase, done, seconds))

    return feedback.start(f"epoch {epoch}/{end} ({PHASE_LABELS[phase]})", images,
                          what="epoch", run_eta=run_eta, scale=scale)


# --------------------------------------------------------------------------- fit


def fit(
    config: Config,
    particles: Any,
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
    particles : cryospin.io.particles.ParticleSet
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
    particles: Any,
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


def _fit(
    config: Config,
    particles: Any,
    files: RunFiles,
    device: torch.device,
    *,
    resume: bool,
    argv: list[str] | None,
    stop_after: int | None,
    world: WorldInfo = WorldInfo(),  # noqa: B008 (frozen: one process, rank 0)
    feedback: Feedback | None = None,
) -> FitResult:
    feedback = Feedback() if feedback is None else feedback  # None: no progress display
    # distributed: this rank's particles and the collectives; rank 0 writes every file
    shard = Shard(world) if world.distributed else None
    main = world.is_main
    state = load_checkpoint(files.checkpoint) if resume and files.checkpoint.is_file() else None
    # the configuration as given (config.yaml, the checkpoint) and as run: a stage-1 step
    # budget in epochs (train/schedule.py)
    given = config
    per_epoch = num_batches(len(particles), config.optim.batch_size)
    config = dataclasses.replace(config, schedule=with_step_budget(config.schedule, per_epoch))
    if state is not None:
        _check_resume_config(given, state, files.checkpoint, schedule=config.schedule)
    identity = check_same_particles(files.particle_set, particles, files.dir) if resume else None
    start_run_log(files.log)  # the run is accepted: run.log is written from here on
    if resume and main:
        for stale in remove_stale_temporaries(files.dir):  # left by a kill during a write
            logger.info("removed %s (left by an interrupted write)", stale.name)
        if state is None:  # killed before the first checkpoint: start again at epoch 1
            logger.warning("%s has no checkpoint yet: starting again from epoch 1", files.dir)
            truncate_metrics(files.metrics, 0)
        first_argv, resumed = read_config_argv(files.config)
        save_config(files.config, given, first_argv, resumed=[*resumed, argv])
        if identity is None:  # a run from before particle_set.json: record it from now on
            logger.warning("%s records no particle set (an older run): cannot check that "
                           "these are its particles", files.dir)
            save_identity(files.particle_set, particle_set_identity(particles))
    elif main:
        save_config(files.config, given, argv)
        save_identity(files.particle_set, particle_set_identity(particles))

    generator = _seed_everything(config.run.seed)
    logger.info("preprocessing %d particles (%d px) on %s", len(particles), particles.box_px,
                device)
    from cryospin.train.memory import (  # logs the memory plan, picks the loader
        plan_and_load,
        return_free_memory,
    )

    # distributed: each rank reads, preprocesses and holds only its particles (sharded data)
    data = plan_and_load(config, prepare_data(particles, config.data, device=device,
                                              preload=False), shard=shard)
    return_free_memory()  # the statistics sample and preprocessing temporaries
    if shard is not None and len(data) < world.world_size:
        raise InputError(f"{len(data)} particles cannot be shared by {world.world_size} "
                         "processes")
    from cryospin.volume import HartleyVolume

    init_gen = torch.Generator(device="cpu").manual_seed(config.run.seed + 1)
    volume = HartleyVolume.ab_initio(
        data.box_px, data.radial_amplitude.cpu(), generator=init_gen
    ).to(device)

    K, E = config.schedule.switch_epoch, config.schedule.epochs
    if config.schedule.method in AMORTIZED_METHODS:
        K = E  # the baselines never switch, even when resumed with more epochs
    # with K = 0 the switch happens before epoch 1: poses from the untrained encoder
    stage = AUTOENCODE
    if state is not None:
        stage = state["stage"]
    encoder = encoder_opt = scaler = None
    precision = (_choose_precision(config, data.box_px, device, shard) if stage == AUTOENCODE
                 else None)
    logger.info("%s", describe_execution(device, precision))
    if precision is not None:
        if main:
            record_resolved(files.config, {
                "precision": precision.name, "precision_reason": precision.reason,
                "device": str(device), "threads": torch.get_num_threads(),
                "cpu": cpu_model_name(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "encoder_box_px": config.model.encoder_input_box(data.box_px),
            })
        encoder = _build_encoder(config, data.box_px, device, precision.dtype)
        encoder_opt = _adam(encoder.parameters(), config.optim.encoder_lr)
        if precision.needs_grad_scaler:
            scaler = torch.amp.GradScaler(device.type)
    decoder_opt = _adam(volume.parameters(), config.optim.decoder_lr)
    pose_table = None
    epochs_done = 0
    elapsed_before = 0.0
    search_stopped_after: int | None = None  # the global search's early stop (train/schedule)
    # schedule.switch_poses = last_epoch: the winners as trained on in the last stage-1 epoch
    record: BestPoses | None = None

    if state is not None:
        stage, epochs_done = state["stage"], int(state["epoch"])
        volume.load_state_dict(state["volume"])
        if stage == AUTOENCODE:
            encoder.load_state_dict(state["encoder"])
            encoder_opt.load_state_dict(state["optimizers"]["encoder"])
            if scaler is not None and "grad_scaler" in state["optimizers"]:
                scaler.load_state_dict(state["optimizers"]["grad_scaler"])
            decoder_opt.load_state_dict(state["optimizers"]["decoder"])
        else:
            encoder = encoder_opt = None
            pose_table = _restore_pose_table(config, state["pose_table"], device)
            decoder_opt = _adam(volume.parameters(), config.optim.decoder_lr_after_switch)
            decoder_opt.load_state_dict(state["optimizers"]["decoder"])
        restore_rng_state(state["rng"], generator)
        elapsed_before = float(state.get("extra", {}).get("elapsed_s", 0.0))
        search_stopped_after = state.get("extra", {}).get("search_stopped_after")  # old: None
        if state.get("switch_record") is not None:  # stopped at the switch: its poses
            record = BestPoses.from_state_dict(state["switch_record"], device)
        if main:
            truncate_metrics(files.metrics, epochs_done)
        logger.info("resuming %s after epoch %d (%s)", files.dir, epochs_done, stage)
        del state
    # the encoder as trained: in DDP when distributed (checkpoints save `encoder` itself)
    train_encoder = None if encoder is None or shard is None else wrap_encoder(encoder, device)
    # pose_track.npz (resume: entries after the checkpoint's epoch are dropped)
    tracker = None if not main else PoseTracker.start(
        files.dir, num_particles=len(data), num_heads=config.model.num_heads,
        count=config.run.track_particles, seed=config.run.seed, last_epoch=epochs_done,
    )

    n = len(data)
    end = final_epoch(config.schedule, search_stopped_after)  # E, less after an early stop
    last = end if stop_after is None else min(end, max(stop_after, epochs_done))
    # progress: the epochs' phases and the images/s measured so far (resume: earlier epochs)
    plan = RunPlan.from_schedule(config.schedule, switch_epoch=K,
                                 search_stopped_after=search_stopped_after, last_epoch=last)
    totals = phase_totals(read_metrics(files.metrics), plan) if main else {}
    # distributed: rank 0 reports its own images, the display counts every rank's
    scale = 1.0 if shard is None else n / max(int(shard.owned(n).numel()), 1)
    progress: PassProgress | None = None
    t_start = time.perf_counter()
    try:
        for epoch in range(epochs_done + 1, last + 1):
            if epoch > last:  # the global search stopped early: the run ends sooner
                break
            switch_info: dict[str, Any] = {}
            search_stop: dict[str, Any] = {}
            # -------------------------------------------------------- the switch
            if stage == AUTOENCODE and epoch > K:
                pose_table, switch_info = _switch(config, encoder, volume, data, shard,
                                                  feedback, record=record)
                record = None
                encoder = encoder_opt = train_encoder = scaler = None
                decoder_opt = _adam(volume.parameters(), config.optim.decoder_lr_after_switch)
                stage = AUTODECODE
                return_free_memory()  # the encoder and its optimiser are gone

            cut = (stage1_batches(config.schedule, epoch, per_epoch) if stage == AUTOENCODE
                   else None)  # the step budget's last stage-1 epoch: its remainder
            images = n if cut is None else min(n, cut * config.optim.batch_size)
            progress = _epoch_progress(feedback, plan, totals, epoch, end, images, scale)
            tick = progress.update
            t0 = time.perf_counter()
            # -------------------------------------------------------- stage 1 / stage 2
            if stage == AUTOENCODE:
                if epoch == K < E and config.schedule.switch_poses == "last_epoch":
                    record = BestPoses.empty(n, config.model.predict_shifts, data.device)
                stats = autoencode_epoch(
                    encoder if train_encoder is None else train_encoder, volume, data,
                    encoder_opt, decoder_opt,
                    batch_size=config.optim.batch_size, generator=generator, epoch=epoch,
                    progress=tick, loss_radius=_radius_schedule(config, data, epoch),
                    lowpass_input=config.model.encoder_lowpass, shard=shard,
                    grad_scaler=scaler, record=record if epoch == K else None,
                    max_batches=cut,
                )
            else:
                for group in decoder_opt.param_groups:
                    group["lr"] = stage2_decoder_lr(config, epoch, search_stopped_after)
                pose_table.lr_rot, pose_table.lr_shift = stage2_pose_lrs(
                    config, epoch, search_stopped_after)
                search = (_rotation_search(config, data, epoch - K)
                          if is_search_epoch(config.schedule, epoch, search_stopped_after)
                          else None)
                stats = autodecode_epoch(
                    volume, pose_table, data, decoder_opt,
                    batch_size=config.optim.batch_size,
                    pose_steps=config.optim.pose_steps_per_batch,
                    refine_shifts=config.model.predict_shifts,
                    generator=generator, epoch=epoch, progress=tick, search=search,
                    shard=shard, anchor_frame=config.optim.anchor_pose_frame,
                )
                # the search is done when few particles still jump (same on every rank)
                if (search is not None and search_stopped_after is None
                        and search_stops(config.schedule, epoch, stats.jump_fraction)):
                    search_stopped_after = epoch
                    end = final_epoch(config.schedule, search_stopped_after)
                    last = min(last, end)
                    plan = RunPlan.from_schedule(config.schedule, switch_epoch=K,
                                                 search_stopped_after=epoch, last_epoch=last)
                    search_stop = _search_stop_record(config, epoch, stats, end)
            wall = time.perf_counter() - t0
            progress.close()
            totals = add_sample(totals, plan.phase(epoch), stats.num_images, wall)
            elapsed = elapsed_before + (time.perf_counter() - t_start)
            # the full pose table (distributed: every rank's rows, gathered to rank 0)
            full_table = _full_pose_table(pose_table, shard)
            full_record = _full_record(record, shard) if stage == AUTOENCODE else None
            if tracker is not None:  # before the checkpoint; draws no random numbers
                radius = _radius_schedule(config, data, epoch) if pose_table is None else None
                tracker.record(
                    epoch, encoder=encoder, volume=volume, data=data.unsharded(),
                    pose_table=full_table,
                    batch_size=config.run.inference_batch_size,
                    loss_radius_px=None if radius is None
                    else radius(num_batches(n, config.optim.batch_size)),
                    lowpass_input=config.model.encoder_lowpass,
                )
            if main:
                _end_of_epoch(
                    files, config, data, volume, encoder, full_table, encoder_opt,
                    decoder_opt, generator, grad_scaler=scaler,
                    epoch=epoch, stage=stage, stats=stats, wall_s=wall,
                    elapsed_s=elapsed, switch_info=switch_info,
                    search_stopped_after=search_stopped_after, search_stop=search_stop,
                    switch_record=full_record, saved_config=given,
                )
            epochs_done = epoch
            logger.info(
                "epoch %d/%d %s: loss %.6g, %.1f images/s%s%s", epoch, end, stage, stats.loss,
                stats.num_images / wall if wall > 0 else float("nan"),
                f", pose change {stats.mean_pose_change_deg:.3g} deg"
                if stats.mean_pose_change_deg is not None else "",
                f", {100 * stats.jump_fraction:.1f} % jumped > {JUMP_THRESHOLD_DEG:g} deg"
                if stats.jump_fraction is not None else "",
            )
            if search_stop:
                _log_search_stop(search_stop["search_stop"])
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (cryospin.cli.main's handler)
        raise TrainingInterrupted(files.dir, epochs_done,
                                  terminated=isinstance(exc, Terminated)) from None
    except OutputError as exc:  # disk full, file-size limit, folder gone: keep the checkpoint
        raise OutputError(f"{exc}; {_resume_hint(files.dir, epochs_done)}") from None
    finally:
        if progress is not None:
            progress.close()

    if epochs_done < end:
        return FitResult(files.dir, epochs_done, stage, finished=False)

    # ------------------------------------------------------------------ final outputs
    pose_table = _full_pose_table(pose_table, shard)  # distributed: rank 0 writes the outputs
    if not main:
        return FitResult(files.dir, epochs_done, stage, finished=True)
    if pose_table is not None:
        rotations, shifts = pose_table.gather(torch.arange(n, device=device))
        shifts_out = shifts if config.model.predict_shifts else None
    else:
        with feedback.start("final poses: inference pass", n) as progress:
            best = infer_best_poses(  # rank 0: every particle (sharded data read them lazily)
                encoder, volume, data.unsharded(), batch_size=config.run.inference_batch_size,
                loss_radius_px=_final_stage1_radius(config, data),
                lowpass_input=config.model.encoder_lowpass, progress=progress.update,
            )
        rotations, shifts_out = best.rotations, best.shifts_px
    rotations = rotations.detach().cpu()
    shifts_out = None if shifts_out is None else shifts_out.detach().cpu()
    try:
        _write_final(files, config, particles, data, volume, rotations, shifts_out,
                     feedback=feedback)
    except OutputError as exc:  # every epoch is checkpointed: --resume writes these again
        raise OutputError(f"{exc}; {_resume_hint(files.dir, epochs_done)}") from None
    return FitResult(
        files.dir, epochs_done, stage, finished=True, rotations=rotations, shifts_px=shifts_out,
        map_path=files.map, star_path=files.star, pkl_path=files.pkl,
    )


def _resume_hint(run_dir: Path, epochs_done: int) -> str:
    """What to do after a failed epoch write (the last complete checkpoint is intact)."""
    if not epochs_done:
        return f"no epoch completed; fix this and run: cryospin reconstruct --resume {run_dir}"
    return (f"the last complete epoch is {epochs_done}; fix this and continue with: "
            f"cryospin reconstruct --resume {run_dir}")


def _radius_schedule(
    config: Config, data: TrainingData, epoch: int
) -> Any:
    """``b -> loss radius`` of batch ``b`` of stage-1 epoch ``epoch`` (None: no marching)."""
    s = config.schedule
    if s.loss_radius_start_px is None:
        return None
    full = float(data.box_px // 2 - 1 if config.data.loss_radius_px is None
                 else config.data.loss_radius_px)
    end = full if s.loss_radius_end_px is None else min(float(s.loss_radius_end_px), full)
    start = min(float(s.loss_radius_start_px), end)
    per_epoch = num_batches(len(data), config.optim.batch_size)
    total = s.switch_steps if s.switch_steps is not None else max(s.switch_epoch, 1) * per_epoch

    def radius(b: int) -> float | None:
        return stage1_loss_radius((epoch - 1) * per_epoch + b - 1, total, start, end)

    return radius


def _stage2_decay(config: Config, epoch: int, start: float, final: float | None,
                  search_stopped_after: int | None) -> float:
    """``start`` up to the last search epoch, then geometric decay to ``final`` (None: constant)
    reached at the last epoch (both earlier after an early stop of the search:
    :func:`cryospin.train.schedule.decay_fraction`)."""
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


def _search_stop_record(config: Config, epoch: int, stats: EpochStats,
                        end: int) -> dict[str, Any]:
    """The ``metrics.jsonl`` record (``extra``) of the global search's early stop after
    ``epoch``, the run now ending at ``end``."""
    return {"search_stop": {"after_epoch": epoch,
                            "jump_fraction": float(stats.jump_fraction or 0.0),
                            "threshold_deg": JUMP_THRESHOLD_DEG,
                            "stop_fraction": config.schedule.search_stop_fraction,
                            "local_epochs": end - epoch}}


def _log_search_stop(record: dict[str, Any]) -> None:
    """One INFO line for a :func:`_search_stop_record`."""
    logger.info("global search done after epoch %d: %.1f %% of particles jumped > %g deg "
                "(< %g %%); %d local epochs follow", record["after_epoch"],
                100 * record["jump_fraction"], record["threshold_deg"],
                100 * record["stop_fraction"], record["local_epochs"])


def _rotation_search(config: Config, data: TrainingData, stage2_epoch: int) -> Any:
    """The global search of stage-2 epoch ``stage2_epoch`` (1-based), or None."""
    count = config.schedule.search_epochs
    if stage2_epoch > count:
        return None
    o = config.optim
    start = o.search_radius_px
    end = start if o.search_radius_end_px is None else o.search_radius_end_px
    radius = start + (end - start) * (stage2_epoch - 1) / max(count - 1, 1)
    radius = min(radius, float(data.frequencies.norm(dim=-1).max()))
    shifts = None
    if config.model.predict_shifts and o.search_shift_step_px is not None:
        from cryospin.train.autodecode import shift_grid

        shifts = shift_grid(config.model.max_shift_px, o.search_shift_step_px)
    return RotationSearch.build(data, o.search_rotations, radius, shifts_px=shifts)


def _final_stage1_radius(config: Config, data: TrainingData) -> float | None:
    """Loss radius of the last stage-1 step (used by the inference pass at the switch)."""
    s = config.schedule
    schedule = _radius_schedule(config, data, max(s.switch_epoch, 1))
    if schedule is None:
        return None
    per_epoch = num_batches(len(data), config.optim.batch_size)
    return schedule(stage1_batches(s, max(s.switch_epoch, 1), per_epoch) or per_epoch)


def _check_resume_config(config: Config, state: dict[str, Any], path: Path, *,
                         schedule: ScheduleConfig | None = None) -> None:
    """All but the epochs, device, threads, precision, progress and input paths must match the
    checkpoint (a run may move to another machine). ``schedule``: the schedule as run (a step
    budget in epochs), default ``config.schedule``."""
    schedule = config.schedule if schedule is None else schedule
    saved = config_from_dict(state["config"], where=str(path))
    mine, theirs = config_to_dict(config), config_to_dict(saved)
    del mine["input"], theirs["input"]  # the data may have moved
    for section in ("run", "schedule", "model"):
        for key in ("device", "num_threads", "progress", "progress_interval_s", "epochs",
                    "precision"):
            mine[section].pop(key, None)
            theirs[section].pop(key, None)
    if mine != theirs:
        diffs = [
            f"{s}.{k}" for s in mine for k in mine[s] if mine[s][k] != theirs[s].get(k)
        ]
        raise InputError(
            "the configuration differs from the run's checkpoint "
            f"({', '.join(diffs)}); only --epochs, --device, --threads and --precision may "
            "change on resume",
            path,
        )
    stopped = state.get("extra", {}).get("search_stopped_after")
    if int(state["epoch"]) > final_epoch(schedule, stopped):
        raise InputError(
            f"the checkpoint is at epoch {state['epoch']}, beyond --epochs "
            f"{config.schedule.epochs}" + ("" if stopped is None else
                                         f" (last epoch {final_epoch(schedule, stopped)}"
                                         f": the global search stopped after epoch {stopped})"),
            path,
        )


def _restore_pose_table(config: Config, pose_state: dict[str, Any], device: torch.device) -> Any:
    from cryospin.pose import PoseTable

    table = PoseTable.from_state_dict(pose_state).to(device)
    return table


def _switch(
    config: Config, encoder: Any, volume: Any, data: TrainingData, shard: Shard | None = None,
    feedback: Feedback | None = None, *, record: BestPoses | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The switch: best head of every particle -> pose table (distributed: of this rank's
    particles, into the rows it owns; head usage and loss over all ranks). ``feedback`` shows
    the inference pass's progress. With ``record`` (the last stage-1 epoch's winners,
    ``schedule.switch_poses = last_epoch``) there is no inference pass."""
    from cryospin.losses import head_usage

    t0 = time.perf_counter()
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
                    loss_radius_px=_final_stage1_radius(config, data),
                    lowpass_input=config.model.encoder_lowpass, indices=rows.cpu(),
                    progress=progress.update,
                )
            best.write(missing, fill.rotations, fill.shifts_px, fill.best_head, fill.loss)
    else:
        with (feedback or Feedback()).start("switch: inference pass", len(data),
                                            scale=len(data) / max(count, 1)) as progress:
            best = infer_best_poses(
                encoder, volume, data, batch_size=config.run.inference_batch_size,
                loss_radius_px=_final_stage1_radius(config, data),
                lowpass_input=config.model.encoder_lowpass, indices=owned,
                progress=progress.update,
            )
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
    table = _build_pose_table(config, rotations, shifts)
    usage = usage_t.tolist()
    info = {
        "switch": {
            "head_usage": usage,
            "mean_loss": mean_loss,
            "wall_time_s": time.perf_counter() - t0,
            "poses": "last_epoch" if record is not None else "inference",
        }
    }
    logger.info("switch to auto-decoding: head usage %s",
                " ".join(f"{u:.2f}" for u in usage))
    return table.to(data.device), info


def _full_record(record: BestPoses | None, shard: Shard | None) -> BestPoses | None:
    """The switch record with every particle's row: ``record`` itself for one process; when
    distributed, gathered to rank 0 (None on the other ranks; collectives on every rank)."""
    if shard is None or record is None:
        return record
    rot, head, loss = (shard.gather_rows(t)
                       for t in (record.rotations, record.best_head, record.loss))
    shifts = None if record.shifts_px is None else shard.gather_rows(record.shifts_px)
    return None if rot is None else BestPoses(rot, shifts, head, loss)


def _full_pose_table(pose_table: Any, shard: Shard | None) -> Any:
    """The pose table with every particle's row: ``pose_table`` itself for one process; when
    distributed, gathered to rank 0 (None on the other ranks; a collective)."""
    if shard is None or pose_table is None:
        return pose_table
    return shard.gather_pose_table(pose_table)


def _end_of_epoch(
    files: RunFiles,
    config: Config,
    data: TrainingData,
    volume: Any,
    encoder: Any,
    pose_table: Any,
    encoder_opt: Any,
    decoder_opt: Any,
    generator: torch.Generator,
    *,
    grad_scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    stage: str,
    stats: EpochStats,
    wall_s: float,
    elapsed_s: float,
    switch_info: dict[str, Any],
    search_stopped_after: int | None = None,
    search_stop: dict[str, Any] | None = None,
    switch_record: BestPoses | None = None,
    saved_config: Config | None = None,
) -> None:
    """map.NNN.mrc, a metrics line, then the checkpoint (the commit point of the epoch).
    ``switch_record``: the last stage-1 epoch's winners (``schedule.switch_poses``);
    ``saved_config``: the configuration as given, for the checkpoint (default ``config``)."""
    from cryospin.io.mrc import write_map

    with torch.no_grad():
        real = volume.to_real_space().detach().cpu()
    if config.run.keep_epoch_maps:
        write_map(files.epoch_map(epoch), real.numpy(), data.pixel_size_angstrom)
    usage = stats.head_usage
    if usage is None and switch_info:
        usage = switch_info["switch"]["head_usage"]
    append_metrics(
        files.metrics,
        EpochMetrics(
            epoch=epoch,
            stage=stage,
            loss=stats.loss,
            num_images=stats.num_images,
            wall_time_s=wall_s,
            images_per_s=stats.num_images / wall_s if wall_s > 0 else float("nan"),
            head_usage=usage,
            head_spread_deg=stats.head_spread_deg,
            mean_pose_change_deg=stats.mean_pose_change_deg,
            mean_shift_change_px=stats.mean_shift_change_px,
            decoder_lr=float(decoder_opt.param_groups[0]["lr"]),
            pose_lr=None if pose_table is None else float(pose_table.lr_rot),
            elapsed_s=elapsed_s,
            jump_fraction=stats.jump_fraction,
            extra={**switch_info, **(search_stop or {})},
        ),
    )
    optimizers = {"decoder": decoder_opt.state_dict()}
    if encoder_opt is not None:
        optimizers["encoder"] = encoder_opt.state_dict()
    if grad_scaler is not None:
        optimizers["grad_scaler"] = grad_scaler.state_dict()
    save_checkpoint(
        files.checkpoint,
        {
            "cryospin_version": __version__,
            "config": config_to_dict(config if saved_config is None else saved_config),
            "stage": stage,
            "epoch": epoch,
            "volume": volume.state_dict(),
            "encoder": None if encoder is None else encoder.state_dict(),
            "pose_table": None if pose_table is None else pose_table.state_dict(),
            "optimizers": optimizers,
            "rng": capture_rng_state(generator),
            "data": data.summary(),
            "extra": {"elapsed_s": elapsed_s, "search_stopped_after": search_stopped_after},
            "switch_record": None if switch_record is None else switch_record.state_dict(),
        },
    )


def _write_final(
    files: RunFiles,
    config: Config,
    particles: Any,
    data: TrainingData,
    volume: Any,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None,
    *,
    feedback: Feedback | None = None,
) -> None:
    from cryospin.evaluate.convergence import record_convergence_check
    from cryospin.io.cs import write_cryosparc
    from cryospin.io.mrc import write_map
    from cryospin.io.particles import write_cryodrgn_poses, write_particles_star

    with torch.no_grad():
        real = volume.to_real_space().detach().cpu()
    if config.run.final_map == "backprojection":
        write_map(files.map_decoder, real.numpy(), data.pixel_size_angstrom)
        trained = real
        with (feedback or Feedback()).start("final map: backprojection",
                                            rotations.shape[0]) as progress:
            real = final_backprojection(particles, data, rotations, shifts_px,
                                        seed=config.run.seed, on_batch=progress.update)
        # logged and written as a convergence check, never as a resolution (use --halves)
        record_convergence_check(files.convergence, real, trained,
                                 pixel_size_angstrom=data.pixel_size_angstrom,
                                 final_name=files.map.name, trained_name=files.map_decoder.name)
    write_map(files.map, real.numpy(), data.pixel_size_angstrom)
    shifts = shifts_px if shifts_px is not None else torch.zeros(rotations.shape[0], 2)
    # shifts in the ORIGINAL particles' pixels (training pixels are L/box_px times larger)
    shifts = shifts * (int(particles.box_px) / data.box_px)
    final = particles.with_poses(rotations, shifts)
    write_particles_star(files.star, final, relative_to=config.input.relative_to)
    write_cryodrgn_poses(files.pkl, rotations, shifts, int(particles.box_px))
    if final.cs_table is not None:  # a .cs input: its rows with the new poses
        write_cryosparc(files.cs, final)
    logger.info("wrote %s, %s and %s", files.map, files.star, files.pkl)


class _TrainingImages:
    """The images as trained on (cropped, normalised, contrast-corrected; not the encoder's
    input mask) as an ``.images(idx)`` source, read from ``data.source``."""

    def __init__(self, data: TrainingData) -> None:
        self.source = data.source
        self.scale = float(data.image_scale)
        self.box_px = data.box_px

    def images(self, indices: Any) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.source.images(idx).to(torch.float64) * self.scale


def final_backprojection(
    particles: Any,
    data: TrainingData,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None,
    *,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The final map: Wiener backprojection of the training images from the final poses.

    Parameters
    ----------
    particles : ParticleSet
        The particles (CTF parameters when ``data.source`` has none).
    data : TrainingData
        The images exactly as trained on (``data.source``: cropped, normalised,
        contrast-corrected by ``data.image_scale``).
    rotations : `(N, 3, 3)`
        Final poses (cryospin convention).
    shifts_px : `(N, 2)` or None
        Final shifts ``(tx, ty)`` in the training frame's pixels.
    seed : int
        Seed of the half-set split that estimates the Wiener filter's SNR.
    on_batch : callable, optional
        Called after each batch of the backprojection with its number of images.

    Returns
    -------
    `(L, L, L)` float32 real-space map (same arbitrary scale as the training images).

    Notes
    -----
    The Wiener term comes from the FSC between two half sets of this one backprojection;
    the poses were refined against a common reference, so that FSC is not a gold-standard
    resolution estimate (use ``--halves`` for one) and is not reported.
    """
    from cryospin.backproject import backproject

    source = data.source if data.source is not None else particles
    ctf = source.ctf if (data.use_ctf and source.ctf is not None) else None
    result = backproject(
        _TrainingImages(data), rotations.detach().cpu().double(),
        None if shifts_px is None else shifts_px.detach().cpu().double(), ctf,
        box_px=data.box_px, pixel_size_angstrom=data.pixel_size_angstrom, seed=seed,
        on_batch=on_batch,
    )
    logger.info("final map: Wiener backprojection of %d images from the final poses",
                rotations.shape[0])
    return result.volume.float()
