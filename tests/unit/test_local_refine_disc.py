"""The local epochs' pose steps up to a resolution (``optim.local_refine_resolution_angstrom``,
:func:`cryospin.train.autodecode.local_refine_disc`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests._synthetic import synthetic_particles

from cryospin.errors import InputError
from cryospin.pose import PoseTable
from cryospin.rotations import random_rotations, so3_exp
from cryospin.train.autodecode import (
    autodecode_epoch,
    local_refine_disc,
    local_refine_radius,
    pose_nll,
)
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import TrainingData, prepare_data
from cryospin.volume import HartleyVolume

RADIUS = 4  # cycles per box, inside the 16 px box's training disc (radius 7)
NOISE = 0.5  # a fixed noise variance: both data sets weigh the residuals alike
N = 24


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    return synthetic_particles(tmp_path_factory.mktemp("local"), box_px=16, n=N, seed=5)


@pytest.fixture(scope="module")
def full(particles) -> TrainingData:
    return prepare_data(particles, DataConfig(noise_variance=NOISE))


@pytest.fixture(scope="module")
def small(particles) -> TrainingData:
    """The same particles trained on the disc ``|k| <= RADIUS`` only."""
    return prepare_data(particles, DataConfig(noise_variance=NOISE, loss_radius_px=RADIUS))


def _config(angstrom: float | None):
    return build_config(None, {"optim": {"local_refine_resolution_angstrom": angstrom}})


def _at_radius(data: TrainingData, radius: float) -> float:
    """The resolution (Å) of ``radius`` cycles per box in ``data``'s box."""
    return data.box_px * data.pixel_size_angstrom / radius


def test_the_radius_is_the_box_over_the_resolution():
    assert local_refine_radius(2.4, 96.0) == pytest.approx(40.0)
    assert local_refine_radius(None, 96.0) is None
    assert local_refine_radius(2.4, 0.0) is None  # no pixel size
    assert local_refine_radius(96.0, 96.0) == pytest.approx(1.0)
    with pytest.raises(InputError, match="--local-refine-resolution 100 Å is coarser"):
        local_refine_radius(100.0, 96.0)


def test_the_disc_is_the_training_disc_up_to_the_resolution(full):
    assert full.pixel_size_angstrom > 0
    disc = local_refine_disc(_config(_at_radius(full, RADIUS)), full)
    assert disc is not None and disc.radius_px == pytest.approx(RADIUS)
    norms = full.frequencies.norm(dim=-1)
    assert torch.equal(disc.columns, torch.nonzero(norms <= RADIUS + 1e-4).squeeze(-1))
    assert torch.equal(disc.frequencies, full.frequencies[disc.columns])
    largest = float(norms.max())
    assert local_refine_disc(_config(None), full) is None
    # at or below the training disc's finest resolution: the whole disc
    assert local_refine_disc(_config(_at_radius(full, largest)), full) is None
    assert local_refine_disc(_config(_at_radius(full, largest) / 2), full) is None
    assert local_refine_disc(_config(_at_radius(full, largest - 0.5)), full) is not None
    unknown = dataclasses.replace(full, pixel_size_angstrom=0.0)
    assert local_refine_disc(_config(_at_radius(full, RADIUS)), unknown) is None


def _local_epoch(data: TrainingData, start: HartleyVolume, rotations: torch.Tensor,
                 refine_disc) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One local epoch (no search) in a single batch: the volume after it, the rotations and
    the reported loss."""
    volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu())
    volume.load_state_dict(start.state_dict())
    optimizer = torch.optim.Adam(volume.parameters(), lr=1e-2)
    table = PoseTable(rotations.clone(), None, lr_rot=0.05, lr_shift=0.05)
    stats = autodecode_epoch(
        volume, table, data, optimizer, batch_size=N, pose_steps=3, refine_shifts=False,
        generator=torch.Generator().manual_seed(1), epoch=1, refine_disc=refine_disc,
        anchor_frame=True)
    return volume().detach(), table.rotations.clone(), stats.loss


@pytest.fixture(scope="module")
def start(full) -> tuple[HartleyVolume, torch.Tensor]:
    """A random volume and poses 10–20° from some rotations: a local epoch's starting point."""
    gen = torch.Generator().manual_seed(0)
    volume = HartleyVolume.ab_initio(full.box_px, full.radial_amplitude.cpu(), generator=gen)
    base = random_rotations(N, generator=gen, dtype=torch.float32)
    axis = torch.nn.functional.normalize(torch.randn(N, 3, generator=gen), dim=-1)
    angle = torch.deg2rad(10 + 10 * torch.rand(N, 1, generator=gen))
    return volume, so3_exp(axis * angle) @ base


def test_a_local_epoch_s_pose_steps_fit_the_disc_only(full, small, start):
    """The rotations after a local epoch whose pose steps fit the disc are exactly those of the
    same epoch on data trained on that disc alone, and not those of the whole disc's pose
    steps; the volume step and the reported loss use the whole disc."""
    volume, rotations = start
    disc = local_refine_disc(_config(_at_radius(full, RADIUS)), full)
    assert disc is not None and torch.equal(small.frequencies, disc.frequencies)
    vol_disc, rot_disc, loss = _local_epoch(full, volume, rotations, disc)
    _, rot_small, _ = _local_epoch(small, volume, rotations, None)
    vol_whole, rot_whole, _ = _local_epoch(full, volume, rotations, None)
    assert torch.equal(rot_disc, rot_small)
    assert float((rot_disc - rotations).abs().max()) > 1e-3  # the epoch moved the poses
    assert float((rot_disc - rot_whole).abs().max()) > 1e-4
    expected = pose_nll(volume().detach(), rot_disc, None, full.batch(torch.arange(N)), full)
    assert loss == pytest.approx(float(expected.mean()), rel=1e-6)


def test_a_resolution_of_zero_is_refused():
    with pytest.raises(InputError, match="local_refine_resolution_angstrom"):
        _config(0.0)
