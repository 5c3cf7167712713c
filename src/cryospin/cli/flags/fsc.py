"""Fourier shell correlation between two maps, with optional alignment (rotation, shift, hand).

Prints the resolution at FSC = 0.5 and 0.143 (Å) and writes the curve as JSON and, with
--plot, a PNG. With --align, MAP_B is first rigidly aligned onto MAP_A (global search over
rotations for both hands, then local refinement; see cryospin.evaluate.align), as needed to
compare an ab initio map with the ground truth.

Example::

    cryospin fsc gt.mrc run/map.mrc --align -o fsc.json --plot fsc.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin fsc``."""
    parser.add_argument("map_a", type=Path, help="first map (.mrc); the reference for --align")
    parser.add_argument("map_b", type=Path, help="second map (.mrc)")
    parser.add_argument("--align", action="store_true",
                        help="align MAP_B onto MAP_A first (rotation, translation and hand)")
    parser.add_argument("--no-flip", action="store_true",
                        help="with --align, do not try the mirrored hand")
    parser.add_argument("--mask", type=Path, default=None, help="real-space mask (.mrc)")
    parser.add_argument("--apix", type=float, default=None,
                        help="voxel size, Å (default: from MAP_A's header)")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, default=None,
                     metavar="JSON", help="write the curve as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the curve")
    parser.add_argument("--write-aligned", type=Path, default=None,
                        help="with --align, write the aligned MAP_B (.mrc)")
