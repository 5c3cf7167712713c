"""Throughput of a MultiHeadPoseEncoder training step (forward + backward + Adam), images/s.

Compares float32 with bf16 autocast + channels_last at several widths, with and without batch
normalisation, and prints a Markdown table. Defaults follow the paper's synthetic set-up (64 px,
batch 64, M = 7 heads). The configurations are timed in interleaved rounds and each reports its
best round, which keeps the comparison fair on a machine shared with other jobs.

    python benchmarks/bench_encoder.py [--box-px 64] [--batch 64] [--heads 7] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from cryospin.encoder import MultiHeadPoseEncoder
from cryospin.losses import winner_take_all


def _make_step(
    box_px: int, batch: int, heads: int, width: float, use_bf16: bool, batch_norm: bool
) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc = MultiHeadPoseEncoder(
        box_px, heads, width_multiplier=width, predict_shifts=True, max_shift_px=4.0,
        autocast_dtype=torch.bfloat16 if use_bf16 else None, batch_norm=batch_norm,
    )
    opt = torch.optim.Adam(enc.parameters(), lr=1e-4)
    images = torch.randn(batch, box_px, box_px, generator=gen)
    target = torch.linalg.qr(torch.randn(batch, 3, 3, generator=gen)).Q  # (B, 3, 3)

    def step() -> None:
        out = enc(images)
        loss_bm = (out.rotations - target[:, None]).square().sum((-2, -1))  # (B, M)
        loss_bm = loss_bm + out.shifts_px.square().sum(-1)
        loss, _ = winner_take_all(loss_bm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, oneDNN kernel selection)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box-px", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"box {args.box_px} px, batch {args.batch}, M = {args.heads}; {machine_line()}\n"
    )
    print("| width | batch norm | fp32 (img/s) | bf16 + channels_last (img/s) | speed-up |")
    print("|---:|:---:|---:|---:|---:|")
    for width in args.widths:
        for batch_norm in (True, False):
            steps = {
                bf16: _make_step(args.box_px, args.batch, args.heads, width, bf16, batch_norm)
                for bf16 in (False, True)
            }
            best = dict.fromkeys(steps, math.inf)
            for _ in range(args.rounds):
                for bf16, step in steps.items():
                    start = time.perf_counter()
                    step()
                    best[bf16] = min(best[bf16], time.perf_counter() - start)
            fp32, bf16 = args.batch / best[False], args.batch / best[True]
            print(
                f"| {width:g} | {'yes' if batch_norm else 'no'} | {fp32:.1f} | {bf16:.1f} "
                f"| {bf16 / fp32:.2f}x |",
                flush=True,
            )

if __name__ == "__main__":
    main()
