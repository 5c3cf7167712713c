"""A copy of a simulated data set with each image multiplied by its own factor.

Real images differ in contrast (ice thickness, dose, the normalisation of each extracted
box) in ways the image model (one scale for the stack) does not hold: this copy draws one
factor per image, uniform in ``[1 − spread, 1 + spread]`` (seed ``--seed``), and multiplies
the whole image (signal and noise) by it. The star, the ground truth and ``simulation.json``
are copied; ``scale.npy`` holds the factors::

    python benchmarks/scaled_set.py SPIKE_64 SPIKE_64_SCALED20 --spread 0.2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cryospin.io.mrc import read_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_derived_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a `cryospin simulate` folder")
    parser.add_argument("out", type=Path, help="new folder")
    parser.add_argument("--spread", type=float, required=True, help="factors in [1-s, 1+s]")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 <= args.spread < 1:
        parser.error("--spread must lie in [0, 1)")
    if args.out.exists():
        parser.error(f"{args.out} exists")
    images, apix = read_map(args.source / "particles.mrcs")
    images = np.asarray(images, dtype=np.float32)
    rng = np.random.default_rng(args.seed)
    factors = rng.uniform(1 - args.spread, 1 + args.spread, images.shape[0])
    write_derived_set(args.source, args.out, images * factors[:, None, None].astype(np.float32),
                      apix, ("scale.npy", factors))
    print(f"{args.out}: {images.shape[0]} images, factors {factors.min():.3f}-{factors.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
