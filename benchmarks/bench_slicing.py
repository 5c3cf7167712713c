"""Benchmark central-slice extraction: forward + backward time, grid_sample vs explicit gathers.

Prints a Markdown table. Both methods compute the same trilinear slices of one real (Hartley)
volume; the backward pass computes gradients with respect to the volume and the rotations
(as in autodecoding). Also times the adjoint ``insert_central_slices`` (backprojection).

Usage::

    python benchmarks/bench_slicing.py            # full set of sizes
    python benchmarks/bench_slicing.py --quick    # two sizes, fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, 3 repeats")
    parser.add_argument("--float64", action="store_true", help="time in float64")
    args = parser.parse_args()
    dtype = torch.float64 if args.float64 else torch.float32
    repeats = 3 if args.quick else 7
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
