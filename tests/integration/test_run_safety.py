"""Run-folder safety (issue "What a new user hit"): one process per output folder, ``--resume``
only with the run's own particles, no silent overwrite by ``simulate``/``backproject``, and no
3D map trained on as if its sections were particle images.

Every refusal: exit status 2, one line on stderr, no traceback, and nothing written or
overwritten in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._synthetic import ctf_params

from cryospin.cli.main import main
from cryospin.forward.ctf import CTFParams
from cryospin.io.mrc import write_map, write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.runlock import LOCK_NAME, folder_lock

FAULTS = Path(__file__).with_name("_faults.py")
BOX, N, PIXEL = 16, 40, 4.0
TRAIN = ["--epochs", "2", "--switch-epoch", "1", "--search-epochs", "1", "--heads", "2",
         "--width", "0.125", "--no-bf16", "--batch-size", "20", "--search-rotations", "64",
         "--search-radius", "3", "--device", "cpu", "--threads", "1", "--no-progress",
         "--seed", "3"]


# ----------------------------------------------------------------------------- helpers


def _ctf(n: int) -> CTFParams:
    return ctf_params(torch.linspace(8000.0, 15000.0, n, dtype=torch.float64))


def _dataset(folder: Path, *, n: int = N, box: int = BOX, seed: int = 0,
             name: str = "particles.mrcs") -> list[str]:
    """A stack of ``n`` noise images and its ctf.pkl in ``folder``; the reconstruct arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    write_stack(folder / name, images, PIXEL)
    write_cryodrgn_ctf(folder / "ctf.pkl", _ctf(n), box, PIXEL)
    return [str(folder / name), "--ctf", str(folder / "ctf.pkl")]


def _blob_map(path: Path, L: int = BOX) -> Path:
    c = np.arange(L) - L // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = (np.exp(-((x - 2) ** 2 + y**2 + z**2) / 4.0)
           + np.exp(-((x + 2) ** 2 + (y - 1) ** 2 + (z + 1) ** 2) / 3.0))
    write_map(path, vol.astype(np.float32), PIXEL)
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) -> hash of its bytes and its mtime."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != LOCK_NAME:
            out[str(p.relative_to(folder))] = (
                hashlib.sha256(p.read_bytes()).hexdigest() + f" {p.stat().st_mtime_ns}")
    return out


def _expect_refusal(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    """Run ``cryospin ARGV``: status 2 and exactly one line on stderr, holding ``needles``."""
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run report (matplotlib, seconds) is not what these tests are about."""
    import cryospin.cli.reconstruct as reconstruct

    monkeypatch.setattr(reconstruct, "_write_report", lambda run_dir, **kw: None)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A run on 40 particles of 16 px stopped after epoch 1 (never modified by the tests)."""
    root = tmp_path_factory.mktemp("stopped")
    data = _dataset(root / "data")
    run = root / "run"
    assert main(["reconstruct", *data, "-o", str(run), *TRAIN, "--stop-after", "1"]) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "particle_set.json").is_file()
    return run, data


# ----------------------------------------------------------------------------- the lock


def test_second_run_into_a_busy_folder_is_refused(tmp_path: Path, capsys, no_report) -> None:
    data = _dataset(tmp_path / "data")
    run, marker = tmp_path / "run", tmp_path / "paused"
    faults = [{"target": "cryospin.train.fit._fit_on_device", "action": "pause",
               "marker": str(marker), "seconds": 300}]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:  # the first run holds RUN, then pauses
        first = subprocess.Popen([sys.executable, str(FAULTS), json.dumps(faults),
                                  "reconstruct", *data, "-o", str(run), *TRAIN],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first run never reached its pause"
            time.sleep(0.1)
        before = _snapshot(run)
        _expect_refusal(["reconstruct", *data, "-o", str(run), *TRAIN], capsys,
                        f"{run}: in use by another cryospin process (PID {first.pid}: "
                        "cryospin reconstruct ", "wait for it or choose another -o")
        assert _snapshot(run) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    # the kernel released the killed run's lock: no stale lock, the same command now runs
    assert main(["reconstruct", *data, "-o", str(run), *TRAIN]) == 0
    assert (run / "map.mrc").is_file()
    with folder_lock(run):  # and released again at its end
        pass


# ----------------------------------------------------------------------------- --resume


def test_resume_with_other_particles_is_refused(stopped_run, tmp_path: Path, capsys) -> None:
    run, _ = stopped_run
    before = _snapshot(run)
    cases = [  # (particles, what the line names)
        (_dataset(tmp_path / "fewer", n=25), ["count 25 vs 40"]),
        (_dataset(tmp_path / "other_pixels", seed=7), ["(pixels of the first/last image)"]),
        (_dataset(tmp_path / "box", box=12), ["box 12 vs 16 px"]),
    ]
    renamed = tmp_path / "renamed"  # the very same images, in a stack of another name
    renamed.mkdir()
    shutil.copy(stopped_run[1][0], renamed / "other.mrcs")
    cases.append(([str(renamed / "other.mrcs"), "--ctf", stopped_run[1][2]], ["(image names)"]))
    for data, needles in cases:
        _expect_refusal(["reconstruct", *data, "--resume", str(run)], capsys,
                        f"{run}: these are not the particles the run started with", *needles,
                        "start a new run with -o")
        assert _snapshot(run) == before  # config.yaml, checkpoint, metrics untouched
    assert not (run / "poses.star").exists()


def test_resume_with_the_same_particles_moved(stopped_run, tmp_path: Path, no_report) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    moved = tmp_path / "moved"
    shutil.copytree(Path(stopped_run[1][0]).parent, moved)
    assert main(["reconstruct", str(moved / "particles.mrcs"), "--ctf", str(moved / "ctf.pkl"),
                 "--resume", str(run)]) == 0
    assert (run / "poses.star").is_file() and (run / "map.mrc").is_file()


def test_old_run_without_a_record_resumes_with_a_warning(stopped_run, tmp_path: Path,
                                                         caplog, no_report) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    (run / "particle_set.json").unlink()  # as written before cryospin recorded the particles
    assert main(["reconstruct", "--resume", str(run)]) == 0
    assert "records no particle set" in caplog.text
    assert json.loads((run / "particle_set.json").read_text())["num_particles"] == N


def test_halves_resume_with_other_particles_is_refused(tmp_path: Path, capsys) -> None:
    data = _dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["reconstruct", *data, "-o", str(run), "--halves", *TRAIN,
                 "--stop-after", "1"]) == 0
    before = _snapshot(run)
    _expect_refusal(["reconstruct", *_dataset(tmp_path / "fewer", n=30), "--resume", str(run)],
                    capsys, "these are not the particles the run started with",
                    "count 30 vs 40")
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------- folders


def test_simulate_refuses_a_folder_that_holds_files(tmp_path: Path, capsys) -> None:
    structure = _blob_map(tmp_path / "blob.mrc")
    sim = tmp_path / "sim"
    argv = ["simulate", str(structure), "-o", str(sim), "--box", str(BOX), "--pixel-size",
            str(PIXEL), "--seed", "0", "--no-progress"]
    assert main([*argv, "--n-particles", "12"]) == 0
    capsys.readouterr()
    before = _snapshot(sim)
    _expect_refusal([*argv, "--n-particles", "10"], capsys, f"{sim}: not empty", "--force")
    assert _snapshot(sim) == before
    assert main([*argv, "--n-particles", "10", "--force"]) == 0
    assert len(load_particles(sim / "particles.star", check_finite=False)) == 10
    # a failure in a new folder leaves no folder behind
    _expect_refusal([*argv[:3], str(tmp_path / "new"), "--box", "2", "--pixel-size", "1",
                     "--n-particles", "3"], capsys, "--box")
    assert not (tmp_path / "new").exists()


def test_backproject_refuses_a_folder_that_holds_files(tmp_path: Path, capsys) -> None:
    structure = _blob_map(tmp_path / "blob.mrc")
    sim = tmp_path / "sim"
    assert main(["simulate", str(structure), "-o", str(sim), "--n-particles", "24", "--box",
                 str(BOX), "--pixel-size", str(PIXEL), "--snr", "inf", "--no-progress"]) == 0
    bp = tmp_path / "bp"
    argv = ["backproject", str(sim / "particles.star"), "-o", str(bp), "--batch-size", "8"]
    assert main(argv) == 0
    capsys.readouterr()
    before = _snapshot(bp)
    _expect_refusal(argv, capsys, f"{bp}: not empty", "--force")
    assert _snapshot(bp) == before
    assert main([*argv, "--force"]) == 0
    assert (bp / "map.mrc").stat().st_mtime_ns > 0


# ----------------------------------------------------------------------------- a 3D map


def test_a_map_given_as_particles_is_refused(tmp_path: Path, capsys) -> None:
    volume = _blob_map(tmp_path / "map.mrc")
    run = tmp_path / "run"
    _expect_refusal(["reconstruct", str(volume), "--no-ctf", "-o", str(run), *TRAIN], capsys,
                    f"{volume}: looks like a 3D map (space group 1, 16³), not a particle "
                    "stack; pass the particles' .mrcs/.star")
    assert not run.exists() or _snapshot(run) == {}
    _expect_refusal(["backproject", str(volume), "--no-ctf", "-o", str(tmp_path / "bp")],
                    capsys, "looks like a 3D map")
    assert not (tmp_path / "bp").exists()
