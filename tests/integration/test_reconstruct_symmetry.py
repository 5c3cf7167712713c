"""``cryospin reconstruct --symmetry`` end to end on a tiny D2 particle (24 px, 300 images).

D2's rotations are signed permutations (2-folds along x, y, z), so a map symmetric on the grid
is equal to its rotated copies to rounding; the run must record the group, train in C1 until
its global search ends (epoch 2), then impose D2 (the step in ``metrics.jsonl`` and the
checkpoint), write a symmetric map (the backprojection and the trained volume) in D2's
conventional frame, one pose per particle, resume across the step to the same map, and refuse
a resume with another group. ``--symmetry auto`` runs the detection at the same point; the
C1 map of this tiny run is too poor for it (D2 scores about 0.1 there), so it keeps C1: the
detection finding D2 is tested on a synthetic map (tests/unit/test_impose_symmetry.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from tests._cli import refused

from cryospin.cli.main import main
from cryospin.io.mrc import read_map
from cryospin.io.particles import load_particles
from cryospin.rundir import Checkpoint, HalvesFiles, read_metrics

N = 300
FLAGS = ["--symmetry", "D2", "--epochs", "4", "--switch-epoch", "1", "--search-epochs", "1",
         "--search-rotations", "1024", "--heads", "2", "--width", "0.125", "--batch-size", "50",
         "--device", "cpu", "--threads", "1", "--precision", "fp32", "--no-progress",
         "--progress-interval", "0"]


@pytest.fixture(scope="module")
def d2_star(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "d2"
    assert main(["simulate", "bundled:6vyb", "--select", "A:330-530", "--symmetry", "D2",
                 "-o", str(out), "--n-particles", str(N), "--box", "24", "--pixel-size", "6",
                 "--snr", "1", "--seed", "0", "--no-progress"]) == 0
    return out / "particles.star"


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _rotated_copies(volume: np.ndarray) -> list[np.ndarray]:
    """The map turned by D2's three 2-folds: ``r -> g r`` negates two of x, y, z; on the
    even grid ``-k`` is index ``(L - i) mod L``."""
    return [np.roll(np.flip(volume, axes), 1, axes) for axes in ((1, 2), (0, 1), (0, 2))]


def _assert_symmetric(path: Path) -> None:
    volume = read_map(path)[0].astype(np.float64)
    for turned in _rotated_copies(volume):
        assert _correlation(volume, turned) >= 0.99, path.name


@pytest.fixture(scope="module")
def d2_run(d2_star: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("d2run") / "run"
    assert main(["reconstruct", str(d2_star), "-o", str(run), *FLAGS]) == 0
    return run


def _symmetry_steps(run: Path) -> list[tuple[int, dict]]:
    """``(epoch, extra["symmetry"])`` of every metrics line that has one."""
    rows = read_metrics(run / "metrics.jsonl")
    return [(row["epoch"], row["extra"]["symmetry"]) for row in rows
            if "symmetry" in (row.get("extra") or {})]


def test_reconstruct_with_symmetry(d2_run: Path, capsys: pytest.CaptureFixture) -> None:
    run = d2_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["symmetry"] == "D2"
    assert config["schedule"]["impose_symmetry"] == "during_search"
    # one search epoch, below the preset's minimum: C1 up to the end of the search (epoch 2),
    # D2 from epoch 3 on
    steps = _symmetry_steps(run)
    assert [e for e, _ in steps] == [3] and steps[0][1]["group"] == "D2"
    assert len(steps[0][1]["rotation"]) == 3 and len(steps[0][1]["centre_px"]) == 3
    assert Checkpoint.load(run / "checkpoint.pt").volume_symmetry == "D2"
    for name in ("map.mrc", "map_decoder.mrc", "map.003.mrc", "map.004.mrc"):
        _assert_symmetric(run / name)
    poses = load_particles(run / "poses.star", metadata_only=True, check_finite=False)
    assert len(poses) == N and poses.rotations is not None
    log = (run / "run.log").read_text()
    assert "symmetry D2 imposed (score" in log and "centre (" in log
    # the group is part of the model: a resume with another one is refused, nothing written
    before = (run / "config.yaml").read_text()
    refused(["reconstruct", "--resume", str(run), "--symmetry", "C4"], capsys, "--symmetry")
    assert (run / "config.yaml").read_text() == before


def test_resume_across_the_step(d2_star: Path, d2_run: Path, tmp_path: Path) -> None:
    """Stopped before the step (C1 checkpoint), then after it (D2 checkpoint), then to the
    end: the step happens once, each resume rebuilds the volume with the checkpoint's group,
    and the maps equal the uninterrupted run's."""
    run = tmp_path / "run"
    assert main(["reconstruct", str(d2_star), "-o", str(run), *FLAGS, "--stop-after", "2"]) == 0
    assert Checkpoint.load(run / "checkpoint.pt").volume_symmetry == "C1"
    assert main(["reconstruct", "--resume", str(run), "--stop-after", "3", "--no-progress",
                 "--progress-interval", "0"]) == 0
    assert Checkpoint.load(run / "checkpoint.pt").volume_symmetry == "D2"
    assert main(["reconstruct", "--resume", str(run), "--no-progress",
                 "--progress-interval", "0"]) == 0
    assert [e for e, _ in _symmetry_steps(run)] == [3]
    for name in ("map.mrc", "map_decoder.mrc"):
        expected = read_map(d2_run / name)[0]
        np.testing.assert_allclose(read_map(run / name)[0], expected, rtol=0,
                                   atol=1e-5 * float(np.abs(expected).max()))


def test_auto_detects_at_the_end_of_the_search(d2_star: Path, tmp_path: Path) -> None:
    run = tmp_path / "auto"
    flags = [f if f != "D2" else "auto" for f in FLAGS]
    assert main(["reconstruct", str(d2_star), "-o", str(run), *flags]) == 0
    steps = _symmetry_steps(run)
    assert [e for e, _ in steps] == [3]  # detected once, after the search
    group = steps[0][1]["group"]
    assert Checkpoint.load(run / "checkpoint.pt").volume_symmetry == group
    if group == "C1":  # too poor a map here (module docstring): C1 goes on
        assert steps[0][1]["score"] == 1.0
        assert "no group found in the map (C1 kept)" in (run / "run.log").read_text()
    else:
        assert group == "D2"
        _assert_symmetric(run / "map.mrc")


def test_halves_with_symmetry(d2_star: Path, tmp_path: Path) -> None:
    run = tmp_path / "halves"
    assert main(["reconstruct", str(d2_star), "-o", str(run), "--halves", *FLAGS]) == 0
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc"):
        _assert_symmetric(run / name)
    poses = load_particles(run / "poses.star", metadata_only=True, check_finite=False)
    assert len(poses) == N
    for half in (1, 2):  # each half imposes D2 in its own run, after its search
        steps = _symmetry_steps(HalvesFiles(run).half_run(half))
        assert [(e, s["group"]) for e, s in steps] == [(3, "D2")], half


def test_impose_from_the_start(d2_star: Path, tmp_path: Path) -> None:
    """``--impose-symmetry start``: the volume is D2 from epoch 1, no step."""
    run = tmp_path / "start"
    assert main(["reconstruct", str(d2_star), "-o", str(run), *FLAGS, "--epochs", "2",
                 "--impose-symmetry", "start"]) == 0
    assert _symmetry_steps(run) == []
    assert Checkpoint.load(run / "checkpoint.pt").volume_symmetry == "D2"
    for name in ("map.001.mrc", "map.mrc"):
        _assert_symmetric(run / name)


def test_bad_symmetry_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    refused(["reconstruct", "p.star", "-o", str(tmp_path / "r"), "--symmetry", "X3"], capsys,
            "--symmetry")
    assert not (tmp_path / "r").exists()


def test_auto_with_halves_is_refused(d2_star: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    refused(["reconstruct", str(d2_star), "-o", str(tmp_path / "h"), "--halves",
             *[f if f != "D2" else "auto" for f in FLAGS]], capsys, "--symmetry auto")
