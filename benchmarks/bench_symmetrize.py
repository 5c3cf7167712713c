"""A symmetric backprojection two ways: each image inserted at its ``|G| / |P|`` poses (exact,
the baseline) against inserted once with the C1 sums averaged over the group by resampling
(``symmetrize="resample"``, :mod:`cryospin.backproject`).

On a run's poses (``poses.star`` of a ``cryospin reconstruct --symmetry G`` run, its images
in ``--data``), float64, one process, one after the other: seconds and their ratio, each
map's FSC 0.5 and 0.143 against ``DATA/gt.mrc`` (aligned, both hands, as
``benchmarks/bench_junk.py``), the half maps' FSC 0.5, and the FSC between the two maps by
shell::

    python benchmarks/bench_symmetrize.py --poses RUN/poses.star --data D7_64 --symmetry D7 \\
        --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, markdown_table  # noqa: E402

from cryospin.backproject import BackprojectionResult, backproject_particles  # noqa: E402
from cryospin.evaluate.align import align_maps  # noqa: E402
from cryospin.evaluate.fsc import fsc  # noqa: E402
from cryospin.io.mrc import read_map  # noqa: E402
from cryospin.io.particles import load_particles  # noqa: E402
from cryospin.symmetry import point_group_rotations  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--poses", type=Path, required=True, help="a run's poses.star")
    ap.add_argument("--data", type=Path, required=True, help="folder with the images, gt.mrc")
    ap.add_argument("--symmetry", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    G = point_group_rotations(args.symmetry)
    particles = load_particles(args.poses, datadir=args.data)
    gt, apix = read_map(args.data / "gt.mrc")
    gt_t = torch.from_numpy(gt.copy()).double()
    results: dict[str, tuple[float, BackprojectionResult]] = {}
    for how in ("insert", "resample"):
        t0 = time.perf_counter()
        res = backproject_particles(particles, symmetry=args.symmetry, symmetrize=how)
        results[how] = (time.perf_counter() - t0, res)
    print(machine_line())
    print(f"{len(particles):,} images, {particles.box_px} px, {args.symmetry} "
          f"(|G| = {G.shape[0]})\n")
    rows = []
    base = results["insert"][0]
    for how, (seconds, res) in results.items():
        aligned = align_maps(gt_t, res.volume.double()).aligned.double()
        truth = fsc(gt_t, aligned, pixel_size_angstrom=apix)
        rows.append([how, f"{seconds:.1f}", f"{base / seconds:.2f}×",
                     f"{truth.resolution(0.5):.2f} / {truth.resolution(0.143):.2f} Å",
                     f"{res.fsc.resolution(0.5):.2f} Å"])
    print(markdown_table(["symmetrize", "seconds", "speed vs insert",
                          "FSC 0.5 / 0.143 vs truth", "half maps' FSC 0.5"], rows))
    between = fsc(results["insert"][1].volume.double(), results["resample"][1].volume.double())
    print("\nFSC between the two maps by shell:",
          " ".join(f"{v:.3f}" for v in np.asarray(between.fsc)))


if __name__ == "__main__":
    main()
