"""``cryospin flip-hand``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.flip_hand`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cryospin.errors import InputError
from cryospin.evaluate.align import mirror_map
from cryospin.evaluate.pose_error import flip_hand
from cryospin.io.mrc import read_map, write_map
from cryospin.io.particles import load_particles, write_particles_star
from cryospin.io.star import CTF_COLUMNS
from cryospin.io.star_tables import merge_optics, read_star_tables


def _has_ctf(path: Path) -> bool:
    """Whether a .star file has every CTF column (others formats: assume yes)."""
    if path.suffix.lower() != ".star":
        return True

    particles, optics = read_star_tables(path)
    columns = set(merge_optics(particles, optics, path).columns)
    return all(c in columns for c in CTF_COLUMNS)


def main(args: argparse.Namespace) -> int:
    """Mirror the map (and poses); print what was written."""
    if (args.poses is None) != (args.out_poses is None):
        raise InputError("--poses and --out-poses go together")
    volume, apix = read_map(args.map)
    if volume.ndim != 3:
        raise InputError(f"expected a 3D map, got shape {volume.shape}", args.map)
    particles = None
    if args.poses is not None:  # read everything before writing anything
        particles = load_particles(args.poses, metadata_only=True, check_finite=False,
                                   no_ctf=not _has_ctf(args.poses))
        if particles.rotations is None:
            raise InputError("no poses (rlnAngleRot/Tilt/Psi) in the file", args.poses)
    write_map(args.output, mirror_map(torch.tensor(volume)).numpy(), apix)
    print(f"wrote {args.output} (mirrored along z about voxel {volume.shape[0] // 2})")
    if particles is not None and particles.rotations is not None:
        flipped = particles.with_poses(flip_hand(particles.rotations), particles.shifts_px)
        write_particles_star(args.out_poses, flipped)
        print(f"wrote {args.out_poses} ({len(flipped)} poses, R -> D R D)")
    return 0
