"""A copy of a simulated data set with a share of its images replaced by junk.

Real particle stacks hold images that are not the particle: empty ice and false picks
(``empty``: the noise alone), contamination with structure of its own (``blobs``: 2-8
Gaussian blobs of 2 to L/6 px anywhere in the inner 80 % of the box, under the row's own CTF,
scaled to the clean stack's mean power, plus the noise) and another particle (``other``: the
images of another simulation of the same box, ``--other DIR``, in its row order, scaled so
that its clean variance is this one's: at equal SNR its noise then matches too). The noise
has the simulation's ``noise_sigma``; the star, the ground truth and ``simulation.json`` are
copied (a junk row keeps the particle's row, whose pose and CTF mean nothing), and
``junk.npy`` lists the junk rows (0-based)::

    python benchmarks/junk_set.py SPIKE_64 SPIKE_64_EMPTY30 --fraction 0.3 --kind empty
    python benchmarks/junk_set.py SPIKE_64 SPIKE_64_ADK30 --fraction 0.3 --kind other \
        --other ADK_64
    python benchmarks/bench_junk.py --data SPIKE_64_EMPTY30 --symmetry C3 run=RUN
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cryospin.forward.ctf import compute_ctf
from cryospin.forward.hartley import fft2_centered, ifft2_centered
from cryospin.io.particles import load_particles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_derived_set  # noqa: E402


def _blobs(rng: np.random.Generator, box_px: int) -> np.ndarray:
    """2-8 Gaussian blobs `(L, L)` (see the module docstring)."""
    yy, xx = np.mgrid[0:box_px, 0:box_px].astype(np.float64) - box_px // 2
    image = np.zeros((box_px, box_px))
    for _ in range(int(rng.integers(2, 9))):
        cx, cy = rng.uniform(-0.4 * box_px, 0.4 * box_px, 2)
        s = rng.uniform(2.0, box_px / 6)
        image += rng.uniform(0.3, 1.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a `cryospin simulate` folder")
    parser.add_argument("out", type=Path, help="new folder")
    parser.add_argument("--fraction", type=float, required=True, help="share of junk rows")
    parser.add_argument("--kind", choices=("empty", "blobs", "other"), required=True)
    parser.add_argument("--other", type=Path, help="--kind other: a `cryospin simulate` "
                                                   "folder of the same box")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error("--fraction must lie in (0, 1)")
    if args.out.exists():
        parser.error(f"{args.out} exists")
    if (args.kind == "other") != (args.other is not None):
        parser.error("--other goes with --kind other, and only there")
    sim = json.loads((args.source / "simulation.json").read_text())
    sigma, clean_var = float(sim["noise_sigma"]), float(sim["clean_variance"])
    apix = float(sim["pixel_size_angstrom"])
    particles = load_particles(args.source / "particles.star")
    n, box = len(particles), int(particles.box_px)
    images = np.array(particles.images_numpy(), dtype=np.float32)  # (N, L, L)
    rng = np.random.default_rng(args.seed)
    junk = np.sort(rng.choice(n, int(round(args.fraction * n)), replace=False))
    if args.kind == "other":
        other_sim = json.loads((args.other / "simulation.json").read_text())
        others = load_particles(args.other / "particles.star")
        if int(others.box_px) != box or len(others) < junk.size:
            parser.error(f"{args.other}: needs {junk.size} images of {box} px")
        scale = np.sqrt(clean_var / float(other_sim["clean_variance"]))
        images[junk] = scale * np.asarray(others.images_numpy()[: junk.size])
        junk_rows = ()
    else:
        junk_rows = junk
    for j in junk_rows:
        noise = sigma * rng.standard_normal((box, box))
        if args.kind == "empty":
            images[j] = noise
            continue
        assert particles.ctf is not None
        ctf = compute_ctf(particles.ctf[j:j + 1], box, apix)[0]  # (L, L)
        blob = ifft2_centered(fft2_centered(torch.from_numpy(_blobs(rng, box))) * ctf).real.numpy()
        blob *= np.sqrt(clean_var / blob.var())
        images[j] = blob + noise
    write_derived_set(args.source, args.out, images, apix, ("junk.npy", junk))
    print(f"{args.out}: {n} images, {junk.size} junk ({args.kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
