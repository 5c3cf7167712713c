"""The fault harness (``_faults.py``) replaces functions only with stand-ins that take the real
function's parameters: a stand-in that drifted from the code it replaces fails loudly."""

from __future__ import annotations

import os
from types import SimpleNamespace

import _faults  # tests/integration/_faults.py
import pytest

import cryospin.cli.reconstruct as reconstruct


def test_the_report_stand_in_takes_the_real_parameters() -> None:
    owner = SimpleNamespace(_write_report=reconstruct._write_report)
    _faults._replace(owner, "_write_report", _faults._no_report)
    assert owner._write_report is _faults._no_report


@pytest.mark.parametrize("stand_in", [lambda run_dir: None,  # the old one: no ``halves=``
                                      lambda run_dir, **kw: None,
                                      lambda run_dir, *, halves=True: None])
def test_a_stand_in_with_other_parameters_is_refused(stand_in) -> None:
    owner = SimpleNamespace(_write_report=reconstruct._write_report)
    with pytest.raises(SystemExit, match="stand-in for _write_report"):
        _faults._replace(owner, "_write_report", stand_in)
    assert owner._write_report is reconstruct._write_report  # left as it was


def test_the_fault_wrapper_shows_the_real_signature(monkeypatch) -> None:
    """``_install``'s wrapper passes every argument on, so it passes the check."""
    monkeypatch.setattr(os, "fsync", os.fsync)  # restored after the test
    _faults._install({"target": "os.fsync", "match": "never-matches", "action": "kill"})
    assert _faults._parameters(os.fsync) is not None  # os.fsync(fd) has a signature
    assert _faults._parameters(os.fsync) == \
        _faults._parameters(os.fsync.__wrapped__)
