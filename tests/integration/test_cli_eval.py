"""`cryospin fsc`, `cryospin pose-error` and `cryospin backproject` end to end at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.cli.main import main
from cryospin.evaluate.pose_error import flip_hand
from cryospin.io.mrc import read_map, write_map
from cryospin.io.pkl import write_cryodrgn_poses
from cryospin.rotations import random_rotations

L, APIX, N = 16, 5.0, 80


def _blob_map(L: int) -> torch.Tensor:
    c = torch.arange(L, dtype=torch.float64) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(L, L, L, dtype=torch.float64)
    for (mx, my, mz), s in [((2, 0, 0), 1.5), ((-2, 1, 1), 1.2), ((0, -3, 2), 1.0),
                            ((1, 2, -2), 1.3)]:
        vol += torch.exp(-((x - mx) ** 2 + (y - my) ** 2 + (z - mz) ** 2) / (2 * s * s))
    return vol


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    from cryospin.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("sim")
    write_map(root / "blob.mrc", _blob_map(L).numpy(), APIX)
    simulate_dataset(root / "blob.mrc", root / "data", n_particles=N, box_px=L,
                     pixel_size_angstrom=APIX, snr=float("inf"), shift_std_px=1.0, seed=0)
    return root / "data"


def test_backproject_then_fsc(sim: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bp"
    assert main(["backproject", str(sim / "particles.star"), "-o", str(out),
                 "--batch-size", "32", "--seed", "1"]) == 0
    assert "half-map resolution" in capsys.readouterr().out
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc", "fsc.json"):
        assert (out / name).is_file()
    vol, apix = read_map(out / "map.mrc")
    assert vol.shape == (L, L, L) and apix == pytest.approx(APIX)
    data = json.loads((out / "fsc.json").read_text())
    assert data["n_particles"] == N and sum(data["half_sizes"]) == N
    # against the ground truth
    js, png = tmp_path / "fsc.json", tmp_path / "fsc.png"
    assert main(["fsc", str(sim / "gt.mrc"), str(out / "map.mrc"), "-o", str(js),
                 "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "at 0.143" in text
    res = json.loads(js.read_text())
    assert np.min(res["fsc"][: L // 2 - 1]) > 0.9  # noise-free data with known poses
    assert res["resolution_0.143_angstrom"] == pytest.approx(2 * APIX, rel=0.2)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_backproject_with_pkl_poses(sim: Path, tmp_path: Path) -> None:
    out = tmp_path / "bp"
    assert main(["backproject", str(sim / "particles.mrcs"), "--poses", str(sim / "gt_poses.pkl"),
                 "--no-ctf", "-o", str(out)]) == 0
    # the simulated stack has a CTF that is now ignored: worse, but still the same structure
    a, _ = read_map(out / "map.mrc")
    assert np.isfinite(a).all()


def test_backproject_warns_when_the_poses_make_dependent_halves(sim: Path, tmp_path: Path,
                                                                  caplog) -> None:
    """--poses (refined on all particles, as far as cryospin can tell) → one warning line and
    ``independent_halves: false``; the particles' own poses of unknown origin → neither; the
    poses.star of a --halves run whose split is used → no warning, a different split → one."""
    import logging
    import shutil

    from cryospin.cli.backproject import DEPENDENT_HALVES_WARNING

    def run(argv: list[str], out: Path) -> tuple[list[str], dict]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main([*argv, "-o", str(out)]) == 0
        lines = [r.getMessage() for r in caplog.records
                 if DEPENDENT_HALVES_WARNING in r.getMessage()]
        return lines, json.loads((out / "fsc.json").read_text())

    lines, data = run(["backproject", str(sim / "particles.star"), "--poses",
                       str(sim / "gt_poses.pkl")], tmp_path / "a")
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "overestimates the resolution" in lines[0] and "--halves" in lines[0]
    assert data["independent_halves"] is False and data["warning"] == DEPENDENT_HALVES_WARNING

    lines, data = run(["backproject", str(sim / "particles.star")], tmp_path / "b")
    assert lines == [] and data["independent_halves"] is True and "warning" not in data

    # a --halves run folder: poses.star with rlnRandomSubset, half_set.npy, halves.json
    halves = tmp_path / "halves_run"
    halves.mkdir()
    shutil.copy(sim / "particles.star", halves / "poses.star")
    subset = load_particles_subset(sim / "particles.star")
    np.save(halves / "half_set.npy", subset)
    (halves / "halves.json").write_text("{}")
    lines, data = run(["backproject", str(sim / "particles.star"), "--poses",
                       str(halves / "poses.star")], tmp_path / "c")
    assert lines == [] and data["independent_halves"] is True
    np.save(halves / "half_set.npy", 3 - subset)  # not the split backprojected
    lines, data = run(["backproject", str(sim / "particles.star"), "--poses",
                       str(halves / "poses.star")], tmp_path / "d")
    assert len(lines) == 1 and data["independent_halves"] is False
    # a plain run's poses.star given as PARTICLES (config.yaml + metrics.jsonl beside it)
    plain = tmp_path / "plain_run"
    plain.mkdir()
    shutil.copy(sim / "particles.star", plain / "poses.star")
    (plain / "config.yaml").write_text("{}")
    (plain / "metrics.jsonl").write_text("")
    lines, _ = run(["backproject", str(plain / "poses.star"), "--datadir", str(sim)],
                   tmp_path / "e")
    assert len(lines) == 1


def load_particles_subset(star: Path) -> np.ndarray:
    from cryospin.io.particles import load_particles

    subset = load_particles(star, metadata_only=True).random_subset
    assert subset is not None and set(np.unique(subset).tolist()) == {1, 2}
    return np.asarray(subset, dtype=np.int64)


def test_fsc_align_recovers_rotated_mirrored_map(tmp_path: Path) -> None:
    from cryospin.evaluate.align import mirror_map
    from cryospin.forward.rigid import transform_map

    vol = _blob_map(L)
    Q = random_rotations(1, generator=torch.Generator().manual_seed(3))[0]
    moved = transform_map(mirror_map(vol), Q, torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    write_map(tmp_path / "a.mrc", vol.numpy(), APIX)
    write_map(tmp_path / "b.mrc", moved.numpy(), APIX)
    js = tmp_path / "f.json"
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "--align",
                 "-o", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["alignment"]["flipped"] is True
    assert res["fsc"][4] > 0.95  # without alignment the maps barely correlate
    assert main(["fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", str(js)]) == 0
    assert json.loads(js.read_text())["fsc"][4] < 0.8


def test_pose_error_pkl_vs_star(sim: Path, tmp_path: Path, capsys) -> None:
    from cryospin.io.particles import load_particles

    ps = load_particles(sim / "particles.star", check_finite=False)
    Q = random_rotations(1, generator=torch.Generator().manual_seed(4))[0]
    pred = tmp_path / "pred.pkl"
    write_cryodrgn_poses(pred, flip_hand(ps.rotations) @ Q.T, ps.shifts_px, L)
    js = tmp_path / "e.json"
    assert main(["pose-error", str(pred), str(sim / "particles.star"), "-o", str(js)]) == 0
    assert "median" in capsys.readouterr().out
    res = json.loads(js.read_text())
    assert res["flipped"] is True and res["n_particles"] == N
    assert res["median_rotation_error_deg"] < 1e-4
    assert res["median_shift_error_px"] < 1e-4
    # without the flip the error is large
    assert main(["pose-error", str(pred), str(sim / "particles.star"), "--no-flip",
                 "-o", str(js)]) == 0
    assert json.loads(js.read_text())["median_rotation_error_deg"] > 20


def test_mirrored_rotated_poses_reconstruct_the_mirrored_rotated_map(sim: Path,
                                                                    tmp_path: Path) -> None:
    """Poses D R D Qᵀ explain the data with the map V(D Qᵀ r): backprojecting with them and
    aligning onto the truth finds the mirror hand and the rotation D Qᵀ D."""
    from cryospin.evaluate.pose_error import HAND_FLIP
    from cryospin.io.particles import load_particles
    from cryospin.rotations import geodesic_distance_deg

    ps = load_particles(sim / "particles.star", check_finite=False)
    Q = random_rotations(1, generator=torch.Generator().manual_seed(8))[0]
    poses = tmp_path / "mirrored.pkl"
    write_cryodrgn_poses(poses, flip_hand(ps.rotations) @ Q.T, ps.shifts_px, L)
    out = tmp_path / "bp"
    assert main(["backproject", str(sim / "particles.star"), "--poses", str(poses),
                 "-o", str(out)]) == 0
    js = tmp_path / "f.json"
    assert main(["fsc", str(sim / "gt.mrc"), str(out / "map.mrc"), "--align", "-o", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["alignment"]["flipped"] is True
    D = HAND_FLIP
    Qa = torch.tensor(res["alignment"]["rotation"], dtype=torch.float64)
    assert float(geodesic_distance_deg(Qa, D @ Q.T @ D)) < 2.0
    assert np.min(res["fsc"][: L // 2 - 1]) > 0.8


@pytest.mark.parametrize(
    "argv",
    [
        ["fsc", "{tmp}/missing_a.mrc", "{tmp}/missing_b.mrc"],
        ["pose-error", "{tmp}/missing.star", "{tmp}/missing.pkl"],
        ["backproject", "{tmp}/missing.star", "-o", "{tmp}/out"],
    ],
)
def test_missing_file_exit_code_2(argv: list[str], tmp_path: Path, capsys) -> None:
    status = main([a.format(tmp=tmp_path) for a in argv])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err and "missing" in err
