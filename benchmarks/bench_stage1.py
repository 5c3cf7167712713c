"""Where a stage-1 training step spends its time, per batch, against the encoder's input box and
precision, with the all-heads backward (before ``winner_nll``) as the baseline side by side.

For each (encoder box, precision): the encoder's forward + backward alone, the scoring of the
``B × M`` hypotheses without autograd, the winners' render + backward, the whole step with
:func:`cryospin.train.autoencode.winner_nll` and the whole step with every head's slices in
the autograd graph (``predict_nll(...).min``, the baseline). Seconds per batch (best of
``--repeats``) and images/s of the whole step. Real particles from ``--particles`` (the first
``--batch`` images), the ``default`` preset's encoder otherwise.

    python benchmarks/bench_stage1.py --particles DATA/particles.star --boxes 64 32 \\
        --precisions fp32 bf16
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_stage1.py ...
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from cryospin.forward.model import render  # noqa: E402
from cryospin.io.particles import load_particles  # noqa: E402
from cryospin.losses import gaussian_nll  # noqa: E402
from cryospin.train.autoencode import predict_nll, winner_nll  # noqa: E402
from cryospin.train.config import build_config  # noqa: E402
from cryospin.train.data import prepare_data  # noqa: E402
from cryospin.train.precision import autocast_dtype  # noqa: E402
from cryospin.train.state import build_encoder  # noqa: E402
from cryospin.volume import HartleyVolume  # noqa: E402


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--particles", type=Path, required=True)
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 32])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = build_config("default")
    particles = load_particles(args.particles).subset(list(range(args.batch)))
    data = prepare_data(particles, dataclasses.replace(config.data, max_preload_gb=1e9))
    volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu())
    batch = data.batch(torch.arange(args.batch))
    M = config.model.num_heads
    print(f"{args.particles}: box {data.box_px} px, batch {args.batch}, M = {M} heads, width "
          f"{config.model.width_multiplier}; {machine_line()}\n")
    print("| encoder box | precision | encoder fwd+bwd (s) | score B×M, no autograd (s) | "
          "winners render+bwd (s) | step, winners only (s) | step, all heads in graph (s) | "
          "img/s winners only | img/s all heads | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for box in args.boxes:
        for name in args.precisions:
            cfg = dataclasses.replace(config, model=dataclasses.replace(
                config.model, encoder_box_px=box))
            torch.manual_seed(0)
            enc = build_encoder(cfg, data.box_px, torch.device("cpu"), autocast_dtype(name))
            opt = torch.optim.Adam([*enc.parameters(), *volume.parameters()], lr=1e-6)
            rot = enc(batch.images).rotations.detach()  # (B, M, 3, 3)
            ctf = batch.ctf[:, None] if batch.ctf is not None else None

            def enc_only() -> None:
                enc(batch.images).rotations.sum().backward()  # noqa: B023

            def score() -> None:
                with torch.no_grad():
                    pred = render(volume(), rot, None, ctf, frequencies=data.frequencies,  # noqa: B023
                                  negation_index=data.negation_index)
                    gaussian_nll(pred, batch.hartley, data.noise_variance)

            def winners() -> None:
                pred = render(volume(), rot[:, :1], None, ctf, frequencies=data.frequencies,  # noqa: B023
                              negation_index=data.negation_index)
                gaussian_nll(pred, batch.hartley, data.noise_variance).sum().backward()

            def step_winner() -> None:
                nll = winner_nll(enc, volume(), batch, data)[0]  # noqa: B023
                opt.zero_grad()  # noqa: B023
                nll.mean().backward()
                opt.step()  # noqa: B023

            def step_all() -> None:
                nll = predict_nll(enc, volume(), batch, data)[0].min(dim=1).values  # noqa: B023
                opt.zero_grad()  # noqa: B023
                nll.mean().backward()
                opt.step()  # noqa: B023

            t = [_best(f, args.repeats) for f in (enc_only, score, winners, step_winner,
                                                   step_all)]
            rate_w, rate_a = args.batch / t[3], args.batch / t[4]
            print(f"| {min(box, data.box_px)} | {name} | " + " | ".join(f"{x:.3f}" for x in t)
                  + f" | {rate_w:.0f} | {rate_a:.0f} | {rate_w / rate_a:.2f}x |", flush=True)
    print(f"\n    python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
