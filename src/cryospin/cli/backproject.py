"""Reconstruct a map from particles with known poses (Hartley-space backprojection).

Writes OUT_DIR/map.mrc, half_A.mrc, half_B.mrc (voxel size set) and fsc.json (FSC between the
half maps), and prints the half-map resolution. OUT_DIR must be new or empty (--force writes
into one that holds files). Poses come from PARTICLES itself (.star/.cs),
or from --poses: a cryoDRGN pose .pkl, or a .star whose rotations and shifts are used (same
particles, same order). CTF correction uses the particles' CTF or --ctf (cryoDRGN ctf.pkl);
the Wiener term is estimated from the half-map FSC (see cryospin.backproject). Half sets follow
rlnRandomSubset when present, else a random split (--seed).

The half maps are independent only when their poses were refined independently. Poses refined
on all particles together (a plain `cryospin reconstruct` run, most --poses files) make the
halves share the reference's noise and the half-map FSC overestimates the resolution: then a
warning says so and fsc.json records "independent_halves": false. The poses.star of a
`reconstruct --halves` run, whose rlnRandomSubset is the split used, gives independent halves.

Example::

    cryospin backproject sim/particles.star -o bp/
    cryospin backproject particles.mrcs --poses pose.pkl --ctf ctf.pkl -o bp/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cryospin.cli._args import add_out_argument


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin backproject``."""
    parser.add_argument("particles", type=Path, help="particles (.star, .cs, .mrcs or .txt)")
    add_out_argument(parser, dest="outdir", aliases=("--outdir",), type=Path, required=True,
                     metavar="OUT_DIR", help="output folder (new or empty; see --force)")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that already holds files (files of the same "
                             "names are replaced, others kept)")
    parser.add_argument("--poses", type=Path, default=None,
                        help="poses: cryoDRGN pose .pkl or a .star with poses")
    parser.add_argument("--ctf", type=Path, default=None, help="cryoDRGN ctf.pkl")
    parser.add_argument("--no-ctf", action="store_true", help="no CTF correction")
    parser.add_argument("--datadir", type=Path, default=None, help="folder holding the stacks")
    parser.add_argument("--optics-group", default=None, metavar="N|NAME",
                        help="only this optics group of a .star (rlnOpticsGroup number or "
                             "name); --poses and --ind then describe the group's particles")
    parser.add_argument("--ind", type=Path, default=None, help="particle indices to use (.pkl)")
    parser.add_argument("--box", type=int, default=None, metavar="N",
                        help="Fourier-crop the images to N px as they are read (even, <= the "
                             "particles' box): an N³ map at the pixel size × L/N")
    parser.add_argument("--invert-contrast", action="store_true",
                        help="the images have dark particles (raw micrograph contrast): "
                             "reconstruct -image")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads (default: the cores available to the process)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (256)")
    parser.add_argument("--reg", type=float, default=1e-3,
                        help="constant Wiener term relative to the mean weight (1e-3)")
    parser.add_argument("--no-wiener", action="store_true",
                        help="only the constant --reg term, no FSC-based Wiener filter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the half-set split (0)")
    parser.add_argument("--float32", action="store_true", help="compute in float32")


def _with_star_poses(particles, star: Path):
    from cryospin.errors import InputError
    from cryospin.io.particles import load_particles

    src = load_particles(star, no_ctf=True, check_finite=False, metadata_only=True,
                         box_px=particles.box_px)
    if src.rotations is None:
        raise InputError("no poses in this file", star)
    if len(src) != len(particles):
        raise InputError(f"{len(src)} poses for {len(particles)} particles", star)
    out = particles.with_poses(src.rotations, src.shifts_px)
    if particles.random_subset is None and src.random_subset is not None:
        import dataclasses

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
    import numpy as np

    from cryospin.train.halves import HalvesFiles, is_halves_run

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
    import logging

    import torch

    from cryospin.backproject import backproject_particles
    from cryospin.cpus import available_cpus, default_cpu_threads
    from cryospin.errors import InputError
    from cryospin.evaluate.fsc import write_fsc_json
    from cryospin.io.mrc import write_map
    from cryospin.io.particles import load_particles
    from cryospin.runlock import check_output_folder, claim_output_folder, describe_command

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.box is not None and (args.box < 8 or args.box % 2):
        raise InputError(f"--box must be even and >= 8, got {args.box}")
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
        from cryospin.io.particles import load_indices

        particles = particles.subset(load_indices(args.ind, len(particles)))
    if args.box is not None and args.box > particles.box_px:
        raise InputError(f"--box {args.box} is larger than the particles' box "
                         f"{particles.box_px} px", args.particles)
    torch.set_num_threads(default_cpu_threads(args.threads, torch.get_num_threads(),
                                              available_cpus()))
    t0 = time.perf_counter()
    res = backproject_particles(
        particles, use_ctf=not args.no_ctf, reg=args.reg, wiener=not args.no_wiener,
        seed=args.seed, batch_size=args.batch_size,
        dtype=torch.float32 if args.float32 else torch.float64, progress=True,
        box_px=args.box, invert_contrast=args.invert_contrast,
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
                       **({} if dependent is None else {"warning": dependent}))
    print(f"backprojected {len(particles)} particles ({box} px, {apix:g} Å/px) in "
          f"{time.perf_counter() - t0:.1f} s with {torch.get_num_threads()} threads")
    print(f"  half-map resolution: {res.fsc.resolution(0.5):.2f} Å at FSC 0.5, "
          f"{res.fsc.resolution(0.143):.2f} Å at FSC 0.143")
    print(f"  wrote {out / 'map.mrc'}, half_A.mrc, half_B.mrc, fsc.json")
    if dependent is not None:
        logging.getLogger(__name__).warning("%s", dependent)
    return 0
