"""Search-only runs (``schedule.search_only``: ``--switch-epoch 0`` with a global search, issue
14's method (i)): no stage 1, no encoder, every particle starts from a seeded random rotation
that the first global-search epoch replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tests._synthetic import synthetic_particles

from cryospin.rotations import geodesic_distance_deg
from cryospin.rundir import read_metrics
from cryospin.train.config import build_config
from cryospin.train.fit import fit
from cryospin.train.switch import switch_poses

SMALL = {"run": {"device": "cpu", "num_threads": 1, "seed": 4, "progress": False},
         "schedule": {"epochs": 3, "switch_epoch": 0, "search_epochs": 2,
                      "search_min_epochs": None}}


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    return synthetic_particles(tmp_path_factory.mktemp("search_only"), box_px=16, n=64, seed=2)


def test_search_only_is_switch_epoch_0_with_a_search_and_nothing_else():
    assert build_config("default", SMALL).schedule.search_only
    assert build_config("default", {"schedule": {"switch_epoch": 0}}).schedule.search_only
    assert build_config("default").schedule.search_only  # the preset since 2026-12-07
    assert not build_config("default", {"schedule": {"switch_epoch": 1}}).schedule.search_only
    for schedule in ({"search_epochs": 0}, {"switch_steps": 100}):
        config = build_config("default", {"schedule": {"switch_epoch": 0, **schedule}})
        assert not config.schedule.search_only, schedule
    assert not build_config("default", {"schedule": {"method": "amortized"}}
                            ).schedule.search_only
    assert not build_config("paper-synthetic").schedule.search_only


def test_a_search_only_run_builds_no_encoder_and_starts_from_random_rotations(
        particles, tmp_path: Path):
    result = fit(build_config("default", SMALL), particles, tmp_path / "run")
    assert result.finished and result.rotations is not None
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["autodecode"] * 3
    switch = rows[0]["extra"]["switch"]
    assert switch["poses"] == "random"
    assert switch["head_usage"] == [] and switch["mean_loss"] is None
    assert rows[0]["jump_fraction"] > 0.5  # the first search moved (nearly) every particle
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    assert resolved["device"] == "cpu" and "precision" not in resolved  # no encoder to run
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt.get("encoder") is None

    again = fit(build_config("default", SMALL), particles, tmp_path / "again")
    assert again.rotations is not None  # the same seed: the same random start, the same run
    assert float(geodesic_distance_deg(again.rotations.double(),
                                       result.rotations.double()).max()) < 1e-3


def test_a_search_only_run_resumes_after_its_first_epoch(particles, tmp_path: Path):
    config = build_config("default", SMALL)
    first = fit(config, particles, tmp_path / "run", stop_after=1)
    assert not first.finished
    resumed = fit(config, particles, tmp_path / "run", resume=True)
    whole = fit(config, particles, tmp_path / "whole")
    assert resumed.finished and resumed.rotations is not None and whole.rotations is not None
    assert float(geodesic_distance_deg(resumed.rotations.double(),
                                       whole.rotations.double()).max()) < 1e-3


def test_only_a_search_only_run_switches_without_an_encoder():
    config = build_config("default", {"schedule": {"switch_epoch": 1}})
    with pytest.raises(ValueError, match="only a search-only run"):
        switch_poses(config, None, None, None)  # type: ignore[arg-type]
