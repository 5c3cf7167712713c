"""``cryospin pose-error``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.pose_error`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cryospin.errors import InputError
from cryospin.evaluate.pose_error import pose_error, write_pose_error_json
from cryospin.io.particles import load_particles
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.point_group import parse_point_group

log = logging.getLogger(__name__)


def _read_metadata(path: Path, box_px: int | None, datadir: Path | None = None,
                   optics_group: str | None = None):
    """(rotations, shifts_px, box_px) from a .star/.cs file."""
    group = optics_group if path.suffix.lower() == ".star" else None
    try:
        ps = load_particles(path, metadata_only=True, box_px=box_px, no_ctf=True,
                            check_finite=False, datadir=datadir, optics_group=group)
    except InputError:  # the stacks give the box
        ps = load_particles(path, no_ctf=True, check_finite=False, datadir=datadir,
                            optics_group=group)
    if ps.rotations is None:
        raise InputError("no poses in this file", path)
    return ps.rotations, ps.shifts_px, ps.box_px


def _read(path: Path, box_px: int | None, datadir: Path | None = None,
          optics_group: str | None = None):
    if not path.exists():
        raise InputError("file not found", path)
    if path.suffix.lower() == ".pkl":
        rot, shifts = read_cryodrgn_poses(path, box_px or 1)
        return rot, (shifts if box_px else None), box_px
    return _read_metadata(path, box_px, datadir, optics_group)


def main(args: argparse.Namespace) -> int:
    """Compare, print a summary, write JSON."""
    box = args.box
    paths = [args.pred, args.gt]
    if args.optics_group is not None and not any(p.suffix.lower() == ".star" for p in paths):
        raise InputError("--optics-group selects from a .star's optics groups; neither file "
                         "is a .star")
    # read metadata files first so that a .pkl can take its box from them
    order = sorted(range(2), key=lambda i: paths[i].suffix.lower() == ".pkl")
    loaded: dict[int, tuple] = {}
    for i in order:
        rot, shifts, file_box = _read(paths[i], box, args.datadir, args.optics_group)
        box = box or file_box
        loaded[i] = (rot, shifts)
    (pred_R, pred_t), (gt_R, gt_t) = loaded[0], loaded[1]
    if pred_R.shape[0] != gt_R.shape[0]:
        raise InputError(f"{pred_R.shape[0]} poses but {args.gt} has {gt_R.shape[0]}", args.pred)
    if pred_t is None or gt_t is None:
        log.warning("no box size for the .pkl shifts (use --box): comparing rotations only")
    if args.symmetry is not None:
        parse_point_group(args.symmetry)  # a clear error before any work
    res = pose_error(pred_R, gt_R, pred_t, gt_t, allow_flip=not args.no_flip,
                     symmetry=args.symmetry)
    d = res.to_dict()
    print(f"pose error of {args.pred.name} vs {args.gt.name} ({res.n_particles} particles"
          f"{', mirrored hand' if res.flipped else ''}"
          f"{f', modulo {args.symmetry.upper()}' if args.symmetry else ''}):")
    print(f"  rotation       mean {d['mean_rotation_error_deg']:.2f}°  "
          f"median {d['median_rotation_error_deg']:.2f}°")
    print(f"  view direction mean {d['mean_view_direction_error_deg']:.2f}°  "
          f"median {d['median_view_direction_error_deg']:.2f}°")
    print(f"  in-plane       mean {d['mean_in_plane_error_deg']:.2f}°  "
          f"median {d['median_in_plane_error_deg']:.2f}°")
    if d["mean_shift_error_px"] is not None:
        print(f"  shift          mean {d['mean_shift_error_px']:.2f} px  "
              f"median {d['median_shift_error_px']:.2f} px  (after removing a global map offset: "
              f"median {d['median_shift_error_centered_px']:.2f} px)")
    if args.output is not None:
        write_pose_error_json(res, args.output, pred=str(args.pred), gt=str(args.gt), box_px=box)
    return 0
