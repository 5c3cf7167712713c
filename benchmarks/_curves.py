"""Per-epoch curves of a finished run folder, shared by the benchmark scripts.

* :func:`error_curve` — median rotation error of the tracked particles (``pose_track.npz``)
  against the true poses, per epoch (global rotation and hand removed; modulo a point group);
* :func:`fsc_points` — FSC = 0.5 resolution against the ground truth map of a subset of the
  per-epoch maps ``map.NNN.mrc`` (aligned, both hands), cached in the run folder;
* :func:`epoch_subset` — evenly spaced epochs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from _common import read_jsonl

from cryospin.evaluate.align import align_maps
from cryospin.evaluate.fsc import fsc
from cryospin.evaluate.pose_error import pose_error
from cryospin.io.mrc import read_map
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.train.track import load_pose_track

__all__ = ["epoch_subset", "error_curve", "fsc_points"]


def epoch_subset(epochs: list[int], count: int) -> list[int]:
    if count <= 0 or not epochs:
        return []
    if count >= len(epochs):
        return list(epochs)
    picks = {epochs[round(i * (len(epochs) - 1) / (count - 1))] for i in range(count)} \
        if count > 1 else {epochs[-1]}
    return sorted(picks)


def fsc_points(run_dir: Path, gt_path: Path, count: int) -> list[dict[str, float]]:
    """FSC = 0.5 resolution (aligned, both hands) of a subset of per-epoch maps; cached."""
    cache = run_dir / "bench_fig3.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("count") == count:
            return cached["points"]
    metrics = {m["epoch"]: m for m in read_jsonl(run_dir / "metrics.jsonl")}
    gt, pixel = read_map(gt_path)
    gt_t = torch.from_numpy(gt.copy())
    points = []
    for epoch in epoch_subset(sorted(metrics), count):
        path = run_dir / f"map.{epoch:03d}.mrc"
        if not path.exists():
            continue
        vol, _ = read_map(path)
        aligned = align_maps(gt_t, torch.from_numpy(vol.copy())).aligned
        res = fsc(gt_t, aligned, pixel_size_angstrom=pixel).resolution(0.5)
        points.append({"epoch": epoch, "elapsed_s": metrics[epoch]["elapsed_s"],
                       "resolution_angstrom": res, "stage": metrics[epoch]["stage"]})
    cache.write_text(json.dumps({"count": count, "points": points}))
    return points


def error_curve(run_dir: Path, data: Path, box_px: int,
                symmetry: str | None) -> list[tuple[int, float]] | None:
    """(epoch, median rotation error °) of the tracked particles; None without a track."""
    if not (run_dir / "pose_track.npz").exists():
        print(f"note: no pose_track.npz in {run_dir}; no error curve", file=sys.stderr)
        return None
    track = load_pose_track(run_dir)
    gt_rot, _ = read_cryodrgn_poses(data / "gt_poses.pkl", box_px)
    gt = gt_rot[track.indices]
    curve = []
    for e, epoch in enumerate(track.epochs.tolist()):
        res = pose_error(track.rotations[e].astype("float64"), gt, symmetry=symmetry)
        curve.append((int(epoch), float(res.to_dict()["median_rotation_error_deg"])))
    return curve
