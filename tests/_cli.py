"""The CLI tests' check of a refusal: exit status 2, one line on stderr, no traceback."""

from __future__ import annotations

import pytest

from cryospin.cli.main import main


def refused(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    """``cryospin ARGV`` exits 2 with one line on stderr holding every needle; returns it."""
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err
