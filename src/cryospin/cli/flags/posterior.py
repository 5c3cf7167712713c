"""Plot the approximate pose posterior of chosen particles over view directions.

For each particle: log p(view direction | image) on a HEALPix grid of 12·nside² equal-area
pixels, marginalised over the in-plane angle (--psi-steps angles), under the training's image
model: the run's trained volume (checkpoint.pt), the particle's CTF and current shift, the
training noise variance and loss disc (or --loss-radius). Drawn on an equal-area (Mollweide)
map with, when the particle is in RUN_DIR/pose_track.npz, every encoder head's candidate at the
last auto-encoding epoch and the particle's path through the auto-decoding epochs; the current
(final) pose is marked. Writes OUT_DIR/posterior_<index>.png per particle and
OUT_DIR/posterior.npz (nside, psi_steps, particles, directions, log_posterior, ...);
OUT_DIR must be new or empty (--force writes into one that holds files).

Particles are 0-based indices in the run's particle order; pose_track.npz's `indices` lists
the tracked ones.

Example::

    cryospin posterior run/ --particles 0,5,17 -o run/posterior
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin posterior``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder")
    parser.add_argument("--particles", required=True, metavar="I,J,...",
                        help="comma-separated 0-based particle indices")
    parser.add_argument("--nside", type=int, default=8,
                        help="HEALPix resolution: 12·nside² view directions (default 8)")
    parser.add_argument("--psi-steps", type=int, default=36, metavar="S",
                        help="in-plane angles marginalised over (default 36, i.e. 10°)")
    parser.add_argument("--loss-radius", type=float, default=None, metavar="PX",
                        help="score on the disc |k| <= PX (cycles per box) only "
                             "(default: the training disc)")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, default=None,
                     metavar="OUT_DIR",
                     help="output folder, new or empty (default RUN_DIR/posterior)")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that already holds files (files of the same "
                             "names are replaced, others kept)")
