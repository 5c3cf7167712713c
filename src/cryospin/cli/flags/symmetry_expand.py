"""Write the |G| symmetry-equivalent poses of every particle (as relion_particle_symmetry_expand).

For a particle of point group G (Cn, Dn, T, O, I or I1..I4 in RELION's axes:
docs/conventions.md, "Symmetry"), each row of POSES is written |G| times, one after another,
with the rotation R g for every g of G (the identity first, so the first copy is the input
pose), and every other column as it was (image name, shifts, CTF, optics group). R g is a
right multiplication: the map's frame is turned by g before the pose R, and V(g r) = V(r)
makes the images identical. RELION composes the same way: it writes the Euler matrix
A' = A · g (Euler_apply_transf with L = I), and cryospin's R is RELION's A.

Every copy of an image is put in the half set of its particle (rlnRandomSubset): the input's
1/2 split when it has one, else the seeded split `cryospin backproject` uses (--seed), so that
`cryospin backproject OUT.star` gives the same maps as `cryospin backproject POSES.star
--symmetry G` and the two half sets share no image.

Example::

    cryospin symmetry-expand run/poses.star --symmetry D7 -o run/poses_d7_expanded.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin symmetry-expand``."""
    parser.add_argument("poses", type=Path, metavar="POSES",
                        help="particles with poses (.star or .cs)")
    parser.add_argument("--symmetry", required=True, metavar="GROUP",
                        help="point group: Cn, Dn, T, O, I or I1..I4 (RELION's axes)")
    add_out_argument(parser, dest="output", type=Path, required=True, metavar="OUT.star",
                     help="expanded particles, written as a RELION 3.1 .star")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the half-set split when POSES has no rlnRandomSubset "
                             "(0, as backproject)")
