"""Atomic output files: complete or absent, never half-written; ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cryospin.atomic import atomic_path, atomic_write_text
from cryospin.errors import OutputError


def test_atomic_write_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left


def test_atomic_files_get_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        target = tmp_path / "map.txt"
        atomic_write_text(target, "x")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(umask)


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "file.txt"
    with pytest.raises(OutputError, match="cannot write here"):
        atomic_write_text(missing, "x")
