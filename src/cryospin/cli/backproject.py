"""``cryospin backproject``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.backproject`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from cryospin.backproject import backproject_particles, backprojection_dtype
from cryospin.cpus import available_cpus, default_cpu_threads
from cryospin.errors import InputError
from cryospin.evaluate.fsc import write_fsc_json
from cryospin.io.mrc import write_map
from cryospin.io.particles import load_indices, load_particles
from cryospin.point_group import parse_point_group
from cryospin.runlock import check_output_folder, claim_output_folder, describe_command
from cryospin.train.halves import HalvesFiles, is_halves_run
from cryospin.train.setup import resolve_device


def _with_star_poses(particles, star: Path):
    src = load_particles(star, no_ctf=True, check_finite=False, metadata_only=True,
                         box_px=particles.box_px)
    if src.rotations is None:
        raise InputError("no poses in this file", star)
    if len(src) != len(particles):
        raise InputError(f"{len(src)} poses for {len(particles)} particles", star)
    out = particles.with_poses(src.rotations, src.shifts_px)
    if particles.random_subset is None and src.random_subset is not None:
        out = dataclasses.replace(out, random_subset=src.random_subset)
    return out


#: The one-line warning of :func:`_dependent_halves_warning`.
DEPENDENT_HALVES_WARNING = (
    "these poses were refined on all particles together, so the half maps are not independent "
    "and their FSC overestimates the resolution; for a resolution run `cryospin reconstruct "
    "--halves` (its poses.star, with rlnRandomSubset, backprojects into independent halves)"
)


def _pose_source(args: argparse.Namespace) -> Path | None:
    """The file the poses come from when cryospin or the user refined them: ``--poses``, or
    PARTICLES in a cryospin run folder (``config.yaml`` with ``metrics.jsonl`` or
    ``halves.json``); None for poses of unknown origin (a simulation, an imported star)."""
    if args.poses is not None:
        return Path(args.poses)
    folder = Path(args.particles).parent
    if (folder / "config.yaml").is_file() and any(
            (folder / name).is_file() for name in ("metrics.jsonl", "halves.json")):
        return Path(args.particles)
    return None


def _dependent_halves_warning(pose_file: Path | None, random_subset, half_set) -> str | None:
    """:data:`DEPENDENT_HALVES_WARNING`, unless the poses come from a ``--halves`` run folder
    and the split used is its split: the particles' ``rlnRandomSubset`` (from that run's
    poses.star or the input it shares) and, when it matches in length, its ``half_set.npy``.

    Parameters
    ----------
    pose_file : Path or None
        :func:`_pose_source`; None: no warning (poses of unknown origin).
    random_subset : `(N,)` or None
        The particles' ``rlnRandomSubset`` as backprojected.
    half_set : `(N,)` ints in {1, 2}
        The split the backprojection used.
    """
    if pose_file is None:
        return None
    folder = pose_file.parent
    if is_halves_run(folder) and random_subset is not None:
        used = np.asarray(half_set)
        if np.array_equal(np.asarray(random_subset).astype(np.int64), used):
            try:
                split = np.load(HalvesFiles(folder).half_set, allow_pickle=False)
            except (OSError, ValueError):
                split = None
            if split is None or split.shape != used.shape or np.array_equal(split, used):
                return None
    return DEPENDENT_HALVES_WARNING


def main(args: argparse.Namespace) -> int:
    """Load, backproject, write maps and FSC."""
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.box is not None and (args.box < 8 or args.box % 2):
        raise InputError(f"--box must be even and >= 8, got {args.box}")
    group = parse_point_group(args.symmetry)  # --symmetry: a clear error before any work
    check_output_folder(args.outdir, force=args.force)  # before any work; again when writing
    if args.poses is not None and not args.poses.exists():
        raise InputError("file not found", args.poses)
    pose_pkl = args.poses if args.poses is not None and args.poses.suffix == ".pkl" else None
    particles = load_particles(args.particles, ctf_pkl=args.ctf, poses_pkl=pose_pkl,
                               datadir=args.datadir, no_ctf=args.no_ctf,
                               optics_group=args.optics_group)
    if args.poses is not None and pose_pkl is None:
        particles = _with_star_poses(particles, args.poses)
    if args.ind is not None:
        particles = particles.subset(load_indices(args.ind, len(particles)))
    if args.box is not None and args.box > particles.box_px:
        raise InputError(f"--box {args.box} is larger than the particles' box "
                         f"{particles.box_px} px", args.particles)
    torch.set_num_threads(default_cpu_threads(args.threads, torch.get_num_threads(),
                                              available_cpus()))
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    res = backproject_particles(
        particles, use_ctf=not args.no_ctf, reg=args.reg, wiener=not args.no_wiener,
        seed=args.seed, batch_size=args.batch_size,
        dtype=torch.float32 if args.float32 else backprojection_dtype(device), progress=True,
        device=device,
        box_px=args.box, invert_contrast=args.invert_contrast, symmetry=group.symbol,
    )
    out: Path = args.outdir
    box = int(res.volume.shape[-1])
    apix = particles.pixel_size_angstrom * particles.box_px / box
    dependent = _dependent_halves_warning(_pose_source(args), particles.random_subset,
                                          res.half_set)
    with claim_output_folder(out, force=args.force,
                             command=describe_command(getattr(args, "argv", None))):
        for name, vol in (("map.mrc", res.volume), ("half_A.mrc", res.half_a),
                          ("half_B.mrc", res.half_b)):
            write_map(out / name, vol.detach().cpu().float().numpy(), apix)
        n1 = int((res.half_set == 1).sum())
        write_fsc_json(res.fsc, out / "fsc.json", particles=str(args.particles),
                       n_particles=len(particles), half_sizes=[n1, len(particles) - n1],
                       independent_halves=dependent is None,
                       **({} if dependent is None else {"warning": dependent}),
                       **({} if group.order == 1 else {"symmetry": group.symbol}))
    sym = "" if group.order == 1 else f", symmetry {group.symbol} ({group.order} poses each)"
    where = (f"with {torch.get_num_threads()} threads" if device.type == "cpu"
             else f"on {device.type} (+ {torch.get_num_threads()} CPU threads)")
    print(f"backprojected {len(particles)} particles ({box} px, {apix:g} Å/px{sym}) in "
          f"{time.perf_counter() - t0:.1f} s {where}")
    print(f"  half-map resolution: {res.fsc.resolution(0.5):.2f} Å at FSC 0.5, "
          f"{res.fsc.resolution(0.143):.2f} Å at FSC 0.143")
    print(f"  wrote {out / 'map.mrc'}, half_A.mrc, half_B.mrc, fsc.json")
    if dependent is not None:
        logging.getLogger(__name__).warning("%s", dependent)
    return 0
