"""``cryospin reconstruct``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.reconstruct`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from cryospin.cli._choice import format_table
from cryospin.errors import CryospinError, InputError
from cryospin.io.particle_set import ParticleSet
from cryospin.io.particles import load_particles
from cryospin.preprocess import sample_contrast
from cryospin.report import write_halves_report, write_report
from cryospin.rundir import RESUMABLE_OPTIONS, RunFiles, StartsFiles, prepare_run_dir
from cryospin.sources import ImageSource
from cryospin.train.autodecode import local_refine_radius
from cryospin.train.config import Config, build_config, load_config
from cryospin.train.distributed import world_from_env
from cryospin.train.fit import TrainingInterrupted, fit
from cryospin.train.halves import fit_halves, format_summary, is_halves_run
from cryospin.train.runlog import RUN_LOG, header_line, note, run_log
from cryospin.train.starts import fit_starts, is_starts_run, starts_of

__all__ = ["main"]

log = logging.getLogger(__name__)

# Above this box (px) without --box, `reconstruct` advises a Fourier crop (:func:`_advise_box`).
ADVISED_BOX_PX = 128

# flag dest -> (config section, field); None values mean "not given"
_OVERRIDES = {
    "heads": ("model", "num_heads"),
    "width": ("model", "width_multiplier"),
    "shifts": ("model", "predict_shifts"),
    "empty_class": ("model", "empty_class"),
    "junk_class": ("model", "junk_class"),
    "max_shift_px": ("model", "max_shift_px"),
    "epochs": ("schedule", "epochs"),
    "switch_epoch": ("schedule", "switch_epoch"),
    "switch_steps": ("schedule", "switch_steps"),
    "head": ("model", "head"),
    "encoder_input": ("model", "encoder_input"),
    "pooling": ("model", "pooling"),
    "symmetry": ("model", "symmetry"),
    "relax_symmetry": ("model", "relax_symmetry"),
    "impose_symmetry": ("schedule", "impose_symmetry"),
    "method": ("schedule", "method"),
    "batch_size": ("optim", "batch_size"),
    "encoder_lr": ("optim", "encoder_lr"),
    "encoder_lr_final": ("optim", "encoder_lr_final"),
    "encoder_lr_decay_start": ("optim", "encoder_lr_decay_start"),
    "decoder_lr": ("optim", "decoder_lr"),
    "decoder_lr_after_switch": ("optim", "decoder_lr_after_switch"),
    "pose_lr": ("optim", "pose_lr"),
    "shift_lr": ("optim", "shift_lr"),
    "decoder_lr_final": ("optim", "decoder_lr_final"),
    "pose_lr_final": ("optim", "pose_lr_final"),
    "anchor_pose_frame": ("optim", "anchor_pose_frame"),
    "search_epochs": ("schedule", "search_epochs"),
    "switch_poses": ("schedule", "switch_poses"),
    "switch_hypotheses": ("optim", "switch_hypotheses"),
    "switch_refine_steps": ("optim", "switch_refine_steps"),
    "switch_refine_radius": ("optim", "switch_refine_radius_px"),
    "search_min_epochs": ("schedule", "search_min_epochs"),
    "search_stop_fraction": ("schedule", "search_stop_fraction"),
    "search_plateau_fraction": ("schedule", "search_plateau_fraction"),
    "search_settled_nats": ("schedule", "search_settled_nats"),
    "search_rotations": ("optim", "search_rotations"),
    "search_candidates": ("optim", "search_candidates"),
    "search_polish_sweeps": ("optim", "search_polish_sweeps"),
    "rebackproject_after_search": ("optim", "rebackproject_after_search"),
    "rebackproject_during_search": ("optim", "rebackproject_during_search"),
    "copy_consensus": ("optim", "copy_consensus"),
    "search_radius": ("optim", "search_radius_px"),
    "search_radius_symmetric": ("optim", "search_radius_symmetric_px"),
    "search_refine_radius": ("optim", "search_refine_radius_px"),
    "local_refine_resolution": ("optim", "local_refine_resolution_angstrom"),
    "search_shift_step": ("optim", "search_shift_step_px"),
    "loss_radius_start": ("schedule", "loss_radius_start_px"),
    "loss_radius_end": ("schedule", "loss_radius_end_px"),
    "encoder_lowpass": ("model", "encoder_lowpass"),
    "invert_contrast": ("data", "invert_contrast"),
    "no_ctf": ("data", "no_ctf"),
    "max_memory": ("data", "max_memory_gb"),
    "cache_dir": ("data", "cache_dir"),
    "box": ("data", "box_px"),
    "normalize": ("data", "normalize"),
    "mask_radius": ("data", "mask_radius_fraction"),
    "mask_edge": ("data", "mask_edge_px"),
    "whiten_noise": ("data", "whiten_noise"),
    "device": ("run", "device"),
    "seed": ("run", "seed"),
    "threads": ("run", "num_threads"),
    "final_map": ("run", "final_map"),
    "precision": ("model", "precision"),
    "encoder_box": ("model", "encoder_box_px"),
    "progress_interval": ("run", "progress_interval_s"),
}
# flags in Å, converted with the particles' pixel size once they are read (_in_pixels):
# flag dest -> (the flag in cycles per box / as a fraction it replaces, its config field)
_ANGSTROM = {
    "mask_diameter": ("mask_radius", ("data", "mask_radius_fraction")),
    "search_resolution": ("search_radius", ("optim", "search_radius_px")),
    "search_refine_resolution": ("search_refine_radius", ("optim", "search_refine_radius_px")),
    "loss_resolution_start": ("loss_radius_start", ("schedule", "loss_radius_start_px")),
    "loss_resolution_end": ("loss_radius_end", ("schedule", "loss_radius_end_px")),
}
# the flag of each configuration field a flag sets ("optim.search_radius_px" -> "--search-radius")
_FLAG_OF_FIELD = {f"{s}.{k}": "--" + d.replace("_", "-") for d, (s, k) in _OVERRIDES.items()}


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    for dest, (plain, _) in _ANGSTROM.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag, other = "--" + dest.replace("_", "-"), "--" + plain.replace("_", "-")
        if getattr(args, plain) is not None:
            raise InputError(f"give {flag} or {other}, not both")
        if not 0 < value < float("inf"):
            raise InputError(f"{flag} must be a positive number of Å, got {value:g}")
    out: dict[str, dict[str, object]] = {}
    for dest, (section, key) in _OVERRIDES.items():
        out.setdefault(section, {})[key] = getattr(args, dest)
    if args.no_bf16:
        if args.precision not in (None, "fp32"):
            raise InputError(f"--no-bf16 contradicts --precision {args.precision}")
        out["model"]["precision"] = "fp32"
    if args.no_progress:
        out.setdefault("run", {})["progress"] = False
    return out


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def refused_on_resume(args: argparse.Namespace) -> list[str]:
    """The flags given in ``args`` that ``--resume`` refuses: those whose configuration field
    is not in :data:`cryospin.rundir.RESUMABLE_OPTIONS` (the trainer's list too), the Å flags
    and ``--optics-group`` (they select other particles or set other fields)."""
    given = [d for d in (*_OVERRIDES, *_ANGSTROM, "optics_group") if getattr(args, d) is not None]
    return sorted("--" + d.replace("_", "-") for d in given
                  if ".".join(_OVERRIDES.get(d, ("input", d))) not in RESUMABLE_OPTIONS)


def main(args: argparse.Namespace) -> int:
    """Run ``cryospin reconstruct``; returns the exit status (130 on Ctrl-C, 143 on SIGTERM)."""
    halves = args.halves or bool(args.resume and is_halves_run(args.resume))
    starts = _starts_requested(args, halves)
    if args.max_starts is not None and not halves:
        raise InputError("--max-starts is for --halves (how many starts a half that fits "
                         "its images clearly worse may get)")
    if args.max_starts is not None and args.max_starts < 1:
        raise InputError(f"--max-starts must be at least 1, got {args.max_starts}")
    created = False  # whether this command made the run folder
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise InputError("--resume continues in its own folder; drop -o or make them equal")
        refused = refused_on_resume(args)
        if refused:
            raise InputError(f"with --resume only --epochs, --device, --threads, --precision, "
                             f"--final-map and the progress display may change (got "
                             f"{', '.join(refused)})")
        if not halves and starts is None:
            prepare_run_dir(run_dir, resume=True)
        config = load_config(RunFiles(run_dir).config)
        # the flags' values (argparse: untyped; Config checks them)
        run: dict[str, Any] = {k: v for k, v in _overrides(args)["run"].items() if v is not None}
        precision: Any = _overrides(args)["model"]["precision"] or config.model.precision
        epochs = args.epochs or config.schedule.epochs
        config = dataclasses.replace(
            config,
            schedule=dataclasses.replace(config.schedule, epochs=epochs),
            run=dataclasses.replace(config.run, **run),
            model=dataclasses.replace(config.model, precision=precision),
        )
        if args.particles:  # the data moved: read it from the new place
            moved = dataclasses.replace(
                config.input, particles=_abs(args.particles),
                ctf=_abs(args.ctf) or config.input.ctf,
                datadir=_abs(args.datadir) or config.input.datadir,
            )
            config = dataclasses.replace(config, input=moved)
        if args.relative_to:  # only changes what the end writes
            config = dataclasses.replace(config, input=dataclasses.replace(
                config.input, relative_to=_abs(args.relative_to)))
    else:
        if not args.particles or not args.out:
            raise InputError("give PARTICLES and -o RUN_DIR (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        overrides = _overrides(args)
        overrides["input"] = {"particles": _abs(args.particles), "ctf": _abs(args.ctf),
                              "ind": _abs(args.ind), "datadir": _abs(args.datadir),
                              "relative_to": _abs(args.relative_to),
                              "optics_group": args.optics_group}
        overrides.setdefault("data", {})["cache_dir"] = _abs(args.cache_dir)
        with _errors_name_flags():
            config = build_config(args.preset, overrides)
        created = not run_dir.exists()
        prepare_run_dir(run_dir, resume=False)  # unwritable or used folder: fail before reading

    if config.input.particles is None:
        raise InputError("the run's config.yaml names no particles", RunFiles(run_dir).config)
    log = (run_log(run_dir / RUN_LOG, header=header_line(getattr(args, "argv", None),
                                                          resumed=bool(args.resume)))
           if world_from_env().is_main else contextlib.nullcontext())
    try:
        with log:
            return _train(config, run_dir, halves, starts, args)
    except CryospinError:
        if created:  # failed before writing anything: leave no folder
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty
        raise


@contextlib.contextmanager
def _errors_name_flags() -> Iterator[None]:
    """Re-raise a configuration error with the flags a user gives instead of the fields
    (``invalid configuration: optim.search_radius_px ...`` -> ``--search-radius ...``)."""
    try:
        yield
    except InputError as exc:
        text = str(exc)
        named = re.sub(r"\b(?:model|optim|schedule|data|run)\.\w+\b",
                       lambda m: _FLAG_OF_FIELD.get(m.group(0), m.group(0)), text)
        if named == text:
            raise
        for prefix in ("command line: ", "invalid configuration: "):
            named = named.removeprefix(prefix)
        raise InputError(named) from None


def _in_pixels(config: Config, particles: ParticleSet, args: argparse.Namespace) -> Config:
    """``config`` with the Å flags (``_ANGSTROM``) converted with the particles' box and pixel
    size: a diameter ``D`` is the radius fraction ``D / (L·apix)``, a resolution ``A`` the
    radius ``L·apix / A`` cycles per box (the same before and after ``--box``)."""
    given: dict[str, float] = {d: v for d in _ANGSTROM if (v := getattr(args, d, None)) is not None}
    if not given:
        return config
    L, apix = int(particles.box_px), float(particles.pixel_size_angstrom)
    if not apix > 0:
        names = " and ".join("--" + d.replace("_", "-") for d in given)
        raise InputError(f"{names} need the pixel size, which the particles do not give; use "
                         f"the flags in cycles per box or fractions instead", particles.source)
    extent = L * apix  # Å
    train_box = config.data.box_px or L
    k_max = train_box // 2 - 1  # the loss disc, cycles per box
    sections: dict[str, dict[str, float]] = {}
    for dest, value in given.items():
        flag = "--" + dest.replace("_", "-")
        section, key = _ANGSTROM[dest][1]
        if dest == "mask_diameter":
            converted = value / extent
            if converted > 1:
                raise InputError(f"{flag} {value:g} Å is wider than the box ({L} px × "
                                 f"{apix:g} Å = {extent:.4g} Å)")
            log.info("%s %g Å = mask radius %.3g of half the box", flag, value, converted)
        else:
            converted = extent / value
            if converted < 1:
                raise InputError(f"{flag} {value:g} Å is coarser than the box itself "
                                 f"({extent:.4g} Å, 1 cycle per box)")
            if converted > k_max:
                raise InputError(f"{flag} {value:g} Å is finer than the training images resolve "
                                 f"({extent / k_max:.3g} Å at {train_box} px of "
                                 f"{extent / train_box:.3g} Å)")
            log.info("%s %g Å = %.3g cycles per box", flag, value, converted)
        sections.setdefault(section, {})[key] = converted
    with _errors_name_flags():
        return dataclasses.replace(config, **{
            s: dataclasses.replace(getattr(config, s), **fields) for s, fields in sections.items()
        })


def _say(text: str, *, file: TextIO | None = None) -> None:
    """Print ``text`` (stdout, or ``file``) and add it to the run log."""
    print(text, file=file)
    note(text)


def _starts_requested(args: argparse.Namespace, halves: bool) -> int | None:
    """The number of starts of a ``--starts`` run (new or resumed), None for a plain run
    (``--starts 1``: a plain run); for a ``--halves`` run, the ``--starts`` given (the starts
    of each half; None: the run's on resume, else 1)."""
    if args.starts is not None and args.starts < 1:
        raise InputError(f"--starts must be at least 1, got {args.starts}")
    if halves:  # fit_halves refuses a --starts other than the run's on resume
        return args.starts
    resumed = bool(args.resume) and is_starts_run(args.resume)
    if args.resume and not resumed:
        if args.starts not in (None, 1):
            raise InputError("--starts cannot be added on --resume: this is not a --starts "
                             "run", args.resume)
        return None
    if resumed:  # fit_starts refuses a --starts other than the run's
        return int(args.starts) if args.starts is not None else starts_of(args.resume)
    return args.starts if args.starts is not None and args.starts > 1 else None


def _train(config: Config, run_dir: Path, halves: bool, starts: int | None,
           args: argparse.Namespace) -> int:
    """Load the particles, train (``--halves``: both halves and their combination;
    ``--starts``: every start and the choice), say how it ended."""
    assert config.input.particles is not None  # main() refused a config without them
    particles = load_particles(
        config.input.particles, ctf_pkl=config.input.ctf, ind=config.input.ind,
        datadir=config.input.datadir, no_ctf=config.data.no_ctf,
        optics_group=getattr(config.input, "optics_group", None),
    )
    config = _in_pixels(config, particles, args)
    with _errors_name_flags():  # refused before any file is written
        local_refine_radius(config.optim.local_refine_resolution_angstrom,
                            particles.box_px * float(particles.pixel_size_angstrom))
    _warn_contrast(particles, config.data.invert_contrast)
    if not args.resume:
        _advise_box(config, particles)
    world = world_from_env()
    if halves:  # under torchrun every rank trains each run; rank 0 writes and reports
        return _run_halves(config, particles, run_dir, starts, args, main=world.is_main)
    if starts is not None:
        return _run_starts(config, particles, run_dir, starts, args, main=world.is_main)
    try:
        result = fit(config, particles, run_dir, resume=bool(args.resume),
                     argv=getattr(args, "argv", None), stop_after=args.stop_after)
    except TrainingInterrupted as exc:
        _say(f"cryospin reconstruct: {exc}", file=sys.stderr)
        return exc.exit_status
    if not world.is_main:  # distributed: rank 0 reports and writes the report
        return 0
    if not result.finished:
        _say(f"stopped after epoch {result.epochs_completed}; continue with: "
             f"cryospin reconstruct --resume {run_dir}")
        return 0
    _say(f"done: {result.epochs_completed} epochs; map {result.map_path}, "
         f"poses {result.star_path}")
    _write_report(run_dir)
    return 0


def _warn_contrast(particles: ImageSource, invert_contrast: bool) -> None:
    """Log a WARNING when the particles' contrast disagrees with ``--invert-contrast``."""
    check = sample_contrast(particles)
    log.info("contrast check on %d particles: %s (t = %.3g)", check.num_images,
             check.verdict, check.z_score)
    if check.inverted is True and not invert_contrast:
        log.warning("the particles look dark (raw micrograph contrast; t = %.3g over %d "
                    "images): cryospin models bright particles, consider --invert-contrast",
                    check.z_score, check.num_images)
    elif check.inverted is False and invert_contrast:
        log.warning("the particles already look bright (t = %.3g over %d images) but "
                    "--invert-contrast is set: consider dropping it",
                    check.z_score, check.num_images)


def _advise_box(config: Config, particles: ParticleSet) -> None:
    """Log a WARNING when the particles' box exceeds :data:`ADVISED_BOX_PX` and no ``--box``
    was given: each image then costs about ``(L / 128)²`` times as much (slices and loss grow
    with the box's area), and the presets were tuned at 64–128 px."""
    L = int(particles.box_px)
    if config.data.box_px is not None or L <= ADVISED_BOX_PX:
        return
    apix = float(particles.pixel_size_angstrom)
    crop = apix * L / ADVISED_BOX_PX
    at, map_at = ((f" ({apix:.3g} Å/px, Nyquist {2 * apix:.3g} Å)",
                   f"the map at {crop:.3g} Å/px, Nyquist {2 * crop:.3g} Å; ") if apix > 0
                  else ("", ""))
    log.warning("training on the full %d px box%s: each image costs ~%.1f× what it costs at "
                "%d px, and ab initio rarely needs more: consider --box %d (%sposes and "
                "shifts are still written in the particles' frame)", L, at,
                (L / ADVISED_BOX_PX) ** 2, ADVISED_BOX_PX, ADVISED_BOX_PX, map_at)


def _write_report(run_dir: Path, *, halves: bool = False) -> None:
    """The run report (``halves``: of a ``--halves`` run), written at the end; a failure here
    never fails the finished run."""
    try:
        report = (write_halves_report if halves else write_report)(run_dir)
    except (CryospinError, OSError) as exc:
        log.warning("run report not written (%s); try: cryospin report %s", exc, run_dir)
        return
    _say(f"report {report.html_path}")


def _run_halves(config: Config, particles: ParticleSet, run_dir: Path, starts: int | None,
                args: argparse.Namespace, *, main: bool) -> int:
    """``--halves [--starts K] [--max-starts M]``: both halves (each its starts and the
    choice, more starts for a half that fits clearly worse; or one run each), then the
    gold-standard combination, its summary and the report (``main``: rank 0 of a distributed
    job, or the one process)."""
    try:
        result = fit_halves(config, particles, run_dir, resume=bool(args.resume),
                            argv=getattr(args, "argv", None), stop_after=args.stop_after,
                            starts=starts, max_starts=args.max_starts)
    except TrainingInterrupted as exc:
        _say(f"cryospin reconstruct: {exc}", file=sys.stderr)
        return exc.exit_status
    if not main:
        return 0
    _say(format_summary(result))
    if not result.finished:
        _say(f"continue with: cryospin reconstruct --resume {run_dir}")
        return 0
    _write_report(run_dir, halves=True)
    return 0


def _run_starts(config: Config, particles: ParticleSet, run_dir: Path, starts: int,
                args: argparse.Namespace, *, main: bool) -> int:
    """``--starts K``: every start and the choice (:func:`fit_starts`), then each start's
    report (showing the choice) and the table (``main``: rank 0, or the one process)."""
    try:
        result = fit_starts(config, particles, run_dir, starts=starts,
                            resume=bool(args.resume), argv=getattr(args, "argv", None),
                            stop_after=args.stop_after)
    except TrainingInterrupted as exc:
        _say(f"cryospin reconstruct: {exc}", file=sys.stderr)
        return exc.exit_status
    if not main:
        return 0
    if not result.finished or result.chosen is None:
        _say(f"stopped after epoch(s) {', '.join(map(str, result.epochs_completed))} of the "
             f"{starts} starts; continue with: cryospin reconstruct --resume {run_dir}")
        return 0
    outcomes, chosen = result.outcomes, result.chosen
    for outcome in outcomes:  # after the choice: each report shows it
        _write_report(outcome.run_dir)
    _say(format_table(outcomes, chosen, result.agreement))
    files = StartsFiles(run_dir)
    _say(f"done: {starts} starts; the chosen one is {files.chosen} -> "
         f"{outcomes[chosen].run_dir.name} (map {files.chosen / 'map.mrc'}, poses "
         f"{files.chosen / 'poses.star'}); the choice is in {files.choice}")
    return 0
