"""``RUN_DIR/pose_track.npz``: written every epoch with the documented shapes, stage-2 rows equal
the pose table and poses.star, resume drops entries after the checkpoint, 0 disables it, and
a run with a track is bitwise the run without one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._synthetic import make_dataset

from cryospin.errors import InputError
from cryospin.io.particles import load_particles
from cryospin.rundir import POSE_TRACK, load_checkpoint, read_metrics
from cryospin.train.config import build_config
from cryospin.train.fit import fit
from cryospin.train.track import (
    PoseTrack,
    load_pose_track,
    save_pose_track,
    select_track_indices,
)

N, L, HEADS, TRACKED = 40, 16, 3, 12


def _dataset(folder: Path) -> Path:
    """40 noisy 16 px images of a blob volume with CTF and shifts; returns the folder."""
    make_dataset(folder, box_px=L, n=N, seed=7, max_shift_px=0.5, n_blobs=5, spread_px=7.0,
                 variance_px2=1.5)
    return folder


def _config(**run):
    return build_config("default", {
        "model": {"num_heads": HEADS, "width_multiplier": 0.125, "head_hidden": 16,
                  "precision": "fp32", "predict_shifts": True, "max_shift_px": 2.0},
        "optim": {"batch_size": 20, "search_rotations": 64, "search_radius_px": 3.0},
        "schedule": {"epochs": 3, "switch_epoch": 1},
        "run": {"device": "cpu", "num_threads": 1, "seed": 4, "progress": False,
                "final_map": "decoder", "keep_epoch_maps": False,
                "track_particles": TRACKED, **run},
    })


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("track_data"))


def _particles(folder: Path):
    return load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """3 epochs (1 auto-encoding + 2 auto-decoding), stopped after epoch 1 and resumed; the
    epoch-1 checkpoint and track are kept for the truncation test."""
    run = tmp_path_factory.mktemp("track_run") / "run"
    fit(_config(), _particles(data), run, stop_after=1)
    after1 = load_pose_track(run)
    shutil.copy(run / "checkpoint.pt", run.parent / "checkpoint.epoch1.pt")
    result = fit(_config(), _particles(data), run, resume=True)
    return {"run": run, "result": result, "after1": after1}


def test_track_after_the_first_epoch(full_run):
    t = full_run["after1"]
    assert t.epochs.tolist() == [1]
    assert t.indices.dtype == np.int64 and t.indices.shape == (TRACKED,)
    assert t.rotations.shape == (1, TRACKED, 3, 3) and t.rotations.dtype == np.float32
    assert t.shifts_px.shape == (1, TRACKED, 2)
    assert t.head_rotations.shape == (1, TRACKED, HEADS, 3, 3)
    assert t.head_losses.shape == (1, TRACKED, HEADS)
    assert np.isfinite(t.head_losses).all() and np.isfinite(t.head_rotations).all()
    # the pose of a stage-1 epoch is the best head's
    best = t.head_losses[0].argmin(axis=1)
    np.testing.assert_array_equal(t.rotations[0], t.head_rotations[0, np.arange(TRACKED), best])
    R = t.rotations[0].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)


def test_track_of_the_whole_run(full_run):
    run = full_run["run"]
    t = load_pose_track(run)
    assert t.epochs.tolist() == [1, 2, 3]
    assert t.rotations.shape == (3, TRACKED, 3, 3)
    assert t.head_rotations.shape == (3, TRACKED, HEADS, 3, 3)
    assert t.stage1_mask().tolist() == [True, False, False]
    assert np.isnan(t.head_losses[1:]).all() and np.isnan(t.head_rotations[1:]).all()
    np.testing.assert_array_equal(t.rotations[0], full_run["after1"].rotations[0])
    # stage-2 rows are the pose table of the last checkpoint, and poses.star
    state = load_checkpoint(run / "checkpoint.pt")
    idx = torch.from_numpy(t.indices)
    table_rot = state["pose_table"]["rotations"][idx].numpy()
    table_shift = state["pose_table"]["shifts_px"][idx].numpy()
    np.testing.assert_array_equal(t.rotations[-1], table_rot)
    np.testing.assert_array_equal(t.shifts_px[-1], table_shift)
    star = load_particles(run / "poses.star", metadata_only=True, no_ctf=True)
    np.testing.assert_allclose(t.rotations[-1], star.rotations[idx].numpy(), atol=2e-5)
    np.testing.assert_allclose(t.shifts_px[-1], star.shifts_px[idx].numpy(), atol=1e-4)
    assert not [p for p in run.iterdir() if ".tmp." in p.name]


def test_resume_drops_entries_after_the_checkpoint(full_run, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run["run"], run)
    # as if the run had died after writing epoch 3's track but before its checkpoint... of 1
    shutil.copy(full_run["run"].parent / "checkpoint.epoch1.pt", run / "checkpoint.pt")
    assert load_pose_track(run).epochs.tolist() == [1, 2, 3]
    result = fit(_config(), _particles(data), run, resume=True, stop_after=1)
    assert result.epochs_completed == 1 and not result.finished
    assert load_pose_track(run).epochs.tolist() == [1]  # truncated at once, like metrics
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    fit(_config(), _particles(data), run, resume=True)
    again, ref = load_pose_track(run), load_pose_track(full_run["run"])
    assert again.epochs.tolist() == [1, 2, 3]
    for key in ("indices", "rotations", "shifts_px", "head_rotations", "head_losses"):
        np.testing.assert_array_equal(getattr(again, key), getattr(ref, key), err_msg=key)


def test_disabled_with_zero_and_training_unchanged(full_run, data, tmp_path):
    run = tmp_path / "run"
    fit(_config(track_particles=0), _particles(data), run)
    assert not (run / POSE_TRACK).exists()
    # the track draws no random number: the same run without it is bitwise identical
    a = load_checkpoint(run / "checkpoint.pt")
    b = load_checkpoint(full_run["run"] / "checkpoint.pt")
    for key in ("mantissa", "exponent"):
        assert torch.equal(a["volume"][key], b["volume"][key]), key
    for key in ("rotations", "shifts_px"):
        assert torch.equal(a["pose_table"][key], b["pose_table"][key]), key
    with pytest.raises(InputError, match="no pose track"):
        load_pose_track(run)


def test_select_track_indices():
    a = select_track_indices(1000, 50, seed=3)
    assert a.dtype == np.int64 and a.shape == (50,)
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, select_track_indices(1000, 50, seed=3))
    assert not np.array_equal(a, select_track_indices(1000, 50, seed=4))
    np.testing.assert_array_equal(select_track_indices(7, 512, seed=0), np.arange(7))
    assert select_track_indices(7, 0, seed=0).shape == (0,)
    g = torch.get_rng_state()
    select_track_indices(100, 10, seed=1)
    assert torch.equal(g, torch.get_rng_state())


def test_config_rejects_negative_track():
    with pytest.raises(InputError, match="track_particles"):
        _config(track_particles=-1)


def test_round_trip_and_bad_file(tmp_path):
    t = PoseTrack.empty(np.array([2, 5]), 4)
    save_pose_track(tmp_path / POSE_TRACK, t)
    back = load_pose_track(tmp_path)
    assert back.head_losses.shape == (0, 2, 4) and back.indices.tolist() == [2, 5]
    np.savez(tmp_path / "bad.npz", indices=np.arange(3), epochs=np.arange(1),
             rotations=np.zeros((1, 2, 3, 3)), shifts_px=np.zeros((1, 3, 2)),
             head_rotations=np.zeros((1, 3, 1, 3, 3)), head_losses=np.zeros((1, 3, 1)))
    with pytest.raises(InputError, match="rotations"):
        load_pose_track(tmp_path / "bad.npz")
