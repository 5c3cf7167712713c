"""``cryospin reconstruct --symmetry`` end to end on a tiny D2 particle (24 px, 300 images).

D2's rotations are signed permutations (2-folds along x, y, z), so a map symmetric on the grid
is equal to its rotated copies to rounding; the run must record the group, write a symmetric
map (the backprojection and the trained volume), one pose per particle, and refuse a resume
with another group.
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

N = 300
FLAGS = ["--symmetry", "D2", "--epochs", "2", "--switch-epoch", "1", "--search-epochs", "1",
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


def test_reconstruct_with_symmetry(d2_star: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["reconstruct", str(d2_star), "-o", str(run), *FLAGS]) == 0
    capsys.readouterr()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["symmetry"] == "D2"
    for name in ("map.mrc", "map_decoder.mrc", "map.001.mrc"):
        _assert_symmetric(run / name)
    poses = load_particles(run / "poses.star", metadata_only=True, check_finite=False)
    assert len(poses) == N and poses.rotations is not None
    assert "symmetry D2" in (run / "run.log").read_text()
    # the group is part of the model: a resume with another one is refused, nothing written
    before = (run / "config.yaml").read_text()
    refused(["reconstruct", "--resume", str(run), "--symmetry", "C4"], capsys, "--symmetry")
    assert (run / "config.yaml").read_text() == before


def test_halves_with_symmetry(d2_star: Path, tmp_path: Path) -> None:
    run = tmp_path / "halves"
    assert main(["reconstruct", str(d2_star), "-o", str(run), "--halves", *FLAGS]) == 0
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc"):
        _assert_symmetric(run / name)
    poses = load_particles(run / "poses.star", metadata_only=True, check_finite=False)
    assert len(poses) == N


def test_bad_symmetry_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for bad in ("auto", "X3"):
        refused(["reconstruct", "p.star", "-o", str(tmp_path / "r"), "--symmetry", bad], capsys,
                "--symmetry")
    assert not (tmp_path / "r").exists()
