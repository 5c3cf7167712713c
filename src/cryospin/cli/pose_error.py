"""Pose error of estimated poses against the ground truth, after global alignment (and hand).

PRED and GT are RELION .star (or cryoSPARC .cs) files with poses, or cryoDRGN pose .pkl files,
for the same particles in the same order. The global rotation (and, unless --no-flip, the
mirror hand) of ab initio reconstruction is removed first (see cryospin.evaluate.pose_error).
Shifts in a .pkl are fractions of the box: the box comes from --box, or from the other file
when it is a .star/.cs; without a box only rotations are compared.

Prints mean/median rotation, view-direction and in-plane errors (degrees) and shift errors
(pixels), and writes them as JSON with -o.

Example::

    cryospin pose-error run/poses.star sim/particles.star -o pose_error.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cryospin.cli._args import add_out_argument

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin pose-error``."""
    parser.add_argument("pred", type=Path, help="estimated poses (.star, .cs or .pkl)")
    parser.add_argument("gt", type=Path, help="ground-truth poses (.star, .cs or .pkl)")
    parser.add_argument("--no-flip", action="store_true",
                        help="do not consider the mirrored hand")
    parser.add_argument("--box", type=int, default=None,
                        help="box size, px, for the shifts of .pkl files")
    parser.add_argument("--datadir", type=Path, default=None, metavar="DIR",
                        help="folder holding the image stacks of a .star/.cs, when the box "
                             "must be read from them (relative image paths)")
    parser.add_argument("--optics-group", default=None, metavar="N|NAME",
                        help="compare only this optics group of the .star files "
                             "(rlnOpticsGroup number or name)")
    parser.add_argument("--symmetry", default=None, metavar="GROUP",
                        help="point group of the particle (Cn or Dn, e.g. D7): errors against "
                             "the nearest symmetry-equivalent pose")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, default=None,
                     metavar="JSON", help="write JSON here")


def _read_metadata(path: Path, box_px: int | None, datadir: Path | None = None,
                   optics_group: str | None = None):
    """(rotations, shifts_px, box_px) from a .star/.cs file."""
    from cryospin.errors import InputError
    from cryospin.io.particles import load_particles

    common = {"no_ctf": True, "check_finite": False, "datadir": datadir,
              "optics_group": optics_group if path.suffix.lower() == ".star" else None}
    try:
        ps = load_particles(path, metadata_only=True, box_px=box_px, **common)
    except InputError:
        ps = load_particles(path, **common)  # the stacks give the box
    if ps.rotations is None:
        raise InputError("no poses in this file", path)
    return ps.rotations, ps.shifts_px, ps.box_px


def _read(path: Path, box_px: int | None, datadir: Path | None = None,
          optics_group: str | None = None):
    from cryospin.errors import InputError

    if not path.exists():
        raise InputError("file not found", path)
    if path.suffix.lower() == ".pkl":
        from cryospin.io.pkl import read_cryodrgn_poses

        rot, shifts = read_cryodrgn_poses(path, box_px or 1)
        return rot, (shifts if box_px else None), box_px
    return _read_metadata(path, box_px, datadir, optics_group)


def main(args: argparse.Namespace) -> int:
    """Compare, print a summary, write JSON."""
    from cryospin.errors import InputError
    from cryospin.evaluate.pose_error import pose_error, write_pose_error_json

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
        from cryospin.symmetry import parse_point_group

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
