"""A run with ``--relax-symmetry`` (:mod:`cryospin.train.relax`): every stage-2 epoch places
the pseudo-symmetry in its map and records it; the run resumes to the uninterrupted result;
the CLI refuses a relaxed group with an imposed one in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests._cli import refused
from tests._synthetic import make_dataset, synthetic_particles

from cryospin.report.analysis import run_summary
from cryospin.report.html import run_summary_rows
from cryospin.rotations import geodesic_distance_deg
from cryospin.rundir import load_run, read_metrics
from cryospin.train.config import build_config
from cryospin.train.fit import fit

# precision fixed: the preset's "auto" times the encoder step, and on a loaded machine two runs
# of one test could choose differently
SMALL = {"run": {"device": "cpu", "num_threads": 1, "seed": 6, "progress": False},
         "model": {"relax_symmetry": "C3", "precision": "fp32"},
         "schedule": {"epochs": 4, "switch_epoch": 1, "search_epochs": 1,
                      "search_min_epochs": None}}


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    return synthetic_particles(tmp_path_factory.mktemp("relax"), box_px=16, n=64, seed=3)


def test_every_stage2_epoch_records_its_relaxation(particles, tmp_path: Path):
    result = fit(build_config("default", SMALL), particles, tmp_path / "run")
    assert result.finished
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["autoencode"] + ["autodecode"] * 3
    assert "relax" not in rows[0]["extra"]
    for row in rows[1:]:
        relax = row["extra"]["relax"]
        assert relax["group"] == "C3"
        assert -1.0 <= relax["score"] <= 1.0
        assert 0.0 <= relax["moved_fraction"] <= 1.0 and len(relax["centre_px"]) == 3
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count("relaxed C3 (score") == 3  # one line per stage-2 epoch
    run = load_run(tmp_path / "run")  # the report's summary table says what it did
    summary = run_summary(run, num_poses=64, box_px=16, pixel_size_angstrom=4.0)
    line = dict(run_summary_rows(summary, run))["pseudo-symmetry relaxed"]
    assert line.startswith("C3 (scored copies of each pose in epochs 2–4)")
    moved = ", ".join(f"{100 * r['extra']['relax']['moved_fraction']:.1f}" for r in rows[1:])
    assert moved in line


def test_a_relaxed_run_resumes_to_the_uninterrupted_result(particles, tmp_path: Path):
    config = build_config("default", SMALL)
    first = fit(config, particles, tmp_path / "run", stop_after=2)
    assert not first.finished
    resumed = fit(config, particles, tmp_path / "run", resume=True)
    whole = fit(config, particles, tmp_path / "whole")
    assert resumed.rotations is not None and whole.rotations is not None
    assert float(geodesic_distance_deg(resumed.rotations.double(),
                                       whole.rotations.double()).max()) < 1e-3


def test_the_cli_refuses_a_relaxed_group_with_an_imposed_one(tmp_path: Path, capsys):
    truth = make_dataset(tmp_path / "data", box_px=16, n=8, seed=1)
    refused(["reconstruct", str(truth.folder / "particles.mrcs"), "--ctf",
             str(truth.folder / "ctf.pkl"), "-o", str(tmp_path / "run"),
             "--symmetry", "D7", "--relax-symmetry", "C3"], capsys, "--relax-symmetry", "D7")
    refused(["reconstruct", str(truth.folder / "particles.mrcs"), "--ctf",
             str(truth.folder / "ctf.pkl"), "-o", str(tmp_path / "run2"),
             "--relax-symmetry", "X5"], capsys, "--relax-symmetry", "X5")


def test_auto_that_finds_no_group_changes_nothing(particles, tmp_path: Path):
    """``relax_symmetry: auto`` on particles of an asymmetric map: every stage-2 epoch
    records its detection (``C1``, nothing moved), and the run's poses are those of the same
    run without relaxation; the report has no relaxation row."""
    auto = {**SMALL, "model": {"relax_symmetry": "auto", "precision": "fp32"}}
    result = fit(build_config("default", auto), particles, tmp_path / "auto")
    plain = fit(build_config("default", {**SMALL, "model": {"precision": "fp32"}}), particles,
                tmp_path / "plain")
    rows = read_metrics(tmp_path / "auto" / "metrics.jsonl")
    assert [r["extra"]["relax"]["group"] for r in rows[1:]] == ["C1"] * 3
    assert all(r["extra"]["relax"]["moved_fraction"] == 0.0 for r in rows[1:])
    assert (tmp_path / "auto" / "run.log").read_text().count("nothing relaxed") == 3
    assert result.rotations is not None and plain.rotations is not None
    assert float(geodesic_distance_deg(result.rotations.double(),
                                       plain.rotations.double()).max()) < 1e-3
    run = load_run(tmp_path / "auto")
    summary = run_summary(run, num_poses=64, box_px=16, pixel_size_angstrom=4.0)
    assert "pseudo-symmetry relaxed" not in dict(run_summary_rows(summary, run))
