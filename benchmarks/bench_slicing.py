"""Benchmark central-slice extraction: forward + backward time, grid_sample vs explicit gathers.

Prints a Markdown table. Both methods compute the same trilinear slices of one real (Hartley)
volume; the backward pass computes gradients with respect to the volume and the rotations
(as in autodecoding). Also times the adjoint ``insert_central_slices`` (backprojection).

Usage::

    python benchmarks/bench_slicing.py            # full set of sizes
    python benchmarks/bench_slicing.py --quick    # two sizes, fewer repeats
    python benchmarks/bench_slicing.py --split    # one grid_sample call against the points
                                                  # split over the CPU threads, side by side

``--split`` times a training batch (64 slices on the training disc) three ways, each with the
points as one ``grid_sample`` batch item (ATen's CPU kernels then use one thread) and split over
``torch.get_num_threads()`` items (:mod:`cryospin.forward.trilinear`): a volume step (gradient
of the volume and the rotations), a pose step (the rotations' only) and an insertion.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from cryospin.forward import trilinear
from cryospin.forward.lattice import disc_frequencies, frequency_grid_2d
from cryospin.forward.slicing import (
    _extract_central_slices_gather,
    _insert_by_kernel,
    extract_central_slices,
    insert_central_slices,
)
from cryospin.rotations import random_rotations

SliceFn = Callable[..., torch.Tensor]


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(
    method: SliceFn, L: int, n: int, disc: bool, dtype: torch.dtype
) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(L, L, L, generator=g, dtype=dtype).requires_grad_()
    rot = random_rotations(n, generator=g, dtype=dtype).requires_grad_()
    freqs = disc_frequencies(L, dtype=dtype) if disc else None

    def run() -> None:
        vol.grad = None
        rot.grad = None
        out = method(vol, rot, frequencies=freqs)
        out.square().sum().backward()

    return run


def _insert_via_grid_sample_backward(
    slices: torch.Tensor, rot: torch.Tensor, L: int
) -> torch.Tensor:
    """The same adjoint through ATen's fused grid_sample backward kernel in every dtype (the
    path ``insert_central_slices`` leaves for float64 on the CPU), for comparison."""
    freqs = frequency_grid_2d(L, dtype=slices.dtype).reshape(L * L, 2)
    return _insert_by_kernel(slices.reshape(1, -1, L * L), rot, freqs, L)[0]


def _split_table(repeats: int, dtype: torch.dtype) -> None:
    """One call against the split, side by side, for a batch of 64 slices on the disc."""
    print("| L | step | one call (ms) | split (ms) | chunks | one call / split |")
    print("|---|---|---:|---:|---:|---:|")
    for L in (64, 128):
        g = torch.Generator().manual_seed(2)
        vol = torch.randn(L, L, L, generator=g, dtype=dtype)
        rot = random_rotations(64, generator=g, dtype=dtype)
        freqs = disc_frequencies(L, dtype=dtype)
        values = torch.randn(64, freqs.shape[0], generator=g, dtype=dtype)

        def step(volume_grad: bool, v: torch.Tensor = vol, r: torch.Tensor = rot,
                 f: torch.Tensor = freqs) -> Callable[[], None]:
            def run() -> None:
                vv = v.detach().requires_grad_(volume_grad)
                rr = r.detach().requires_grad_()
                extract_central_slices(vv, rr, frequencies=f).square().sum().backward()
            return run

        runs = {
            "volume step (fwd + bwd)": step(True),
            "pose step (fwd + bwd)": step(False),
            "insertion": lambda r=rot, f=freqs, v=values, n=L: insert_central_slices(
                v, r, n, frequencies=f),
        }
        points = 64 * freqs.shape[0]
        for name, fn in runs.items():
            writes = name != "pose step (fwd + bwd)"
            chunks = trilinear.point_chunks(L**3, vol.element_size(), points, vol.device,
                                            writes_volume=writes)
            with mock.patch.object(trilinear, "point_chunks", return_value=1):
                t_one = _time(fn, repeats)
            t_split = _time(fn, repeats)
            print(f"| {L} | {name} | {1e3 * t_one:.1f} | {1e3 * t_split:.1f} | {chunks} "
                  f"| {t_one / t_split:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, 3 repeats")
    parser.add_argument("--float64", action="store_true", help="time in float64")
    parser.add_argument("--split", action="store_true",
                        help="only: one grid_sample call against the points split over threads")
    args = parser.parse_args()
    dtype = torch.float64 if args.float64 else torch.float32
    repeats = 3 if args.quick else 7
    if args.split:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}, "
              f"median of {repeats}, capability {torch.backends.cpu.get_cpu_capability()}")
        print()
        _split_table(repeats, dtype)
        return
    sizes = [(64, 448, False), (64, 448, True)]
    if not args.quick:
        sizes += [(32, 448, False), (64, 64, False), (64, 1792, False), (128, 448, False)]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}, "
          f"median of {repeats}")
    print()
    print("| L | slices | points | grid_sample fwd+bwd (s) | gather fwd+bwd (s) "
          "| gather / grid_sample |")
    print("|---|---|---|---|---|---|")
    for L, n, disc in sizes:
        t_gs = _time(_fwd_bwd(extract_central_slices, L, n, disc, dtype), repeats)
        t_ga = _time(_fwd_bwd(_extract_central_slices_gather, L, n, disc, dtype), repeats)
        points = "disc" if disc else "full"
        print(f"| {L} | {n} | {points} | {t_gs:.4f} | {t_ga:.4f} | {t_ga / t_gs:.2f} |")

    print()
    print("| L | slices | insert_central_slices (s) | s per 1000 slices "
          "| fused grid_sample-backward kernel (s) | ratio |")
    print("|---|---|---|---|---|---|")
    inserts = [(64, 448)] if args.quick else [(64, 448), (64, 10_000)]
    for L, n in inserts:
        g = torch.Generator().manual_seed(1)
        rot = random_rotations(n, generator=g, dtype=dtype)
        slices = torch.randn(n, L, L, generator=g, dtype=dtype)
        reps = 1 if n > 1000 else repeats
        t = _time(lambda: insert_central_slices(slices, rot, L), reps)  # noqa: B023
        t_k = _time(lambda: _insert_via_grid_sample_backward(slices, rot, L), reps)  # noqa: B023
        print(f"| {L} | {n} | {t:.3f} | {1000 * t / n:.1f} | {t_k:.3f} | {t / t_k:.2f} |")


if __name__ == "__main__":
    main()
