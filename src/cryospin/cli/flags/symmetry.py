"""Detect the point group of a map and align the map to the group's conventional axes.

Scores C1, Cn and Dn (n = 2 .. --max-order), T, O and I on MAP: the map is cropped to a small
box (--box), whitened (every Fourier shell weighs the same) and centred on its centre of mass;
candidate n-fold axes come from a search over directions (the share of the map's azimuthal
power about each axis at multiples of n), and each group, placed on those axes (an angle scan
about the principal axis, then a local refinement), is scored by the mean correlation of the
map with its copies rotated by the group's elements other than the identity (C1 scores 1).
The chosen group is the largest whose score is at least --threshold (0.7); the table lists the
accepted groups by order, then the rejected ones by score, and the gap is the chosen score
minus the best rejected score (docs/conventions.md, "Symmetry detection").

With --group G, G is not detected but placed on the map (the same axis search and angle
scan for G alone, refined whatever its score), and its score printed; any of RELION's
icosahedral settings I1..I4 can be placed (detection reports I = I2).

With -o, the map rotated and recentred into the chosen group's conventional frame
(RELION's: Cn about z, Dn with a two-fold on x, T, O, I = I2 or the --group setting, as
docs/conventions.md, "Symmetry"): W(r) = V(M r + c). With --poses and --poses-out, the poses
of the map converted for W: R -> R M, shift t -> t + (R c)_xy.

Example::

    cryospin symmetry run/map.mrc --json run/symmetry.json -o run/map_sym.mrc \\
        --poses run/poses.star --poses-out run/poses_sym.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin symmetry``."""
    parser.add_argument("map", type=Path, metavar="MAP", help="3D map (.mrc)")
    parser.add_argument("--max-order", type=int, default=12, metavar="N",
                        help="largest n of Cn and Dn (default 12)")
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="score a group needs to be chosen (default 0.7)")
    parser.add_argument("--box", type=int, default=32, metavar="PX",
                        help="box of the search, px (default 32; the map is Fourier-cropped)")
    parser.add_argument("--group", default=None, metavar="G",
                        help="place this group (Cn, Dn, T, O, I) instead of detecting one; its "
                             "score is printed, -o and --poses use its frame")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help='write the ranking: [{"group": ..., "score": ...}, ...], best first')
    add_out_argument(parser, dest="output", type=Path, default=None, metavar="ALIGNED.mrc",
                     help="the map in the chosen group's conventional frame")
    parser.add_argument("--poses", type=Path, default=None, metavar="IN.star",
                        help="particles with poses of MAP (.star, .cs) to convert")
    parser.add_argument("--poses-out", type=Path, default=None, metavar="OUT.star",
                        help="converted poses, written as a RELION 3.1 .star")
