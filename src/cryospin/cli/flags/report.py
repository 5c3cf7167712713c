"""Write an HTML report with PNG figures for a run folder of cryospin reconstruct.

The page (no network, no JavaScript) shows a summary table, the loss against wall time with the
switch marked, the encoder head usage, the orientation distribution of the final poses, central
sections and projections of the map, the configuration and a note on handedness. With --gt the
map is aligned to a ground-truth map: FSC curve and resolution per epoch; with --gt-poses, the
rotation-error histogram of the final poses. Figures go to the folder named after the HTML file
(default RUN_DIR/report/).

For a --halves run folder the page shows the gold-standard FSC curves, both halves' training,
the combined map and poses (and, with --gt/--gt-poses, their FSC and pose error); each half
gets its own report too (each start's: RUN_DIR/half_A/start_1/report.html ..., the chosen one
linked; RUN_DIR/half_A/report.html for a half of one run, --max-starts 1).

Example::

    cryospin report run/ --gt data/gt.mrc --gt-poses data/particles.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin report``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder")
    parser.add_argument("--gt", type=Path, default=None, metavar="MAP",
                        help="ground-truth map (.mrc): FSC and resolution per epoch")
    parser.add_argument("--gt-poses", type=Path, default=None, metavar="POSES",
                        help="ground-truth poses (.star, .cs or cryoDRGN .pkl): pose error")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, default=None,
                     metavar="HTML",
                     help="output page (default RUN_DIR/report.html)")
    parser.add_argument("--epoch-fsc", type=int, default=10, metavar="N",
                        help="with --gt, compare at most N epochs' maps with it, the final "
                             "map included (default 10; 0 or 1 = final map only)")
    parser.add_argument("--no-flip", action="store_true",
                        help="with --gt/--gt-poses, do not try the mirrored hand")
