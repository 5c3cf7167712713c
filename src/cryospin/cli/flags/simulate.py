"""Simulate a particle dataset with known ground truth from an atomic model or a map.

STRUCTURE is a PDB/mmCIF file (.gz ok), an MRC map, or bundled:6vyb (the SARS-CoV-2 spike
shipped with cryospin). Writes OUTDIR/particles.mrcs, particles.star (RELION 3.1 with the true
poses, shifts and CTF), gt.mrc, gt_poses.pkl (cryoDRGN) and simulation.json; OUTDIR must be
new or empty (--force writes into one that holds files). The SNR is var(all pixels of the
clean stack) / noise variance (docs/conventions.md, "Simulator SNR").

Examples::

    cryospin simulate bundled:6vyb -o sim --n-particles 20000 --box 64 --pixel-size 3.4 \\
        --snr 0.1 --seed 0
    # a symmetric particle: a D7 ring of the spike's receptor-binding domain
    cryospin simulate bundled:6vyb --select A:330-530 --symmetry D7 -o sim_d7 \\
        --n-particles 20000 --box 64 --pixel-size 3.4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin simulate``."""
    parser.add_argument("structure", help="PDB/mmCIF/MRC file, or bundled:6vyb")
    add_out_argument(parser, dest="outdir", aliases=("--outdir",), type=Path, required=True,
                     metavar="OUT_DIR", help="output folder (new or empty; see --force)")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that already holds files (files of the same "
                             "names are replaced, others kept)")
    parser.add_argument("--n-particles", type=int, required=True, help="number of images")
    parser.add_argument("--box", type=int, required=True, help="box size L, px")
    parser.add_argument("--pixel-size", type=float, required=True, help="pixel size, Å")
    parser.add_argument("--snr", type=float, default=0.1,
                        help="signal variance / noise variance (inf: no noise; default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shift-std-px", type=float, default=0.0,
                        help="std of Gaussian in-plane shifts, px (default 0)")
    parser.add_argument("--defocus-min-um", type=float, default=1.0, help="default 1.0")
    parser.add_argument("--defocus-max-um", type=float, default=2.5, help="default 2.5")
    parser.add_argument("--astigmatism-angstrom", type=float, default=200.0,
                        help="max dfU - dfV, Å (default 200)")
    parser.add_argument("--voltage-kv", type=float, default=300.0, help="default 300")
    parser.add_argument("--cs-mm", type=float, default=2.7, help="default 2.7")
    parser.add_argument("--amplitude-contrast", type=float, default=0.1, help="default 0.1")
    parser.add_argument("--no-ctf", action="store_true", help="do not apply a CTF")
    parser.add_argument("--resolution-angstrom", type=float, default=None,
                        help="band limit of atomic models (default 2 x pixel size)")
    parser.add_argument("--chunk", type=int, default=256, help="images per block (default 256)")
    parser.add_argument("--select", default=None, metavar="CHAIN[:FIRST-LAST]",
                        help="atomic models: keep one chain or a residue range, e.g. A:330-530")
    parser.add_argument("--symmetry", default=None, metavar="GROUP",
                        help="atomic models: simulate a Cn/Dn assembly of the (selected) atoms, "
                             "e.g. D7 (symmetry axis z)")
    parser.add_argument("--write-clean", action="store_true",
                        help="also write the noise-free stack particles_clean.mrcs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
