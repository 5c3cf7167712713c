"""Smoke test on real particle files: every stack under ``shared/data/particles`` goes through
``cryospin reconstruct --box 32`` for 2 epochs (tiny model) and writes its outputs in the
original particles' frame (map at the cropped box and pixel size; poses for every particle).

Skipped when the shared data are absent (``shared_data`` fixture).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cryospin.cli.main import main
from cryospin.io.mrc import read_map
from cryospin.io.particles import load_particles

BOX = 32

STACKS = {
    "empiar10076-star": "empiar10076_7/empiar_10076_7.star",
    "empiar10076-cs": "empiar10076_7/empiar_10076_7.cs",
    "relion31": "relion31_5/relion31.star",
    # RELION 3.1 star with 2 optics groups (different voltages, same pixel size and box)
    "aspire-relion31": "aspire_sample17/sample_particles_relion31.star",
}

TINY = ["--box", str(BOX), "--epochs", "2", "--switch-epoch", "1", "--width", "0.125",
        "--heads", "2", "--threads", "1", "--batch-size", "4", "--no-progress",
        "--no-bf16"]


@pytest.mark.parametrize("name", sorted(STACKS))
def test_reconstruct_real_stack(
    shared_data: Path, tmp_path: Path, name: str, caplog, monkeypatch
) -> None:
    import cryospin.cli.reconstruct as reconstruct

    def no_report(run_dir: Path, *, halves: bool = False) -> None:  # not tested here
        return None

    monkeypatch.setattr(reconstruct, "_write_report", no_report)
    path = shared_data / "particles" / STACKS[name]
    particles = load_particles(path)
    out = tmp_path / "run"
    extra = ["--invert-contrast"] if name.startswith("empiar") else []  # measured dark
    with caplog.at_level(logging.INFO):
        assert main(["reconstruct", str(path), "-o", str(out), *TINY, *extra]) == 0
    assert "contrast check" in caplog.text
    assert "consider" not in caplog.text  # no contrast warning with the right flag

    vol, apix = read_map(out / "map.mrc")
    assert vol.shape == (BOX, BOX, BOX) and np.isfinite(vol).all()
    assert apix == pytest.approx(particles.pixel_size_angstrom * particles.box_px / BOX,
                                 rel=1e-5)
    poses = load_particles(out / "poses.star", datadir=path.parent, metadata_only=True)
    assert len(poses) == len(particles)
    assert poses.box_px == particles.box_px  # written in the original frame
    assert poses.rotations is not None and np.isfinite(poses.rotations.numpy()).all()
    assert poses.shifts_px is not None and np.isfinite(poses.shifts_px.numpy()).all()


def test_contrast_warning_follows_the_flag(shared_data: Path, caplog) -> None:
    """The dark EMPIAR-10076 particles get a WARNING without --invert-contrast, none with it;
    the bright ASPIRE sample gets one only with it."""
    from cryospin.cli.reconstruct import _warn_contrast

    dark = load_particles(shared_data / "particles" / STACKS["empiar10076-star"])
    bright = load_particles(shared_data / "particles" / STACKS["aspire-relion31"])
    for particles, invert, warned in [(dark, False, True), (dark, True, False),
                                      (bright, False, False), (bright, True, True)]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            _warn_contrast(particles, invert)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warnings) == warned, (particles.source, invert, warnings)
        if warned:
            assert ("consider --invert-contrast" if not invert else "consider dropping it") \
                in warnings[0]
