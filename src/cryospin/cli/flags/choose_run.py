"""Of several runs of the same particles that differ only in their seed, name the one whose map
and poses fit the images best (the lowest final loss).

Ab initio reconstruction can settle on a wrong structure, and whether it does can depend on the
seed alone. Run the same reconstruction with a few seeds (one after the other, or at once on
other machines), then let this command choose: it prints each run's final loss — the last
epoch's mean negative log-likelihood of the images, nats per image; lower fits better, and the
difference of two runs' losses is a log-likelihood ratio per image — and names the lowest.

The runs must be finished plain runs (not --halves) of the same particles, made by the same
cryospin version with the same settings except --seed and how a run was computed (device,
threads, precision, memory and display settings, the final map); anything else that differs
is named and refused.

With --maps each other run's map is also aligned onto the chosen one (rotation, shift and
hand, as cryospin fsc --align) and compared: runs that found the same structure agree to about
the maps' own resolution, a run that settled on another structure does not (the demo test's
seed 6: correlation 0.86 and FSC = 0.5 at 78-81 Å against the chosen map, the converged runs 0.999
and 15-17 Å).

Example::

    for s in 1 2 3; do cryospin reconstruct particles.star -o run_s$s --seed $s; done
    cryospin choose-run run_s1 run_s2 run_s3 --maps -o chosen.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin choose-run``."""
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                        help="finished run folders (cryospin reconstruct -o), two or more")
    parser.add_argument("--maps", action="store_true",
                        help="also align each run's map.mrc onto the chosen one and print "
                             "their correlation and FSC = 0.5 resolution")
    add_out_argument(parser, dest="output", type=Path, default=None, metavar="JSON",
                     help="also write the table and the choice here as JSON")
