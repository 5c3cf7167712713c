"""SIGTERM is handled like Ctrl-C by ``cryospin``'s entry point (exit 143 instead of 130).

The whole path through a training run (checkpoint kept, ``--resume`` equal to an uninterrupted
run) is tested in tests/integration/test_kill_resume.py; here: the handler, in-process.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from types import SimpleNamespace

import pytest

from cryospin.cli import main as cli_main
from cryospin.errors import Terminated
from cryospin.train.fit import TrainingInterrupted


def _fake_command(monkeypatch: pytest.MonkeyPatch, run) -> None:
    """Make ``cryospin work`` call ``run(args)``."""
    parser = argparse.ArgumentParser(prog="cryospin")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_subparsers(dest="command").add_parser("work")
    monkeypatch.setattr(cli_main, "_build_parser",
                        lambda: (parser, {"work": SimpleNamespace(main=run)}))


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler raises Terminated in here
    raise AssertionError("SIGTERM did not interrupt the command")


def test_sigterm_exits_143_and_restores_the_previous_handler(monkeypatch, capsys):
    seen = []

    def run(args):
        seen.append(signal.getsignal(signal.SIGTERM))
        try:
            _sigterm_self()
        finally:  # a second SIGTERM while the first unwinds (Slurm + torchrun) is ignored
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)

    _fake_command(monkeypatch, run)
    before = signal.getsignal(signal.SIGTERM)
    assert cli_main.main(["work"]) == 143
    assert seen and seen[0] is not before  # installed while the command runs
    assert signal.getsignal(signal.SIGTERM) is before  # restored after
    assert "cryospin work: terminated (SIGTERM)" in capsys.readouterr().err


def test_ctrl_c_still_exits_130(monkeypatch, capsys):
    def run(args):
        raise KeyboardInterrupt

    _fake_command(monkeypatch, run)
    assert cli_main.main(["work"]) == 130
    assert "cryospin work: interrupted" in capsys.readouterr().err


def test_no_sigterm_no_change(monkeypatch):
    _fake_command(monkeypatch, lambda args: 0)
    before = signal.getsignal(signal.SIGTERM)
    assert cli_main.main(["work"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_training_interrupted_by_sigterm_names_resume_and_exits_143(tmp_path):
    exc = TrainingInterrupted(tmp_path, 3, terminated=True)
    assert isinstance(exc, KeyboardInterrupt)
    assert exc.exit_status == Terminated.exit_status == 143
    assert str(exc).startswith("terminated (SIGTERM); the last complete epoch is 3")
    assert f"cryospin reconstruct --resume {tmp_path}" in str(exc)
    ctrl_c = TrainingInterrupted(tmp_path, 3)
    assert ctrl_c.exit_status == 130 and str(ctrl_c).startswith("interrupted")
