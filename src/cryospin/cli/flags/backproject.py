"""Reconstruct a map from particles with known poses (Hartley-space backprojection).

Writes OUT_DIR/map.mrc, half_A.mrc, half_B.mrc (voxel size set) and fsc.json (FSC between the
half maps), and prints the half-map resolution. OUT_DIR must be new or empty (--force writes
into one that holds files). Poses come from PARTICLES itself (.star/.cs),
or from --poses: a cryoDRGN pose .pkl, or a .star whose rotations and shifts are used (same
particles, same order). CTF correction uses the particles' CTF or --ctf (cryoDRGN ctf.pkl);
the Wiener term is estimated from the half-map FSC (see cryospin.backproject). Half sets follow
rlnRandomSubset when present, else a random split (--seed).

--symmetry G (Cn, Dn, T, O, I or I1..I4, in RELION's axes: docs/conventions.md, "Symmetry")
inserts each image at its |G| symmetry-related poses R g: the map is symmetric, and the same
as backprojecting `cryospin symmetry-expand` output without --symmetry.

The half maps are independent only when their poses were refined independently. Poses refined
on all particles together (a plain `cryospin reconstruct` run, most --poses files) make the
halves share the reference's noise and the half-map FSC overestimates the resolution: then a
warning says so and fsc.json records "independent_halves": false. The poses.star of a
`reconstruct --halves` run, whose rlnRandomSubset is the split used, gives independent halves.

Example::

    cryospin backproject sim/particles.star -o bp/
    cryospin backproject particles.mrcs --poses pose.pkl --ctf ctf.pkl -o bp/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin backproject``."""
    parser.add_argument("particles", type=Path, help="particles (.star, .cs, .mrcs or .txt)")
    add_out_argument(parser, dest="outdir", aliases=("--outdir",), type=Path, required=True,
                     metavar="OUT_DIR", help="output folder (new or empty; see --force)")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that already holds files (files of the same "
                             "names are replaced, others kept)")
    parser.add_argument("--poses", type=Path, default=None,
                        help="poses: cryoDRGN pose .pkl or a .star with poses")
    parser.add_argument("--ctf", type=Path, default=None, help="cryoDRGN ctf.pkl")
    parser.add_argument("--no-ctf", action="store_true", help="no CTF correction")
    parser.add_argument("--datadir", type=Path, default=None, help="folder holding the stacks")
    parser.add_argument("--optics-group", default=None, metavar="N|NAME",
                        help="only this optics group of a .star (rlnOpticsGroup number or "
                             "name); --poses and --ind then describe the group's particles")
    parser.add_argument("--ind", type=Path, default=None, help="particle indices to use (.pkl)")
    parser.add_argument("--box", type=int, default=None, metavar="N",
                        help="Fourier-crop the images to N px as they are read (even, <= the "
                             "particles' box): an N³ map at the pixel size × L/N")
    parser.add_argument("--invert-contrast", action="store_true",
                        help="the images have dark particles (raw micrograph contrast): "
                             "reconstruct -image")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads (default: the cores available to the process)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="where the sums are computed (auto: a CUDA or MPS GPU if there is "
                             "one, else the CPU)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (256)")
    parser.add_argument("--reg", type=float, default=1e-3,
                        help="constant Wiener term relative to the mean weight (1e-3)")
    parser.add_argument("--no-wiener", action="store_true",
                        help="only the constant --reg term, no FSC-based Wiener filter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the half-set split (0)")
    parser.add_argument("--symmetry", default="C1", metavar="GROUP",
                        help="point group of the particle (C1 = none; Cn, Dn, T, O, I or "
                             "I1..I4): each image inserted at all |G| equivalent poses")
    parser.add_argument("--float32", action="store_true", help="compute in float32")
