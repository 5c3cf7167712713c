"""Post-process two half maps as RELION's postprocess: the gold-standard FSC within a mask,
corrected by phase randomisation, and the sharpened map.

HALF_A and HALF_B are independent half maps in one frame (e.g. `cryospin backproject`'s
half_A.mrc and half_B.mrc from the poses of a `reconstruct --halves` run, or another program's
unfiltered half maps). The mask is --mask or, by default, made from the halves' noise (as
`reconstruct --halves` makes it: docs/conventions.md, "Gold standard"). The average of the
halves is weighted per shell by sqrt(2 FSC / (1 + FSC)); its B-factor is the slope of its
Guinier plot (ln amplitude against 1/d², within the mask) between 10 Å and the resolution,
times 4 (RELION's sign: negative sharpens), unless --bfactor gives one; the map is then
sharpened by it and low-passed at the resolution.

The local resolution is the FSC 0.143 of the whitened halves within small soft windows around
points inside the mask (docs/conventions.md, "Gold standard").

Writes OUT_DIR/postprocess.mrc (sharpened, low-passed), postprocess_masked.mrc, map.mrc (the
FSC-weighted average), map_masked.mrc, mask.mrc, locres.mrc (local resolution, Å; 0 outside
the mask), postprocess.star (RELION's layout: FSC curves, Guinier plot, B-factor), fsc.json,
fsc.png, guinier.png and locres.png. OUT_DIR must be new or empty (--force writes into it).

Example::

    cryospin backproject RUN/poses.star -o bp/
    cryospin postprocess bp/half_A.mrc bp/half_B.mrc -o post/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin postprocess``."""
    parser.add_argument("half_a", type=Path, help="first half map (.mrc)")
    parser.add_argument("half_b", type=Path, help="second half map (.mrc), in HALF_A's frame")
    add_out_argument(parser, dest="outdir", type=Path, required=True,
                     metavar="OUT_DIR", help="output folder (new or empty; see --force)")
    parser.add_argument("--force", action="store_true",
                        help="write into OUT_DIR even if it holds files (same names replaced)")
    parser.add_argument("--mask", type=Path, default=None,
                        help="soft mask (.mrc, values in [0, 1]; default: made from the "
                             "halves' noise)")
    parser.add_argument("--apix", type=float, default=None,
                        help="voxel size, Å (default: from HALF_A's header)")
    parser.add_argument("--bfactor", type=float, default=None, metavar="B",
                        help="apply this B-factor (Å², negative sharpens) instead of fitting "
                             "one")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the phase randomisation (0)")
