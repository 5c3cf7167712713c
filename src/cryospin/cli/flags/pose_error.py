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
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


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
                        help="point group of the particle (Cn, Dn, T, O, I or I1..I4 in "
                             "RELION's axes, e.g. D7): errors against the nearest "
                             "symmetry-equivalent pose")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, default=None,
                     metavar="JSON", help="write JSON here")
