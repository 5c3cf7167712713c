"""Run the main job end to end on an embedded example (what `make demo` runs).

Simulates a small dataset from the structure bundled with cryospin (PDB 6VYB, SARS-CoV-2 spike),
reconstructs it ab initio, computes the resolution against the ground truth and the rotation
error (also modulo the trimer's pseudo-C3, OUT_DIR/pose_error_c3.json), writes the run report, and
prints where the map, poses and metrics are.

Example::

    cryospin demo --out demo_run
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_args"]

# sized to finish in about 3 minutes on 2 CPU cores (2.4 min native bf16, 2.6 min fp32 AVX2;
# benchmarks/RESULTS.md "Portable speed")
DEFAULTS = {
    "n_particles": 5000,
    "box": 48,
    "pixel_size": 4.5,
    "snr": 0.1,
}


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the demo's flags."""
    parser.add_argument("-o", "--out", type=Path, default=Path("demo_run"), metavar="OUT_DIR",
                        help="output folder (default demo_run)")
    parser.add_argument("--n-particles", type=int, default=DEFAULTS["n_particles"])
    parser.add_argument("--box", type=int, default=DEFAULTS["box"], help="box size, px")
    parser.add_argument("--pixel-size", type=float, default=DEFAULTS["pixel_size"], help="Å/px")
    parser.add_argument("--snr", type=float, default=DEFAULTS["snr"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
