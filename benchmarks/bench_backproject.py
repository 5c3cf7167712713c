"""The final map's Wiener backprojection: float64 insertion by ATen's kernel against the scatter.

``cryospin.backproject`` accumulates in float64 on the CPU. ATen's ``grid_sampler_3d_backward``
kernel, which inserts the slices, is 25–36× slower in float64 than in float32 on the CPU, so
``insert_central_slices`` uses an explicit trilinear scatter there. This script times
:func:`cryospin.backproject.backproject` on a simulated data set's images with their true poses
(CTF-corrected, float64, one process), once with each insertion — the baseline is the kernel
(the code before the change, forced by replacing the scatter with it for that run) — and
prints images/s, the ratio and the largest difference between the two maps (relative to the
map's largest value). Also the insertion alone, per dtype (``--insert-only``)::

    python benchmarks/bench_backproject.py --data ADK_64 --n 4000 --threads 1
    python benchmarks/bench_backproject.py --data D7_64 --n 4000 --symmetry D7 --threads 1
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

from cryospin.backproject import backproject  # noqa: E402
from cryospin.forward import slicing  # noqa: E402
from cryospin.io.particles import load_particles  # noqa: E402
from cryospin.report.inputs import read_poses  # noqa: E402
from cryospin.rotations import random_rotations  # noqa: E402
from cryospin.symmetry import point_group_rotations  # noqa: E402


def _time_backprojection(images, rotations, ctf, box_px, pixel_size, symmetry, *,
                         kernel: bool) -> tuple[float, torch.Tensor]:
    scatter = slicing._insert_by_index_add
    if kernel:  # the baseline: the kernel in float64 as well
        slicing._insert_by_index_add = slicing._insert_by_kernel
    try:
        t0 = time.perf_counter()
        result = backproject(images, rotations, None, ctf, box_px=box_px,
                             pixel_size_angstrom=pixel_size, dtype=torch.float64,
                             symmetry=symmetry)
        return time.perf_counter() - t0, result.volume
    finally:
        slicing._insert_by_index_add = scatter


def _insert_only(box_px: int, n: int) -> list[list[str]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    rot64 = random_rotations(n, generator=g, dtype=torch.float64)
    freqs = slicing._frequencies(None, box_px, torch.float64, torch.device("cpu"))
    values64 = torch.randn(2, n, box_px * box_px, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        rot, values, f = rot64.to(dtype), values64.to(dtype), freqs.to(dtype)
        times = {}
        for name, fn in (("kernel", slicing._insert_by_kernel),
                         ("scatter", slicing._insert_by_index_add)):
            t0 = time.perf_counter()
            fn(values, rot, f, box_px)
            times[name] = time.perf_counter() - t0
        rows.append([str(dtype).removeprefix("torch."), str(box_px), str(n),
                     f"{n / times['kernel']:.0f}", f"{n / times['scatter']:.0f}",
                     f"{times['kernel'] / times['scatter']:.2f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="a `cryospin simulate` folder")
    p.add_argument("--n", type=int, default=4000, help="particles (the first N)")
    p.add_argument("--symmetry", default="C1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--insert-only", type=int, nargs="*", metavar="BOX",
                   help="time the insertion alone at these boxes (2 channels, 256 slices)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), "\n")
    if args.insert_only is not None:
        rows = [r for box in (args.insert_only or [64]) for r in _insert_only(box, 256)]
        print(markdown_table(["dtype", "box (px)", "slices", "kernel (slices/s)",
                              "scatter (slices/s)", "scatter / kernel speed"], rows), "\n")
    if args.data is None:
        return
    particles = load_particles(args.data / "particles.star")
    n = min(args.n, len(particles))
    rotations, _ = read_poses(args.data / "particles.star", None)
    rotations = torch.as_tensor(np.asarray(rotations), dtype=torch.float64)[:n]
    images = torch.as_tensor(np.asarray(particles.images(np.arange(n))), dtype=torch.float32)
    ctf = particles.ctf[torch.arange(n)] if particles.ctf is not None else None
    group = point_group_rotations(args.symmetry)
    symmetry = group if group.shape[0] > 1 else None
    box, pixel = particles.box_px, particles.pixel_size_angstrom
    t_kernel, v_kernel = _time_backprojection(images, rotations, ctf, box, pixel, symmetry,
                                              kernel=True)
    t_scatter, v_scatter = _time_backprojection(images, rotations, ctf, box, pixel, symmetry,
                                                kernel=False)
    diff = float((v_scatter - v_kernel).abs().max() / v_kernel.abs().max())
    print(f"{args.data}: {n} particles, {box} px, symmetry {args.symmetry}, float64\n")
    print(markdown_table(
        ["insertion", "time (s)", "images/s", "speed-up", "max |Δmap| / max |map|"],
        [["kernel (baseline)", f"{t_kernel:.1f}", f"{n / t_kernel:.0f}", "1.00×", ""],
         ["scatter (now)", f"{t_scatter:.1f}", f"{n / t_scatter:.0f}",
          f"{t_kernel / t_scatter:.2f}×", f"{diff:.1e}"]]))
    print(f"\n    python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
