"""``cryospin symmetry``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.symmetry`."""

from __future__ import annotations

import argparse
import json
import time

import torch

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.io.mrc import looks_like_3d_map, read_map, write_map
from cryospin.io.particles import load_particles, write_particles_star
from cryospin.point_group import parse_point_group
from cryospin.symmetry_search import (
    SymmetrySearch,
    detect_symmetry,
    map_in_group_frame,
    place_group,
    poses_in_group_frame,
)


def main(args: argparse.Namespace) -> int:
    """Detect, print the ranking, write what was asked."""
    if (args.poses is None) != (args.poses_out is None):
        raise InputError("--poses and --poses-out go together")
    if args.poses is not None and args.output is None:
        raise InputError("--poses needs -o (the aligned map the converted poses belong to)")
    if args.max_order < 2:
        raise InputError(f"--max-order must be at least 2, got {args.max_order}")
    if not 0.0 < args.threshold <= 1.0:
        raise InputError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.group is not None:
        parse_point_group(args.group)  # a clear error before any work
    if args.box < 8:
        raise InputError(f"--box must be at least 8 px, got {args.box}")
    if args.output is not None and args.output.suffix.lower() not in (".mrc", ".map"):
        raise InputError("the aligned map is written as .mrc: give a name ending in .mrc",
                         args.output)
    if args.poses_out is not None and args.poses_out.suffix.lower() != ".star":
        raise InputError("the poses are written as a RELION .star: give a name ending in .star",
                         args.poses_out)
    if not looks_like_3d_map(args.map):
        raise InputError("not a 3D map (a cubic grid with a 3D space group); a particle stack?",
                         args.map)
    array, apix = read_map(args.map)
    particles = None
    if args.poses is not None:  # read everything before writing anything
        particles = load_particles(args.poses, metadata_only=True, check_finite=False,
                                   no_ctf=args.poses.suffix.lower() == ".star")
        if particles.rotations is None:
            raise InputError("no poses (rlnAngleRot/Tilt/Psi) in the file", args.poses)
    volume = torch.from_numpy(array.copy())
    start = time.perf_counter()
    if args.group is not None:
        result = place_group(volume, args.group, box_px=args.box, threshold=args.threshold)
    else:
        result = detect_symmetry(volume, max_order=args.max_order, box_px=args.box,
                                 threshold=args.threshold)
    _print_result(result, time.perf_counter() - start, given=args.group is not None)
    if args.json is not None:
        rows = [{"group": f.group, "score": round(f.score, 6)} for f in result.fits]
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.output is not None:
        fit = result.chosen
        aligned = map_in_group_frame(volume.double(), fit.frame, result.centre_px)
        write_map(args.output, aligned.float().numpy(), apix)
        print(f"wrote {args.output} (the map in {fit.group}'s conventional frame)")
        if particles is not None and particles.rotations is not None:
            shifts = particles.shifts_px
            if shifts is None:
                shifts = torch.zeros(len(particles), 2, dtype=particles.rotations.dtype)
            # c in the particles' pixels (the map may have another voxel size)
            ps = particles.pixel_size_angstrom
            scale = apix / ps if ps > 0 else 1.0
            rot, sh = poses_in_group_frame(particles.rotations, shifts, fit.frame,
                                           result.centre_px * scale)
            write_particles_star(args.poses_out, particles.with_poses(rot, sh))
            print(f"wrote {args.poses_out} ({len(particles)} poses, R -> R M, t -> t + (R c)_xy)")
    return 0


def _print_result(result: SymmetrySearch, seconds: float, *, given: bool) -> None:
    """The ranking (detected) or the one placed group (``given``), the centre, the time."""
    c = result.centre_px.tolist()
    where = (f"centre of mass ({c[0]:.2f}, {c[1]:.2f}, {c[2]:.2f}) px from the box centre; "
             f"{seconds:.1f} s")
    fit = result.chosen
    if given:
        verdict = "at least" if fit.score >= result.threshold else "below"
        print(f"group {fit.group} placed: score {fit.score:.3f} ({verdict} the threshold "
              f"{result.threshold}); {where}")
        return
    print(f"{'group':>6} {'order':>5} {'score':>7}")
    for f in result.fits:
        mark = "  <- chosen" if f is fit else ""
        print(f"{f.group:>6} {f.order:>5} {f.score:7.3f}{mark}")
    print(f"chosen {fit.group} (score {fit.score:.3f}, threshold {result.threshold}, gap to "
          f"the best rejected {result.gap:.3f}); {where}")
