"""A disk that fills up mid-run: one clear line, the last checkpoint intact, ``--resume`` exact.

The runs are subprocesses started through ``_faults.py``: ``OSError(ENOSPC)`` is injected into
the write of the N-th epoch's checkpoint (``os.fsync`` of its temporary file, where delayed
allocation reports a full disk) or map (``mrcfile.new``), or a real ``RLIMIT_FSIZE`` is set in
the middle of the run (SIGXFSZ ignored, so the kernel fails the write with EFBIG). Then:

* exit status 2, no traceback, exactly one ``error:`` line naming the file, the reason ("No
  space left on device" / "File too large"), the last complete epoch and the ``--resume`` hint;
* the previous checkpoint is intact and no temporary file is left;
* ``--resume`` (space freed) finishes, and its map, poses and losses equal an uninterrupted run
  with the same seed bitwise (one CPU thread).

Also: an unwritable output folder is refused before the particles are read, and a raw
``OSError`` from any subcommand is printed as one line.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.atomic import atomic_path
from cryospin.cli.main import main as cli_main
from cryospin.errors import OutputError
from cryospin.io.mrc import read_map
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.rundir import load_checkpoint, read_metrics, save_checkpoint

FAULTS = Path(__file__).with_name("_faults.py")
BOX_PX, N_PARTICLES, EPOCHS = 16, 150, 3
TRAIN = ["--epochs", str(EPOCHS), "--switch-epoch", "1", "--search-epochs", "1",
         "--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "50",
         "--search-rotations", "128", "--search-radius", "3", "--device", "cpu",
         "--threads", "1", "--no-progress", "--seed", "5"]


def run_cryospin(faults: list[dict], argv: list[str]) -> subprocess.CompletedProcess:
    """``cryospin ARGV`` in a subprocess, with ``faults`` injected (see _faults.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(FAULTS), json.dumps(faults), *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed run (log lines aside); no traceback allowed."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("cryospin reconstruct: error: ")
    return lines[0]


def assert_same_as_reference(run: Path, ref: Path) -> None:
    """Map, poses and per-epoch losses equal the uninterrupted run's (tolerance 0)."""
    np.testing.assert_array_equal(read_map(run / "map.mrc")[0], read_map(ref / "map.mrc")[0])
    for a, b in zip(read_cryodrgn_poses(run / "poses.pkl", BOX_PX),
                    read_cryodrgn_poses(ref / "poses.pkl", BOX_PX), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    rows = [(r["epoch"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]
    assert rows == [(r["epoch"], r["loss"]) for r in read_metrics(ref / "metrics.jsonl")]
    assert [r[0] for r in rows] == list(range(1, EPOCHS + 1))
    assert not [p.name for p in run.iterdir() if ".tmp." in p.name]


def fail_then_resume(particles: Path, reference: Path, run: Path, fault: dict,
                     *, failed_file: str, reason: str, last_epoch: int) -> str:
    """Run with ``fault``; check the stop and the kept checkpoint; resume; compare. Returns the
    line."""
    proc = run_cryospin([fault], ["reconstruct", str(particles), "-o", str(run), *TRAIN])
    line = error_line(proc)
    assert str(run / failed_file) in line
    assert reason.lower() in line.lower()
    assert f"the last complete epoch is {last_epoch}" in line
    assert f"cryospin reconstruct --resume {run}" in line
    # the last good checkpoint is intact, the failed write left nothing behind
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == last_epoch
    assert not [p.name for p in run.iterdir() if ".tmp." in p.name]
    assert not (run / "map.mrc").exists()

    done = run_cryospin([], ["reconstruct", "--resume", str(run)])  # "space freed"
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as_reference(run, reference)
    return line


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    from cryospin.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("sim")
    simulate_dataset("bundled:6vyb", folder, n_particles=N_PARTICLES, box_px=BOX_PX,
                     pixel_size_angstrom=16.0, snr=1.0, seed=2)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def reference(particles, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cryospin([], ["reconstruct", str(particles), "-o", str(run), *TRAIN])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


# ----------------------------------------------------------------------------- runs


def test_disk_full_during_a_checkpoint_write(particles, reference, tmp_path):
    """ENOSPC from fsync of epoch 2's checkpoint: epoch 1's checkpoint is kept and resumed."""
    fault = {"target": "os.fsync", "match": ".checkpoint.pt.tmp", "call": 2,
             "action": "enospc"}
    line = fail_then_resume(particles, reference, tmp_path / "run", fault,
                            failed_file="checkpoint.pt", reason="no space left on device",
                            last_epoch=1)
    assert "free some space" in line


@pytest.mark.slow
def test_disk_full_during_a_map_write(particles, reference, tmp_path):
    """ENOSPC creating epoch 3's map.003.mrc (before its checkpoint): epoch 2 is kept."""
    fault = {"target": "mrcfile.new", "match": "map.003.mrc", "call": 1, "action": "enospc"}
    fail_then_resume(particles, reference, tmp_path / "run", fault,
                     failed_file="map.003.mrc", reason="no space left on device",
                     last_epoch=2)


@pytest.mark.slow
def test_real_file_size_limit_mid_run(particles, reference, tmp_path):
    """A real RLIMIT_FSIZE of 64 KiB from epoch 3 on: maps (17 KiB) fit, the checkpoint does
    not, the kernel fails its write with EFBIG."""
    fault = {"target": "cryospin.train.fit.autodecode_epoch", "call": 2, "action": "fsize",
             "limit": 65536}
    fail_then_resume(particles, reference, tmp_path / "run", fault,
                     failed_file="checkpoint.pt", reason="file too large", last_epoch=2)


# ----------------------------------------------------------------------------- in-process


def test_writer_errors_wrapping_an_os_error_become_one_line(tmp_path):
    """torch.save reports ENOSPC as a RuntimeError whose context is the OSError."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="No space left on device") as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("unexpected pos 576 vs 534") from None
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_checkpoint_under_a_real_file_size_limit(tmp_path):
    """In a subprocess with RLIMIT_FSIZE = 4 KiB: save_checkpoint fails with one clear line."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.zeros(4)})
    code = (
        "import resource, signal, sys, torch\n"
        "from cryospin.errors import OutputError\n"
        "from cryospin.rundir import save_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE,"
        " (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        f"    save_checkpoint({str(path)!r}, {{'epoch': 2, 'w': torch.zeros(10000)}})\n"
        "except OutputError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{path}: write failed (File too large" in proc.stdout
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_unwritable_output_folder_fails_before_the_run(tmp_path):
    """-o under a regular file (and, when not root, a read-only folder): exit 2, one line,
    before the particles are even read (they do not exist here)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [blocker / "run"]
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o555)
        cases.append(readonly / "run")
    for out in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "cryospin.cli.main", "reconstruct",
             str(tmp_path / "missing.star"), "-o", str(out)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        line = error_line(proc)
        assert str(out) in line and "output folder" in line and "missing.star" not in line


def test_raw_os_error_from_a_subcommand_is_one_line(monkeypatch, capsys):
    import cryospin.cli.fsc as fsc

    def disk_full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/fsc.json")

    monkeypatch.setattr(fsc, "main", disk_full)
    assert cli_main(["fsc", "a.mrc", "b.mrc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cryospin fsc: error: /data/fsc.json: No space left on device; "
                   "free some space"]

