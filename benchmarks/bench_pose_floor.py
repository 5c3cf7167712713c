"""How accurate can the `default` preset's local epochs keep the poses on this data? Local
refinement started at the answer.

On a `cryospin simulate` set (true poses known) the pose table starts at the true rotations
and the volume at the oracle map (the Wiener backprojection from the true poses,
`cryospin.train.outputs.final_backprojection`, in the training's own units: noise whitened as
the preset does). Then the preset's local epochs run as they do after a global search that
stopped after `--search-stopped-after` (the same learning rates, pose steps, batch and pose-step
disc; `cryospin.train.autodecode.autodecode_epoch`; float32, no empty or junk class). The
median rotation error after each epoch is the floor the local epochs hold on this data: an ab
initio run that ends near it is limited by the data, one far above it by the search.

With `--start RUN` the local epochs start instead from a run's checkpoint (e.g. one stopped at
the end of its search, `cryospin reconstruct ... --stop-after E`): its poses and its volume,
or with `--rebackproject` the Wiener backprojection from its poses (errors measured after the
global alignment to the truth; a fresh Adam state for the volume in both cases).

    python benchmarks/bench_pose_floor.py --data SPIKE_128_COL --search-stopped-after 7
    python benchmarks/bench_pose_floor.py --data SPIKE_128_COL --start RUN [--rebackproject]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from cryospin.evaluate.pose_error import pose_error  # noqa: E402
from cryospin.io.particles import load_particles  # noqa: E402
from cryospin.pose import PoseTable  # noqa: E402
from cryospin.report.inputs import read_poses  # noqa: E402
from cryospin.rundir import Checkpoint, RunFiles  # noqa: E402
from cryospin.train.autodecode import autodecode_epoch, local_refine_disc  # noqa: E402
from cryospin.train.config import build_config  # noqa: E402
from cryospin.train.data import prepare_data  # noqa: E402
from cryospin.train.optimizer import adam  # noqa: E402
from cryospin.train.outputs import final_backprojection  # noqa: E402
from cryospin.train.schedule import stage2_decoder_lr, stage2_pose_lrs  # noqa: E402
from cryospin.volume import HartleyVolume  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="a `cryospin simulate` folder (particles.star with the true poses)")
    p.add_argument("--search-stopped-after", type=int, default=5,
                   help="the epoch after which the search stopped (sets the learning rates)")
    p.add_argument("--start", type=Path, default=None,
                   help="a run folder: start from its checkpoint's poses and volume")
    p.add_argument("--rebackproject", action="store_true",
                   help="with --start: the volume is the backprojection from its poses")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = build_config("default")
    s = config.schedule
    local_epochs = s.epochs - s.switch_epoch - s.search_epochs
    particles = load_particles(args.data / "particles.star")
    data = prepare_data(particles, dataclasses.replace(config.data, max_preload_gb=1e9))
    truth, _ = read_poses(args.data / "particles.star", int(particles.box_px))
    truth = torch.as_tensor(np.asarray(truth), dtype=torch.float32)
    start, stopped = truth, args.search_stopped_after
    volume = None
    if args.start is not None:
        ckpt = Checkpoint.load(RunFiles(args.start).checkpoint)
        assert ckpt.pose_table is not None, "the run has not switched yet"
        start = PoseTable.from_state_dict(ckpt.pose_table).rotations.detach().float()
        stopped = ckpt.search_stopped_after or ckpt.epoch
        if not args.rebackproject:
            volume = HartleyVolume(data.box_px, init_scale=0.0)
            volume.load_state_dict(ckpt.volume)
    if volume is None:
        volume = HartleyVolume.from_real_space(
            final_backprojection(particles, data, start, None).double()).float()
    poses = PoseTable(start.clone(), lr_rot=config.optim.pose_lr)
    optimizer = adam(volume.parameters(), config.optim.decoder_lr_after_switch)
    disc = local_refine_disc(config, data)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.data}: {len(data)} particles, box {data.box_px} px, whitened: "
          f"{data.noise_spectrum is not None}; the pose steps on "
          f"{'the training disc' if disc is None else f'{disc.radius_px:.3g} cycles/box'}; "
          f"{machine_line()}\n")
    print("| epoch | volume lr | rotation lr | median rotation error | within 10° | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    err = pose_error(start, truth).rotation_error_deg
    what = ("true poses, oracle map" if args.start is None else
            f"{args.start.name}'s poses after epoch {stopped}, "
            + ("their backprojection" if args.rebackproject else "its volume"))
    print(f"| start ({what}) | | | {np.median(err):.2f}° | {100 * np.mean(err < 10):.1f} % | |")
    for k in range(local_epochs):
        epoch = stopped + 1 + k
        lr_volume = stage2_decoder_lr(config, epoch, stopped)
        for group in optimizer.param_groups:
            group["lr"] = lr_volume
        poses.lr_rot, poses.lr_shift = stage2_pose_lrs(config, epoch, stopped)
        t0 = time.perf_counter()
        autodecode_epoch(volume, poses, data, optimizer, batch_size=config.optim.batch_size,
                         pose_steps=config.optim.pose_steps_per_batch, refine_shifts=False,
                         generator=generator, epoch=epoch, refine_disc=disc)
        seconds = time.perf_counter() - t0
        err = pose_error(poses.rotations.detach(), truth).rotation_error_deg
        print(f"| {epoch} | {lr_volume:.3g} | {poses.lr_rot:.3g} | {np.median(err):.2f}° | "
              f"{100 * np.mean(err < 10):.1f} % | {seconds:.0f} |")


if __name__ == "__main__":
    main()
