"""``cryospin symmetry-expand``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.symmetry_expand`."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from cryospin.errors import InputError
from cryospin.half_sets import half_set_assignment
from cryospin.io.particles import load_particles, write_particles_star
from cryospin.point_group import parse_point_group
from cryospin.symmetry import expand_rotations, point_group_rotations


def main(args: argparse.Namespace) -> int:
    """Read the poses, write each particle |G| times with the poses R g."""
    group = parse_point_group(args.symmetry)  # a clear error before any work
    if args.output.suffix.lower() != ".star":
        raise InputError("the output is a RELION .star: give a name ending in .star",
                         args.output)
    if args.output.resolve() == args.poses.resolve():
        raise InputError("the output would replace the input; give another name", args.output)
    # a .star's columns (CTF included) are carried as text; a .cs's CTF is read to be written
    particles = load_particles(args.poses, metadata_only=True, check_finite=False,
                               no_ctf=args.poses.suffix.lower() == ".star")
    if particles.rotations is None:
        raise InputError("no poses (rlnAngleRot/Tilt/Psi) in the file", args.poses)
    n, order = len(particles), group.order
    half = half_set_assignment(n, random_subset=particles.random_subset, seed=args.seed)
    rows = np.repeat(np.arange(n), order)  # (N·G,): particle-major, the identity first
    expanded = particles.subset(rows)
    rotations = expand_rotations(particles.rotations, point_group_rotations(group.symbol))
    shifts = expanded.shifts_px
    expanded = expanded.with_poses(rotations.reshape(n * order, 3, 3), shifts)
    expanded = dataclasses.replace(expanded, random_subset=half[rows])
    write_particles_star(args.output, expanded)
    print(f"wrote {args.output}: {n} particles × {order} poses of {group.symbol} = "
          f"{len(expanded)} rows (pose R g, half sets per particle)")
    return 0
