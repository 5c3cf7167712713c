"""The switch's multi-hypothesis refinement, offline, on a finished run's switch.

For the tracked particles of a ``paper-synthetic``-style run (``pose_track.npz``: every head's
pose and NLL per stage-1 epoch), refines each particle's K lowest-NLL heads against the map of
the switch epoch (``map.NNN.mrc``, held fixed) with :func:`cryospin.train.hypotheses.
refine_hypotheses` for each setting given, keeps the best of each, and prints the median error
against the truth (modulo ``--symmetry``), the shares within 10° and 20° and the time. Also
prints, per error bin at the switch, how many of the run's own particles ended within 5°
(the local basin: what a switch has to hand over)::

    python benchmarks/bench_switch_hypotheses.py RUN --data D7_64 --switch-epoch 16 \\
        --symmetry D7 --settings 1,20,full 7,20,full 7,40,12
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

from cryospin.evaluate.pose_error import pose_error
from cryospin.io.mrc import read_map
from cryospin.io.particles import load_particles
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.train.autoencode import HeadPoses
from cryospin.train.config import build_config
from cryospin.train.data import prepare_data
from cryospin.train.hypotheses import HypothesisSettings, refine_hypotheses
from cryospin.train.track import load_pose_track
from cryospin.volume import HartleyVolume

BINS_DEG = (0, 5, 10, 15, 20, 30, 45, 90, 180)


def _errors(rot: np.ndarray, gt: np.ndarray, symmetry: str | None) -> np.ndarray:
    return pose_error(rot.astype("float64"), gt, symmetry=symmetry).rotation_error_deg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True, help="simulated set (gt_poses.pkl)")
    p.add_argument("--switch-epoch", type=int, required=True, help="the last stage-1 epoch")
    p.add_argument("--symmetry", default=None)
    p.add_argument("--settings", nargs="+", default=["1,20,full", "7,40,12"],
                   help="K,steps,radius (cycles/box or 'full')")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    track = load_pose_track(a.run)
    epochs = track.epochs.tolist()
    i, last = epochs.index(a.switch_epoch), len(epochs) - 1
    box = int(read_map(a.data / "gt.mrc")[0].shape[0])
    gt = read_cryodrgn_poses(a.data / "gt_poses.pkl", box)[0][track.indices].numpy()
    start, end = _errors(track.rotations[i], gt, a.symmetry), _errors(track.rotations[last], gt,
                                                                      a.symmetry)
    print(f"## {a.run}: switch after epoch {a.switch_epoch}, end epoch {epochs[last]}\n")
    print("| error at the switch | share | ends within 5° |\n|---|---:|---:|")
    for lo, hi in zip(BINS_DEG[:-1], BINS_DEG[1:], strict=True):
        m = (start >= lo) & (start < hi)
        if m.any():
            print(f"| {lo}–{hi}° | {100 * m.mean():.1f} % | {100 * (end[m] < 5).mean():.1f} % |")
    particles = load_particles(a.data / "particles.star")
    data = prepare_data(particles, dataclasses.replace(build_config("paper-synthetic").data,
                                                       max_preload_gb=1e9))
    vol = torch.from_numpy(read_map(a.run / f"map.{a.switch_epoch:03d}.mrc")[0].copy())
    volume_ht = HartleyVolume.from_real_space(vol.double()).float()().detach()
    rot = torch.from_numpy(track.head_rotations[i]).float()  # (n, M, 3, 3)
    loss = torch.from_numpy(track.head_losses[i]).float()  # (n, M)
    order, rows = loss.argsort(dim=1), torch.arange(rot.shape[0])[:, None]
    idx = torch.from_numpy(track.indices).long()
    print("\n| hypotheses | steps | disc (cycles/box) | median (°) | within 10° | within 20° | s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for setting in a.settings:
        k_txt, steps_txt, radius_txt = setting.split(",")
        o = order[:, :int(k_txt)]
        radius = None if radius_txt == "full" else float(radius_txt)
        t0 = time.perf_counter()
        best = refine_hypotheses(volume_ht, HeadPoses(rot[rows, o], None, o, loss[rows, o]),
                                 data, idx, HypothesisSettings(int(steps_txt), radius, 0.05,
                                                               0.05, None, 32))
        err = _errors(best.rotations.numpy(), gt, a.symmetry)
        print(f"| {k_txt} | {steps_txt} | {radius_txt} | {np.median(err):.2f} | "
              f"{100 * (err < 10).mean():.1f} % | {100 * (err < 20).mean():.1f} % | "
              f"{time.perf_counter() - t0:.1f} |")
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
