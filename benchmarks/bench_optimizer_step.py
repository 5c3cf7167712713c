"""What a training step costs after its backward pass: the finite-gradient guard and the Adam
update of the encoder and the volume, the previous implementation (baseline) side by side.

Baseline: ``isfinite().all()`` on every gradient tensor and :class:`torch.optim.Adam` with its
defaults (on the CPU a loop of element-wise operations per tensor). Now:
:func:`cryospin.train.metrics.check_finite_gradients` (finite sums prove finite tensors) and
:func:`cryospin.train.optimizer.adam` (fused where the device has the kernel). Parameters are a
preset's stage-1 encoder and the ``--box`` volume (mantissa and exponent grids); gradients are
random, as only their count matters. Milliseconds per step (best of ``--repeats`` rounds of
``--steps``), the two implementations interleaved.

    python benchmarks/bench_optimizer_step.py --preset paper-synthetic --box 64 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from cryospin.train.config import build_config  # noqa: E402
from cryospin.train.metrics import check_finite_gradients  # noqa: E402
from cryospin.train.optimizer import adam  # noqa: E402
from cryospin.train.state import build_encoder  # noqa: E402
from cryospin.volume import HartleyVolume  # noqa: E402


def _params(preset: str, box_px: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    encoder = build_encoder(build_config(preset), box_px, torch.device("cpu"), None)
    volume = HartleyVolume.ab_initio(box_px, torch.ones(box_px // 2 + 1))
    params = [*encoder.parameters(), *volume.parameters()]
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _baseline_check(params: list[torch.nn.Parameter]) -> bool:
    return bool(torch.stack([torch.isfinite(p.grad).all() for p in params
                             if p.grad is not None]).all())


def _time(fn: Callable[[], object], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="paper-synthetic")
    p.add_argument("--box", type=int, default=64, help="the images' box, px")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    base_params, new_params = _params(args.preset, args.box), _params(args.preset, args.box)
    base_opt = torch.optim.Adam(base_params, lr=1e-6)
    new_opt = adam(new_params, lr=1e-6)
    rows: dict[str, Callable[[], object]] = {
        "finite-gradient guard, baseline": lambda: _baseline_check(base_params),
        "finite-gradient guard, now": lambda: check_finite_gradients(
            {"encoder": (q.grad for q in new_params)}, "autoencode", 1, 1),
        "Adam step, baseline": base_opt.step,
        "Adam step, now": new_opt.step,
    }
    best = {name: float("inf") for name in rows}
    for fn in rows.values():
        fn()  # warm-up: allocations, moments
    for _ in range(args.repeats):
        for name, fn in rows.items():
            best[name] = min(best[name], _time(fn, args.steps))

    count = sum(q.numel() for q in new_params)
    print(f"preset {args.preset}, box {args.box} px: {count / 1e6:.2f} M parameters "
          f"(encoder + volume), fused Adam: {new_opt.param_groups[0]['fused']}; "
          f"{machine_line()}\n")
    print("| part of the step | baseline (ms) | now (ms) | baseline / now |")
    print("|---|---:|---:|---:|")
    for part in ("finite-gradient guard", "Adam step"):
        b, n = best[f"{part}, baseline"] * 1e3, best[f"{part}, now"] * 1e3
        print(f"| {part} | {b:.1f} | {n:.1f} | {b / n:.1f}x |")
    total_b = (best["finite-gradient guard, baseline"] + best["Adam step, baseline"]) * 1e3
    total_n = (best["finite-gradient guard, now"] + best["Adam step, now"]) * 1e3
    print(f"| both | {total_b:.1f} | {total_n:.1f} | {total_b / total_n:.1f}x |")
    print(f"\n    python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
