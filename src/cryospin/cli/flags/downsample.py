"""Fourier-crop a particle stack to a smaller box (coarser pixels), streamed in chunks.

Reads PARTICLES (.star, .cs, .txt or .mrcs), crops every image's centred Fourier transform to
--box pixels (pixel values kept: a constant image stays constant), writes OUT.mrcs and, with
--out-star, a RELION 3.1 star with pixel size × L_old/L_new, carrying every column of the input
(image names point at OUT.mrcs, relative to the star's folder or --relative-to). Shifts are kept
in Å (their pixel values scale by L_new/L_old); CTF and poses are unchanged.

Example::

    cryospin downsample particles.star -o particles.64.mrcs --box 64 --out-star particles.64.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin downsample``."""
    parser.add_argument("particles", type=Path, help=".star, .cs, .txt or .mrcs")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output .mrcs")
    parser.add_argument("--box", type=int, required=True, help="new box size, px")
    parser.add_argument("--out-star", type=Path, default=None, help="output RELION 3.1 star")
    parser.add_argument("--relative-to", type=Path, default=None, metavar="DIR",
                        help="image paths in --out-star relative to DIR (default: to the "
                             "star's folder)")
    parser.add_argument("--chunk", type=int, default=1000, help="images per block (default 1000)")
    parser.add_argument("--datadir", type=Path, default=None, help="folder holding the stacks")
    parser.add_argument("--optics-group", default=None, metavar="N|NAME",
                        help="only this optics group of a .star (rlnOpticsGroup number or name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
