"""The setup phase of :func:`cryospin.train.fit.fit`: accept the run, read the data, build or
restore the training state.

* :func:`open_run` — on ``--resume`` the checkpoint, the configuration
  (:func:`check_resume_config`: only :data:`cryospin.rundir.RESUMABLE_OPTIONS` and the input
  section may change) and the particles (:mod:`cryospin.io.identity`) are checked before
  anything is written; then ``config.yaml`` and ``particle_set.json`` record the run;
* :func:`resolve_device` — the device named by ``run.device``;
* :func:`workflow_folder` — a ``--halves`` or ``--starts`` folder created and held (rank 0's
  lock, the process group of a distributed job);
* :func:`load_training_data` — preprocessing and the memory plan (:mod:`cryospin.train.data`,
  :mod:`cryospin.train.memory`);
* :func:`initial_state` — the volume initialised from the data's radial amplitude (averaged
  at every evaluation over ``model.symmetry`` when imposed from the start, else C1 until the
  impose-symmetry step, :func:`cryospin.train.impose.initial_group`), the encoder
  in the chosen arithmetic and the optimisers (:class:`cryospin.train.state.TrainState`), or
  that state restored from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from cryospin.atomic import remove_stale_temporaries
from cryospin.errors import InputError, OutputError
from cryospin.io.identity import (
    ParticleSetIdentity,
    check_same_particles,
    particle_set_identity,
    save_identity,
)
from cryospin.io.particle_set import ParticleSet
from cryospin.rundir import (
    RESUMABLE_OPTIONS,
    Checkpoint,
    HalvesFiles,
    RunFiles,
    Stage,
    StartsFiles,
    read_metrics,
    resume_conflicts,
    search_stopped_after,
    truncate_metrics,
)
from cryospin.runlock import describe_command, folder_lock
from cryospin.train.config import (
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
    process_group,
    world_from_env,
)
from cryospin.train.impose import initial_group
from cryospin.train.memory import plan_and_load
from cryospin.train.precision import cpu_model_name
from cryospin.train.release import return_free_memory
from cryospin.train.runlog import start_run_log
from cryospin.train.schedule import final_epoch, with_step_budget
from cryospin.train.state import TrainState, choose_precision, describe_execution
from cryospin.volume import HartleyVolume

__all__ = [
    "resolve_device",
    "open_run",
    "record_resume",
    "run_status",
    "workflow_folder",
    "check_resume_config",
    "load_training_data",
    "initial_state",
]

logger = logging.getLogger(__name__)


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


def record_resume(files: RunFiles | HalvesFiles | StartsFiles, config: Config,
                  particles: ParticleSet, argv: list[str] | None,
                  identity: ParticleSetIdentity | None) -> None:
    """On resume: append ``argv`` to ``config.yaml``'s resumptions, and record the particle
    set of a folder from before ``particle_set.json`` (``identity`` None: nothing recorded)."""
    first_argv, resumed = read_config_argv(files.config)
    save_config(files.config, config, first_argv, resumed=[*resumed, argv])
    if identity is None:  # a run from before particle_set.json: record it from now on
        logger.warning("%s records no particle set (an older run): cannot check that "
                       "these are its particles", files.dir)
        save_identity(files.particle_set, particle_set_identity(particles))


@contextlib.contextmanager
def workflow_folder(folder: Path, config: Config,
                    argv: list[str] | None) -> Iterator[WorldInfo]:
    """Create and hold the folder of a workflow of several runs (``--halves``, ``--starts``):
    in a distributed job (``torchrun``) every rank joins the process group first
    (:func:`cryospin.train.distributed.process_group`: each run's ``fit`` keeps it), then rank
    0 takes the folder's lock for all ranks (each run inside holds its own too). Yields this
    process's :class:`~cryospin.train.distributed.WorldInfo`: only rank 0 writes.

    Raises
    ------
    OutputError
        The folder cannot be created, or another process holds it.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror})", folder) from None
    world = world_from_env()
    device = device_for_rank(resolve_device(config.run.device), world)
    with process_group(world, device), contextlib.ExitStack() as held:
        if world.is_main:
            held.enter_context(folder_lock(folder, command=describe_command(argv)))
        yield world


def run_status(run_dir: Path, schedule: ScheduleConfig) -> tuple[str, int]:
    """``("new" | "partial" | "finished", epochs done)`` of a run folder that a workflow
    trains in (a ``--halves`` half, a ``--starts`` start): new without a checkpoint, finished
    at ``schedule.epochs`` (or earlier when its global search stopped early) with its map and
    poses written after the last checkpoint."""
    f = RunFiles(run_dir)
    if not f.checkpoint.is_file():
        return "new", 0
    rows = read_metrics(f.metrics)
    done = int(rows[-1].get("epoch", 0)) if rows else 0
    last = final_epoch(schedule, search_stopped_after(rows))
    if (done >= last and f.map.is_file() and f.star.is_file()
            and f.map.stat().st_mtime >= f.checkpoint.stat().st_mtime):
        return "finished", done
    return "partial", done


def open_run(config: Config, particles: ParticleSet, files: RunFiles, *, resume: bool,
              argv: list[str] | None, main: bool) -> tuple[Config, Config, Checkpoint | None]:
    """Accept the run (on resume: the checkpoint, the configuration and the particles are
    checked before anything is written) and record it: ``config.yaml`` and
    ``particle_set.json``. Returns the configuration as given, as run (a stage-1 step budget
    in epochs) and the checkpoint to resume from (None: from epoch 1)."""
    ckpt = Checkpoint.load(files.checkpoint) if resume and files.checkpoint.is_file() else None
    per_epoch = num_batches(len(particles), config.optim.batch_size)
    as_run = dataclasses.replace(config,
                                 schedule=with_step_budget(config.schedule, per_epoch))
    if ckpt is not None:
        check_resume_config(config, ckpt, files.checkpoint, schedule=as_run.schedule)
    identity = check_same_particles(files.particle_set, particles, files.dir) if resume else None
    start_run_log(files.log)  # the run is accepted: run.log is written from here on
    if resume and main:
        for stale in remove_stale_temporaries(files.dir):  # left by a kill during a write
            logger.info("removed %s (left by an interrupted write)", stale.name)
        if ckpt is None:  # killed before the first checkpoint: start again at epoch 1
            logger.warning("%s has no checkpoint yet: starting again from epoch 1", files.dir)
            truncate_metrics(files.metrics, 0)
        record_resume(files, config, particles, argv, identity)
    elif main:
        save_config(files.config, config, argv)
        save_identity(files.particle_set, particle_set_identity(particles))
    return config, as_run, ckpt


def load_training_data(config: Config, particles: ParticleSet, device: torch.device,
                       shard: Shard | None, world: WorldInfo) -> TrainingData:
    """The training images, preprocessed (distributed: each rank reads, preprocesses and holds
    only its particles)."""
    logger.info("preprocessing %d particles (%d px) on %s", len(particles), particles.box_px,
                device)
    data = plan_and_load(config, prepare_data(particles, config.data, device=device,
                                              preload=False), shard=shard)
    return_free_memory()  # the statistics sample and preprocessing temporaries
    _log_noise(config, data)
    if shard is not None and len(data) < world.world_size:
        raise InputError(f"{len(data)} particles cannot be shared by {world.world_size} "
                         "processes")
    return data


def _log_noise(config: Config, data: TrainingData) -> None:
    """One line on the noise model: white, or whitened from the measured spectrum."""
    spectrum = data.noise_spectrum
    if spectrum is None:
        if config.data.whiten_noise:
            logger.info("noise: not whitened (the whitening filter multiplies the CTF, which "
                        "is ignored here)")
        return
    relative = spectrum[1:] / data.noise_variance  # shells 1 .. L/2
    logger.info("noise: whitened; the background's power per frequency shell is %.2f-%.2fx "
                "its mean (shell 1: %.2fx, Nyquist: %.2fx), each frequency weighted by the "
                "inverse", float(relative.min()), float(relative.max()), float(relative[0]),
                float(relative[-1]))


def initial_state(config: Config, files: RunFiles, data: TrainingData, device: torch.device,
                   shard: Shard | None, ckpt: Checkpoint | None, generator: torch.Generator,
                   *, main: bool) -> TrainState:
    """A new training state, or the checkpoint's (``metrics.jsonl`` cut back to its epoch).
    With K = 0 the switch happens before epoch 1: poses from the untrained encoder, or, when a
    global search follows (``schedule.search_only``), random rotations and no encoder at all."""
    init_gen = torch.Generator(device="cpu").manual_seed(config.run.seed + 1)
    volume = HartleyVolume.ab_initio(
        data.box_px, data.radial_amplitude.cpu(), generator=init_gen,
        symmetry=initial_group(config, None if ckpt is None  # older checkpoints: the group
                               else ckpt.volume_symmetry or config.model.symmetry),
    ).to(device)
    stage = Stage.AUTOENCODE if ckpt is None else ckpt.stage
    search_only = config.schedule.search_only
    precision = (choose_precision(config, data.box_px, device, shard)
                 if stage == Stage.AUTOENCODE and not search_only else None)
    logger.info("%s", describe_execution(device, precision))
    if main and (precision is not None or (search_only and ckpt is None)):
        record_resolved(files.config, {
            "device": str(device), "threads": torch.get_num_threads(),
            "cpu": cpu_model_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **({} if precision is None else {
                "precision": precision.name, "precision_reason": precision.reason,
                "encoder_box_px": config.model.encoder_input_box(data.box_px)}),
        })
    state = TrainState.start(config, volume, stage, device, precision, data.box_px)
    if ckpt is not None:
        state.restore(ckpt, config, device, generator)
        if main:
            truncate_metrics(files.metrics, state.epoch)
        logger.info("resuming %s after epoch %d (%s)", files.dir, state.epoch, state.stage)
    return state


def check_resume_config(config: Config, ckpt: Checkpoint, path: Path, *,
                         schedule: ScheduleConfig | None = None) -> None:
    """Only the fields of :data:`cryospin.rundir.RESUMABLE_OPTIONS` and the input section may
    differ from the checkpoint's configuration (a run may move to another machine, its data to
    another folder); the checkpoint's epoch must not lie beyond the run's last. ``schedule``:
    the schedule as run (a step budget in epochs), default ``config.schedule``."""
    schedule = config.schedule if schedule is None else schedule
    saved = config_from_dict(ckpt.config, where=str(path))
    diffs = resume_conflicts(config_to_dict(config), config_to_dict(saved))
    if diffs:
        allowed = ", ".join(sorted(RESUMABLE_OPTIONS))
        raise InputError(
            f"the configuration differs from the run's checkpoint ({', '.join(diffs)}); only "
            f"{allowed} (--epochs, --device, --threads, --precision, --final-map, the "
            "progress display) may change on resume",
            path,
        )
    stopped = ckpt.search_stopped_after
    if ckpt.epoch > final_epoch(schedule, stopped):
        raise InputError(
            f"the checkpoint is at epoch {ckpt.epoch}, beyond --epochs "
            f"{config.schedule.epochs}" + ("" if stopped is None else
                                         f" (last epoch {final_epoch(schedule, stopped)}"
                                         f": the global search stopped after epoch {stopped})"),
            path,
        )
