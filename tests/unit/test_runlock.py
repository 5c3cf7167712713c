"""The output-folder lock and the "new or empty" rule (cryospin.runlock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryospin.atomic import remove_stale_temporaries
from cryospin.errors import OutputError
from cryospin.runlock import (
    LOCK_NAME,
    check_output_folder,
    claim_output_folder,
    folder_lock,
    lock_holder,
)

_HOLDER = """
import sys, time
from cryospin.runlock import folder_lock
with folder_lock(sys.argv[1], command="cryospin simulate x -o " + sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until killed (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_records_the_holder_and_is_reentrant(tmp_path: Path) -> None:
    with folder_lock(tmp_path, command="cryospin reconstruct p.star -o run") as path:
        assert path == tmp_path / LOCK_NAME
        assert lock_holder(tmp_path) == f"PID {os.getpid()}: cryospin reconstruct p.star -o run"
        with folder_lock(tmp_path, command="inner"):  # the same process may take it again
            pass
        with folder_lock(tmp_path):  # still held after the inner block
            pass
    with folder_lock(tmp_path):  # released
        pass


def test_second_process_refused_with_pid_then_sigkill_releases(tmp_path: Path) -> None:
    proc = _start_holder(tmp_path)
    try:
        before = (tmp_path / LOCK_NAME).read_bytes()
        with pytest.raises(OutputError) as info:
            with folder_lock(tmp_path, command="second"):
                pytest.fail("the lock was taken twice")
        line = str(info.value)
        assert line == (f"{tmp_path}: in use by another cryospin process (PID {proc.pid}: "
                         f"cryospin simulate x -o {tmp_path}); wait for it or choose another -o")
        assert (tmp_path / LOCK_NAME).read_bytes() == before  # the refused process wrote nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with folder_lock(tmp_path, command="third"):  # the kernel released the dead holder's lock
        assert lock_holder(tmp_path) == f"PID {os.getpid()}: third"


def test_lock_file_is_not_a_stale_temporary(tmp_path: Path) -> None:
    with folder_lock(tmp_path):
        assert remove_stale_temporaries(tmp_path) == []
    assert (tmp_path / LOCK_NAME).is_file()


def test_long_command_is_shortened(tmp_path: Path) -> None:
    with folder_lock(tmp_path, command="cryospin reconstruct " + "x" * 300):
        holder = lock_holder(tmp_path)
    assert holder.endswith(" ...") and len(holder) < 130


def test_check_output_folder(tmp_path: Path) -> None:
    check_output_folder(tmp_path / "new")  # missing: fine
    assert not (tmp_path / "new").exists()
    check_output_folder(tmp_path)  # empty: fine
    with folder_lock(tmp_path):
        pass
    check_output_folder(tmp_path)  # only the lock file: still empty
    (tmp_path / "gt.mrc").write_text("x")
    with pytest.raises(OutputError, match=r"not empty \(1 file, e\.g\. gt\.mrc\).*--force"):
        check_output_folder(tmp_path)
    check_output_folder(tmp_path, force=True)
    with pytest.raises(OutputError, match="not a folder"):
        check_output_folder(tmp_path / "gt.mrc", force=True)


def test_claim_removes_a_folder_it_created_when_the_command_fails(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), claim_output_folder(out):
        assert (out / LOCK_NAME).is_file()
        raise RuntimeError("bad input found late")
    assert not out.exists()
    with claim_output_folder(out):  # success: the folder stays
        (out / "map.mrc").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "map.mrc"]
    with pytest.raises(OutputError, match="--force"), claim_output_folder(out):
        pytest.fail("a non-empty folder was claimed")
    with pytest.raises(RuntimeError), claim_output_folder(out, force=True):
        raise RuntimeError  # a folder it did not create is left alone
    assert (out / "map.mrc").is_file()


def test_claim_refuses_a_folder_in_use(tmp_path: Path) -> None:
    proc = _start_holder(tmp_path)
    try:
        t0 = time.perf_counter()
        with pytest.raises(OutputError, match=f"in use .*PID {proc.pid}"), \
                claim_output_folder(tmp_path, force=True):
            pytest.fail("claimed a folder in use")
        assert time.perf_counter() - t0 < 5  # never waits for the holder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch,
                                                                 caplog) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with folder_lock(tmp_path, command="cryospin simulate"):
        assert lock_holder(tmp_path) == f"PID {os.getpid()}: cryospin simulate"
    assert "does not support locks" in caplog.text
