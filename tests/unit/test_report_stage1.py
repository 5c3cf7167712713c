"""Stage-1 diagnostics of the report, on synthetic run folders (no training).

From ``metrics.jsonl``: each head's spread and usage per stage-1 epoch (table, figure, summary).
From ``pose_track.npz`` and ground-truth poses: per epoch the winner's, view-direction,
in-plane and best-of-heads median errors, checked against values computed here by hand on a
track where one head is exactly the truth and the winning head is not.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.evaluate.pose_error import flip_hand, pose_error
from cryospin.io.mrc import write_map
from cryospin.io.star import relion_euler_from_rotation
from cryospin.report import write_report
from cryospin.report.analysis import RANDOM_SPREAD_DEG, head_spread_table, head_usage_table
from cryospin.report.figures import plot_head_usage, plot_track_errors
from cryospin.report.ground_truth import track_error_rows, track_errors
from cryospin.rotations import random_rotations
from cryospin.rundir import POSE_TRACK
from cryospin.train.track import PoseTrack, save_pose_track

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the report's figures need matplotlib (pip install 'cryospin[report]')",
)

N, M = 40, 3
EXACT = 16  # particles whose winning head is exact at epoch 2; the others are 40° off in-plane
IN_PLANE_DEG = 40.0


# ----------------------------------------------------------------------------- metrics
def _metrics(*, spread: bool = True) -> list[dict]:
    """Two stage-1 epochs (the second with a null spread for head 3), then one stage-2 epoch
    that records the switch pass."""
    rows: list[dict] = [
        {"epoch": 1, "stage": "autoencode", "loss": 5.0, "num_images": N, "wall_time_s": 2.0,
         "images_per_s": 20.0, "head_usage": [0.5, 0.3, 0.2], "elapsed_s": 2.0,
         "head_spread_deg": [0.6, 1.5, 3.0]},
        {"epoch": 2, "stage": "autoencode", "loss": 4.0, "num_images": N, "wall_time_s": 2.0,
         "images_per_s": 20.0, "head_usage": [0.2, 0.7, 0.1], "elapsed_s": 4.0,
         "head_spread_deg": [60.0, 131.0, None]},
        {"epoch": 3, "stage": "autodecode", "loss": 3.0, "num_images": N, "wall_time_s": 1.0,
         "images_per_s": 40.0, "head_usage": [0.25, 0.6, 0.15], "elapsed_s": 5.0,
         "head_spread_deg": None, "mean_pose_change_deg": 2.0,
         "extra": {"switch": {"head_usage": [0.25, 0.6, 0.15]}}},
    ]
    if not spread:
        for r in rows:
            r.pop("head_spread_deg")
    return rows


def test_head_spread_table() -> None:
    epochs, table = head_spread_table(_metrics())
    assert epochs == [1, 2]  # stage 2 (null) is not a row
    np.testing.assert_array_equal(table, [[0.6, 1.5, 3.0], [60.0, 131.0, np.nan]])
    epochs, table = head_spread_table(_metrics(spread=False))  # an older metrics file
    assert epochs == [] and table.shape == (0, 0)
    labels, usage = head_usage_table(_metrics(spread=False))  # unchanged for old files
    assert labels == ["1", "2", "switch"] and usage.shape == (3, 3)
    # the random level: median angle between two Haar-random rotations
    g = torch.Generator().manual_seed(0)
    a, b = random_rotations(20_000, generator=g), random_rotations(20_000, generator=g)
    cos = ((a.transpose(-1, -2) @ b).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    assert float(np.degrees(np.median(np.arccos(cos.clamp(-1, 1).numpy())))) == pytest.approx(
        RANDOM_SPREAD_DEG, abs=1.0)


def _png_height(path: Path) -> int:
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and float(img[..., :3].std()) > 0.01  # not blank
    return int(img.shape[0])


@needs_matplotlib
def test_head_figure_panels(tmp_path: Path) -> None:
    both, usage_only = tmp_path / "both.png", tmp_path / "usage.png"
    spread_only = tmp_path / "spread.png"
    plot_head_usage(_metrics(), both)
    plot_head_usage(_metrics(spread=False), usage_only)  # an older run: usage only
    no_usage = [{k: v for k, v in r.items() if k not in ("head_usage", "extra")}
                for r in _metrics()]
    plot_head_usage(no_usage, spread_only)
    h_both, h_usage, h_spread = map(_png_height, (both, usage_only, spread_only))
    assert h_both > 1.5 * h_usage and h_both > 1.5 * h_spread  # two panels against one
    stage2 = [{k: v for k, v in r.items() if k != "extra"} for r in _metrics()
              if r["stage"] == "autodecode"]  # no stage-1 epoch, no switch pass
    with pytest.raises(ValueError, match="no head usage"):
        plot_head_usage(stage2, both)


# ----------------------------------------------------------------------------- pose track
def _rz(deg: np.ndarray) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    out = np.zeros((deg.shape[0], 3, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1], out[:, 2, 2] = c, -s, s, c, 1.0
    return out


def _synthetic(flipped: bool) -> tuple[np.ndarray, np.ndarray, PoseTrack]:
    """Ground truth `(N, 3, 3)`, its image in the run's frame, and a 3-epoch track of all
    particles: epoch 1 random heads (head 3 wins); epoch 2 head 1 exact, head 2 (the winner)
    exact for EXACT particles and ±40° in-plane off for the others, head 3 random; epoch 3
    (stage 2) exact poses."""
    g = torch.Generator().manual_seed(5)
    gt = random_rotations(N, generator=g)
    A = random_rotations(1, generator=g)[0]
    truth = ((flip_hand(gt) if flipped else gt) @ A).numpy()  # the run's frame
    signs = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    alpha = np.where(np.arange(N) < EXACT, 0.0, IN_PLANE_DEG * signs)
    # Rz(α) R keeps the third row (view direction) and turns the image in its plane by α
    off = _rz(alpha) @ truth
    heads = np.empty((3, N, M, 3, 3))
    heads[0] = np.stack([random_rotations(N, generator=g).numpy() for _ in range(M)], axis=1)
    heads[1] = np.stack([truth, off, random_rotations(N, generator=g).numpy()], axis=1)
    heads[2] = np.nan
    losses = np.zeros((3, N, M))
    losses[2] = np.nan
    track = PoseTrack(
        indices=np.arange(N, dtype=np.int64), epochs=np.array([1, 2, 3], dtype=np.int64),
        rotations=np.stack([heads[0][:, 2], off, truth]).astype(np.float32),
        shifts_px=np.zeros((3, N, 2), np.float32),
        head_rotations=heads.astype(np.float32), head_losses=losses.astype(np.float32))
    return gt.numpy(), truth, track


def _by_hand(track: PoseTrack, gt: np.ndarray, row: int) -> dict:
    """The expected summary numbers of track row ``row``: alignment by the evaluator, then
    the angles of the heads against the aligned ground truth with the trace formula."""
    winner = track.rotations[row].astype(np.float64)
    result = pose_error(winner, gt)
    ref = (flip_hand(torch.from_numpy(gt)) if result.flipped else torch.from_numpy(gt)).numpy()
    ref = ref @ result.alignment
    heads = track.head_rotations[row].astype(np.float64)  # (N, M, 3, 3)
    trace = np.einsum("kmij,kij->km", heads, ref)  # trace(H_kmᵀ ref_k)
    angles = np.degrees(np.arccos(np.clip((trace - 1) / 2, -1, 1)))  # (N, M)
    return {"median_deg": float(np.median(result.rotation_error_deg)),
            "view_median_deg": float(np.median(result.view_direction_error_deg)),
            "in_plane_median_deg": float(np.median(result.in_plane_error_deg)),
            "best_head_median_deg": float(np.median(angles.min(axis=1))),
            "flipped": result.flipped}


@pytest.mark.parametrize("flipped", [False, True])
def test_track_errors_best_of_heads_view_in_plane(flipped: bool) -> None:
    gt, _, track = _synthetic(flipped)
    errors = track_errors(track, gt)
    rows = track_error_rows(errors)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["stage"] for r in rows] == ["autoencode", "autoencode", "autodecode"]
    for row, r in enumerate(rows[:2]):
        expected = _by_hand(track, gt, row)
        assert expected["flipped"] == (flipped and row == 1)  # epoch 1 is noise: either hand
        for key in ("median_deg", "view_median_deg", "in_plane_median_deg",
                    "best_head_median_deg"):
            assert r[key] == pytest.approx(expected[key], abs=1e-4), (row, key)
        assert r["mean_deg"] == pytest.approx(float(np.mean(errors.results[row]
                                                            .rotation_error_deg)))
    # epoch 2: the winner is 40° off in-plane for most particles, head 1 is the truth
    r2 = rows[1]
    assert r2["median_deg"] == pytest.approx(IN_PLANE_DEG, abs=1.0)
    assert r2["in_plane_median_deg"] == pytest.approx(IN_PLANE_DEG, abs=1.0)
    assert r2["view_median_deg"] < 1.0
    assert r2["best_head_median_deg"] < 1.0
    # epoch 1: random heads, the winner no better than the best of them
    assert rows[0]["best_head_median_deg"] <= rows[0]["median_deg"]
    # stage 2: no heads; exact poses
    assert rows[2]["best_head_median_deg"] is None
    assert rows[2]["median_deg"] < 1e-3 and rows[2]["in_plane_median_deg"] < 1e-3
    assert math.isnan(errors.best_head_median_deg[2])


@needs_matplotlib
def test_plot_track_errors(tmp_path: Path) -> None:
    gt, _, track = _synthetic(False)
    plot_track_errors(track_errors(track, gt), tmp_path / "e.png")
    assert _png_height(tmp_path / "e.png") > 100
    stage2_only = PoseTrack(track.indices, track.epochs[2:], track.rotations[2:],
                            track.shifts_px[2:], track.head_rotations[2:],
                            track.head_losses[2:])
    plot_track_errors(track_errors(stage2_only, gt), tmp_path / "s2.png")  # no best-of-heads


# ----------------------------------------------------------------------------- write_report
def _write_star(path: Path, R: np.ndarray) -> None:
    rot, tilt, psi = (a.numpy() for a in relion_euler_from_rotation(torch.from_numpy(R)))
    lines = ["data_optics", "loop_", "_rlnOpticsGroup", "_rlnImagePixelSize", "_rlnImageSize",
             "_rlnVoltage", "_rlnSphericalAberration", "_rlnAmplitudeContrast",
             "1 3.0 8 300 2.7 0.1", "", "data_particles", "loop_", "_rlnImageName",
             "_rlnAngleRot", "_rlnAngleTilt", "_rlnAnglePsi", "_rlnOriginXAngst",
             "_rlnOriginYAngst", "_rlnOpticsGroup"]
    lines += [f"{i + 1}@p.mrcs {a:.12f} {b:.12f} {c:.12f} 0 0 1"
              for i, (a, b, c) in enumerate(zip(rot, tilt, psi, strict=True))]
    path.write_text("\n".join(lines) + "\n")


@needs_matplotlib
def test_write_report_stage1_diagnostics(tmp_path: Path) -> None:
    gt, truth, track = _synthetic(False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics()))
    (run / "config.yaml").write_text("cryospin_version: 0.2.0\n")
    g = torch.Generator().manual_seed(0)
    write_map(run / "map.mrc", torch.rand(8, 8, 8, generator=g).numpy(), 3.0)
    _write_star(run / "poses.star", truth)  # the final poses: the truth in the run's frame
    _write_star(tmp_path / "gt.star", gt)
    save_pose_track(run / POSE_TRACK, track)

    result = write_report(run, gt_poses=tmp_path / "gt.star")
    names = {p.name for p in result.figure_paths}
    assert {"head_usage.png", "rotation_error_epochs.png", "head_errors.png"} <= names
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["stage1_heads"] == [
        {"epoch": 1, "head_usage": [0.5, 0.3, 0.2], "head_spread_deg": [0.6, 1.5, 3.0]},
        {"epoch": 2, "head_usage": [0.2, 0.7, 0.1], "head_spread_deg": [60.0, 131.0, None]},
    ]
    tracked = summary["tracked_rotation_error"]
    assert [r["epoch"] for r in tracked] == [1, 2, 3]
    for row in (0, 1):  # the star round trip costs ~1e-9 of a degree
        expected = _by_hand(track, gt, row)
        for key in ("median_deg", "view_median_deg", "in_plane_median_deg",
                    "best_head_median_deg"):
            assert tracked[row][key] == pytest.approx(expected[key], abs=1e-4), (row, key)
    assert tracked[2]["best_head_median_deg"] is None
    assert {"epoch", "median_deg", "mean_deg"} <= set(tracked[2])  # the older keys remain
    text = result.html_path.read_text(encoding="utf-8")
    assert "Encoder heads (stage 1)" in text and "132°" in text
    assert "head spread across images (epoch 2)" in text and "60°, 131°, –" in text
    assert "best of heads" in text and "tracked particles, last auto-encoding epoch (2)" in text

    # an older run folder: no head_spread_deg, the report still has the usage figure
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _metrics(spread=False)))
    old = write_report(run, output=tmp_path / "old.html")
    assert "head_usage.png" in {p.name for p in old.figure_paths}
    assert "head spread" not in old.html_path.read_text(encoding="utf-8")
