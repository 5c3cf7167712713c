"""Shared pytest fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` next to the project; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present on developer machines)")
    return SHARED_DATA


def pytest_configure(config: pytest.Config) -> None:
    """The precision micro-benchmark's cache (``cryospin.train.precision``) goes to a folder of
    this session, never the user's ``~/.cache`` (subprocesses inherit it)."""
    if "CRYOSPIN_TEST_CACHE" not in os.environ:
        os.environ["CRYOSPIN_TEST_CACHE"] = tempfile.mkdtemp(prefix="cryospin-test-cache-")
        os.environ["XDG_CACHE_HOME"] = os.environ["CRYOSPIN_TEST_CACHE"]
