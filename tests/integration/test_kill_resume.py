"""SIGKILL ``cryospin reconstruct`` anywhere; ``--resume`` finishes the run exactly.

Each run is a subprocess started through ``_faults.py``, which replaces one function (``os.fsync``
of the checkpoint's temporary file, ``torch.save``, the switch, a batch's loss, ...) by one that
SIGKILLs the process at its N-th call -- no test hooks in the production code. After every kill:

* the checkpoint on disk is complete and loads (the previous one, when the kill hit its write);
* ``--resume`` succeeds and repeats at most the epoch that was in progress (its first epoch is
  ``checkpoint epoch + 1`` and no logged -- i.e. committed -- epoch is lost);
* temporary files left by the kill are removed, ``metrics.jsonl`` ends with one complete line
  per epoch, each epoch once;
* the final ``map.mrc``, ``poses.pkl`` and every epoch's loss equal those of an uninterrupted
  run with the same seed **bitwise** (tolerance 0: one CPU thread, same operations in the same
  order, all RNG states restored).

The default suite runs one kill (inside the checkpoint write) and one SIGTERM (handled like
Ctrl-C: exit 143, the checkpoint of the last complete epoch kept); the chain of every kill point
and the random-time kills are marked slow.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cryospin.io.mrc import read_map
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.rundir import load_checkpoint, read_metrics

FAULTS = Path(__file__).with_name("_faults.py")
BOX_PX, N_PARTICLES = 16, 200
EPOCHS = 3  # 1 auto-encoding epoch, the switch, 1 search epoch, 1 local epoch
TRAIN = ["--epochs", str(EPOCHS), "--switch-epoch", "1", "--search-epochs", "1",
         "--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "50",
         "--search-rotations", "128", "--search-radius", "3", "--device", "cpu",
         "--threads", "1", "--no-progress", "--seed", "11"]
REFERENCE_TRAIN_S = [0.0]  # set by the reference fixture
_LOGGED_EPOCH = re.compile(r"epoch (\d+)/\d+ \w+: loss")


def run_cryospin(faults: list[dict], argv: list[str], *, timeout: float = 300.0,
                 kill_after_s: float | None = None) -> subprocess.CompletedProcess:
    """``cryospin reconstruct ARGV`` in a subprocess with ``faults`` injected (see _faults.py).

    ``kill_after_s``: SIGKILL the process from outside this many seconds after it starts
    training (its "preprocessing" log line), wherever it is then. The result has an extra
    attribute ``train_s``: seconds from that line to the exit (None if never reached).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(FAULTS), json.dumps(faults), "reconstruct", *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    timer = threading.Timer(timeout, proc.kill)  # a hung run fails the test, never blocks it
    timer.start()
    head = []
    started = None
    try:
        for line in proc.stderr:  # up to the start of training
            head.append(line)
            if "INFO preprocessing" in line:
                started = time.perf_counter()
                break
        killer = None
        if kill_after_s is not None and started is not None:
            killer = threading.Timer(kill_after_s, proc.send_signal, (signal.SIGKILL,))
            killer.start()
        out, err = proc.communicate()
        if killer is not None:
            killer.cancel()
    finally:
        timer.cancel()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(head) + err)
    result.train_s = None if started is None else time.perf_counter() - started
    return result


def logged_epochs(proc: subprocess.CompletedProcess) -> list[int]:
    """Epochs the process reported complete (logged after their checkpoint was committed)."""
    return [int(m) for m in _LOGGED_EPOCH.findall(proc.stderr)]


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if ".tmp." in p.name)


def checkpoint_epoch(run: Path) -> int:
    """Epoch of the checkpoint on disk (0 when there is none); it must load."""
    if not (run / "checkpoint.pt").exists():
        return 0
    return int(load_checkpoint(run / "checkpoint.pt")["epoch"])


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def assert_clean_metrics(run: Path, epochs: int) -> None:
    """One complete JSON line per epoch 1..epochs, each once, newline-terminated."""
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, epochs + 1))


def resume(run: Path, faults: list[dict] | None = None,
           **kwargs) -> subprocess.CompletedProcess:
    """``--resume`` the run; checks that it repeats at most the epoch that was in progress."""
    before = checkpoint_epoch(run)
    proc = run_cryospin(faults or [], ["--resume", str(run)], **kwargs)
    epochs = logged_epochs(proc)
    if epochs:  # the first epoch run is the one after the checkpoint
        assert epochs[0] == before + 1, (before, epochs)
    return proc


def assert_same_as_reference(run: Path, ref: Path) -> None:
    """Map, poses and per-epoch losses equal the uninterrupted run's, bitwise."""
    np.testing.assert_array_equal(read_map(run / "map.mrc")[0], read_map(ref / "map.mrc")[0])
    rot, shift = read_cryodrgn_poses(run / "poses.pkl", BOX_PX)
    rot_ref, shift_ref = read_cryodrgn_poses(ref / "poses.pkl", BOX_PX)
    assert rot.shape == (N_PARTICLES, 3, 3)
    np.testing.assert_array_equal(rot.numpy(), rot_ref.numpy())
    np.testing.assert_array_equal(shift.numpy(), shift_ref.numpy())
    losses = [(r["epoch"], r["stage"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]
    ref_losses = [(r["epoch"], r["stage"], r["loss"])
                  for r in read_metrics(ref / "metrics.jsonl")]
    assert losses == ref_losses
    assert temporaries(run) == []


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    """200 simulated particles of the bundled 6VYB, 16 px, CTF, SNR 1."""
    from cryospin.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("sim")
    simulate_dataset("bundled:6vyb", folder, n_particles=N_PARTICLES, box_px=BOX_PX,
                     pixel_size_angstrom=16.0, snr=1.0, seed=0)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def reference(particles, tmp_path_factory) -> Path:
    """The uninterrupted run (same wrapper, no fault)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cryospin([], [str(particles), "-o", str(run), *TRAIN])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_epochs(proc) == [1, 2, 3]
    REFERENCE_TRAIN_S[0] = proc.train_s
    return run


# ----------------------------------------------------------------------------- default suite


def test_kill_inside_the_checkpoint_write_then_resume_equals_uninterrupted(
    particles, reference, tmp_path
):
    """SIGKILL after the epoch-2 checkpoint is written to its temporary file, before rename."""
    run = tmp_path / "run"
    fault = {"target": "os.fsync", "match": ".checkpoint.pt.tmp", "call": 2, "action": "kill"}
    proc = run_cryospin([fault], [str(particles), "-o", str(run), *TRAIN])
    assert_killed(proc)
    assert logged_epochs(proc) == [1]
    # the previous checkpoint is intact; the killed write left only a temporary file
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["stage"]) == (1, "autoencode")
    assert [t.split(".tmp.")[0] for t in temporaries(run)] == [".checkpoint.pt"]
    # epoch 2's metrics line was committed before its checkpoint: resume must drop it
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]

    done = resume(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_epochs(done) == [2, 3]  # only the epoch in progress is repeated
    assert_clean_metrics(run, EPOCHS)
    assert_same_as_reference(run, reference)


def test_sigterm_mid_epoch_exits_143_then_resume_equals_uninterrupted(particles, reference,
                                                                      tmp_path):
    """SIGTERM from outside during epoch 2 (a batch scheduler's time limit, ``kill``) takes
    Ctrl-C's path: exit 143, the ``--resume`` command on stderr, epoch 1's checkpoint kept."""
    run, marker = tmp_path / "run", tmp_path / "in-epoch-2"
    # epoch 2's second pose step waits, so that the signal surely lands inside epoch 2
    pause = {"target": "cryospin.train.autodecode.pose_nll", "call": 2, "action": "pause",
             "marker": str(marker), "seconds": 120}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(FAULTS), json.dumps([pause]), "reconstruct", str(particles),
           "-o", str(run), *TRAIN]
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), (proc.poll(), (tmp_path / "stderr").read_text()[-3000:])
            # epoch 1 is complete (metrics line and checkpoint), epoch 2 is in progress
            assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read()
    assert status == 143, (status, stderr[-3000:])
    assert "terminated (SIGTERM)" in stderr
    assert f"--resume {run}" in stderr
    assert "Traceback" not in stderr
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["stage"]) == (1, "autoencode")
    assert temporaries(run) == []
    assert not (run / "map.mrc").exists()

    done = resume(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_epochs(done) == [2, 3]
    assert_clean_metrics(run, EPOCHS)
    assert_same_as_reference(run, reference)


# ----------------------------------------------------------------------------- slow: every point


@pytest.mark.slow
def test_chain_of_kills_at_every_kind_of_point(particles, reference, tmp_path):
    """One run killed seven times in a row, each at another point; the 8th start finishes."""
    run = tmp_path / "run"
    chain = [
        # (where, fault, checkpoint epoch expected after the kill)
        ("first checkpoint, before torch.save writes",
         {"target": "torch.save", "call": 1, "action": "kill"}, 0),
        ("epoch 1, batch 2 (stage 1; no checkpoint yet)",
         {"target": "cryospin.train.autoencode.winner_nll", "call": 2, "action": "kill"}, 0),
        ("the switch (inference pass, before the pose table exists)",
         {"target": "cryospin.train.fit.switch_poses", "call": 1, "action": "kill"}, 1),
        ("epoch 2, stage-2 pose step 7",
         {"target": "cryospin.train.autodecode.pose_nll", "call": 7, "action": "kill"}, 1),
        ("after epoch 3's metrics line, before its checkpoint",
         {"target": "os.replace", "match": "metrics.jsonl", "call": 3,
          "action": "kill_after"}, 2),
        ("inside epoch 3's checkpoint write (fsync of the temporary file)",
         {"target": "os.fsync", "match": ".checkpoint.pt.tmp", "call": 1, "action": "kill"},
         2),
        ("writing the final outputs (all epochs checkpointed)",
         {"target": "cryospin.train.fit.write_final", "call": 1, "action": "kill"}, 3),
    ]
    for i, (where, fault, expected_epoch) in enumerate(chain):
        if i == 0:
            proc = run_cryospin([fault], [str(particles), "-o", str(run), *TRAIN])
        else:
            proc = resume(run, [fault])
        assert_killed(proc)
        assert checkpoint_epoch(run) == expected_epoch, where
        assert (run / "config.yaml").is_file()
        assert not (run / "map.mrc").exists(), where
    done = resume(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_epochs(done) == []  # nothing to repeat: only the final outputs were missing
    assert_clean_metrics(run, EPOCHS)
    assert_same_as_reference(run, reference)


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_then_resume_starts_over(particles, reference,
                                                                  tmp_path):
    """Killed inside epoch 1's checkpoint write: no checkpoint, but ``--resume`` still works."""
    run = tmp_path / "run"
    fault = {"target": "os.replace", "match": "checkpoint.pt", "call": 1, "action": "kill"}
    assert_killed(run_cryospin([fault], [str(particles), "-o", str(run), *TRAIN]))
    assert not (run / "checkpoint.pt").exists()
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    done = resume(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_epochs(done) == [1, 2, 3]
    assert_clean_metrics(run, EPOCHS)
    assert_same_as_reference(run, reference)


@pytest.mark.slow
def test_kills_at_random_times(particles, reference, tmp_path):
    """SIGKILL from outside at random moments of training (uniform over the reference run's
    training time), resuming each time; after 8 kills one last resume runs to the end."""
    rng = random.Random(7)
    run = tmp_path / "run"
    train_s = REFERENCE_TRAIN_S[0]
    hits = []
    for attempt in range(9):
        delay = None if attempt == 8 else rng.uniform(0.0, train_s)
        if (run / "config.yaml").is_file():
            proc = resume(run, kill_after_s=delay)
        else:  # killed before config.yaml: nothing to resume, the first command is rerun
            proc = run_cryospin([], [str(particles), "-o", str(run), *TRAIN],
                                kill_after_s=delay)
        if proc.returncode == 0:
            break
        assert_killed(proc)
        hits.append((round(delay, 2), checkpoint_epoch(run), logged_epochs(proc),
                     bool(temporaries(run))))
        # no committed epoch is ever lost; the checkpoint on disk always loads
        assert checkpoint_epoch(run) >= max(logged_epochs(proc), default=0)
    print(f"\nreference training {train_s:.2f} s; kills (delay s, checkpoint epoch after, "
          f"epochs logged by the killed process, temporary file left): {hits}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean_metrics(run, EPOCHS)
    assert_same_as_reference(run, reference)


# ----------------------------------------------------------------------------- in-process pieces


def test_resume_drops_later_and_half_written_metrics_lines(tmp_path):
    from cryospin.errors import InputError
    from cryospin.rundir import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": e, "loss": 1.0 / e}) for e in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"epoch": 4, "lo')  # cut by a non-atomic copy
    truncate_metrics(path, 2)
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2]
    assert path.read_text().endswith("}\n")
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")  # not at the end: refused
    with pytest.raises(InputError, match="line 2 is not JSON"):
        truncate_metrics(path, 2)


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    from cryospin.atomic import atomic_path, remove_stale_temporaries

    keep = ["checkpoint.pt", "map.001.mrc", ".hidden", "notes.tmp.txt", "metrics.jsonl"]
    for name in keep:
        (tmp_path / name).write_text("x")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "map.002.mrc") as tmp:
        stale = tmp.with_name(tmp.name.replace("map.002", "checkpoint"))
        stale.write_text("half")  # what a kill inside atomic_path leaves behind
        raise RuntimeError
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
