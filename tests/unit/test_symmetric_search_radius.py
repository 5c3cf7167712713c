"""The global search's disc once a point group is imposed (optim.search_radius_symmetric_px)."""

from __future__ import annotations

import pytest
from tests._synthetic import make_dataset

from cryospin.errors import InputError
from cryospin.io.particles import load_particles
from cryospin.symmetry import asymmetric_unit, point_group_rotations
from cryospin.train.autodecode import epoch_search, super_fibonacci_rotations
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import prepare_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny = make_dataset(tmp_path_factory.mktemp("tiny"), box_px=16, n=16, seed=1)
    particles = load_particles(tiny.folder / "particles.mrcs", ctf_pkl=tiny.folder / "ctf.pkl")
    return prepare_data(particles, DataConfig())


def _config(symmetric_px, preset: str | None = "default"):
    """``symmetric_px`` None: the preset's (the built-in default's, None, with no preset)."""
    return build_config(preset, {"optim": {"search_rotations": 512, "search_radius_px": 3.0,
                                           "search_radius_symmetric_px": symmetric_px},
                                 "schedule": {"search_epochs": 2}})


def _radius(search) -> float:
    return float(search.disc.frequencies.norm(dim=-1).max())


def test_symmetric_radius_replaces_the_radius_over_an_asymmetric_unit(data):
    """C7: the disc grows to the symmetric radius, on one asymmetric unit of the same grid;
    C1 (the search epochs before the group is imposed) keeps the schedule's radius."""
    config = _config(5.0)
    c1 = epoch_search(config, data, 1, "C1")
    c7 = epoch_search(config, data, 1, "C7")
    assert c1 is not None and c7 is not None
    assert 2.0 < _radius(c1) <= 3.0
    assert 4.0 < _radius(c7) <= 5.0
    expected = asymmetric_unit(super_fibonacci_rotations(512), point_group_rotations("C7"))
    assert c7.rotations.shape == expected.shape and c1.rotations.shape[0] == 512


def test_unset_symmetric_radius_keeps_the_schedule_and_is_capped_by_the_disc(data):
    unset = _config(None, preset=None)
    assert unset.optim.search_radius_symmetric_px is None
    assert 2.0 < _radius(epoch_search(unset, data, 1, "D7")) <= 3.0
    largest = float(data.frequencies.norm(dim=-1).max())
    assert _radius(epoch_search(_config(100.0), data, 1, "C3")) == pytest.approx(largest)
    assert epoch_search(_config(5.0), data, 99, "C7") is None  # after the search epochs


def test_symmetric_radius_below_one_is_rejected():
    with pytest.raises(InputError, match="search_radius_symmetric_px"):
        _config(0.5)
