"""Mirror a map (and optionally its poses) to the other hand.

Ab initio reconstruction cannot tell a map from its mirror image. This writes the mirror
``V(D r)``, ``D = diag(1, 1, −1)``: the map reversed along z about the centre voxel ``L//2``
(docs/conventions.md, "Evaluation"), with the same voxel size. With --poses, the poses are
converted by ``R -> D R D`` (shifts unchanged), so the flipped map and flipped poses give the
same projections as the originals.

Example::

    cryospin flip-hand run/map.mrc -o run/map_flipped.mrc \\
        --poses run/poses.star --out-poses run/poses_flipped.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin flip-hand``."""
    parser.add_argument("map", type=Path, metavar="MAP", help="map to mirror (.mrc)")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, required=True,
                     metavar="OUT",
                     help="mirrored map (.mrc)")
    parser.add_argument("--poses", type=Path, default=None, metavar="STAR",
                        help="particles with poses (.star, .cs) to convert as well")
    parser.add_argument("--out-poses", type=Path, default=None, metavar="STAR",
                        help="converted poses, written as a RELION 3.1 .star")
