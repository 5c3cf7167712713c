"""The pose steps on a smaller disc than the training disc: those of the search epochs
(``optim.search_refine_radius_px``, :func:`cryospin.train.autodecode.search_refine_disc`) and
those of the local epochs (``optim.local_refine_resolution_angstrom``,
:func:`cryospin.train.autodecode.local_refine_disc`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests._synthetic import synthetic_particles

from cryospin.errors import InputError
from cryospin.forward.lattice import frequency_grid_3d
from cryospin.pose import PoseTable
from cryospin.rotations import random_rotations, so3_exp
from cryospin.train.autodecode import (
    RotationSearch,
    autodecode_epoch,
    local_refine_disc,
    local_refine_radius,
    pose_nll,
    search_refine_disc,
)
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import TrainingData, prepare_data
from cryospin.volume import HartleyVolume

RADIUS = 4.0  # cycles per box, inside the 16 px box's training disc (radius 7)
NOISE = 0.5  # a fixed noise variance: both data sets weigh the residuals alike
N = 24


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    return synthetic_particles(tmp_path_factory.mktemp("disc"), box_px=16, n=N, seed=4)


@pytest.fixture(scope="module")
def full(particles) -> TrainingData:
    return prepare_data(particles, DataConfig(noise_variance=NOISE))


@pytest.fixture(scope="module")
def small(particles) -> TrainingData:
    """The same particles trained on the disc ``|k| <= RADIUS`` only."""
    return prepare_data(particles, DataConfig(noise_variance=NOISE, loss_radius_px=int(RADIUS)))


def _config(radius: float | None):
    return build_config(None, {"optim": {"search_refine_radius_px": radius}})


def _epoch(data: TrainingData, start: HartleyVolume, rotations: torch.Tensor,
           refine_disc, *, local: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One search epoch (``local``: a local epoch, no search, each batch's common rotation
    taken out) in a single batch (the pose steps all come before the one volume step): the
    volume after it, the rotations and the reported loss."""
    volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu())
    volume.load_state_dict(start.state_dict())
    optimizer = torch.optim.Adam(volume.parameters(), lr=1e-2)
    table = PoseTable(rotations.clone(), None, lr_rot=0.05, lr_shift=0.05)
    stats = autodecode_epoch(
        volume, table, data, optimizer, batch_size=N, pose_steps=3, refine_shifts=False,
        generator=torch.Generator().manual_seed(1), epoch=1,
        search=None if local else RotationSearch.build(data, 256, 3.0),
        refine_disc=refine_disc, anchor_frame=local)
    return volume().detach(), table.rotations.clone(), stats.loss


@pytest.fixture(scope="module")
def start(full) -> tuple[HartleyVolume, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    volume = HartleyVolume.ab_initio(full.box_px, full.radial_amplitude.cpu(), generator=gen)
    return volume, random_rotations(N, generator=gen, dtype=torch.float32)


def test_the_disc_is_the_training_disc_up_to_the_radius(full):
    disc = search_refine_disc(_config(RADIUS), full)
    assert disc is not None and disc.radius_px == RADIUS
    norms = full.frequencies.norm(dim=-1)
    assert torch.equal(disc.columns, torch.nonzero(norms <= RADIUS).squeeze(-1))
    assert torch.equal(disc.frequencies, full.frequencies[disc.columns])
    largest = float(norms.max())
    assert search_refine_disc(_config(None), full) is None
    assert search_refine_disc(_config(largest), full) is None  # the whole training disc
    assert search_refine_disc(_config(largest - 0.5), full) is not None


def test_the_pose_steps_fit_the_disc_only(full, small, start):
    """The rotations after a search epoch whose pose steps fit the disc are exactly those of
    the same epoch on data trained on that disc alone (the same search, scored on its own
    3 cycles/box disc), and not those of the whole disc's pose steps."""
    volume, rotations = start
    disc = search_refine_disc(_config(RADIUS), full)
    assert torch.equal(small.frequencies, disc.frequencies)  # same frequencies, same order
    _, rot_disc, _ = _epoch(full, volume, rotations, disc)
    _, rot_small, _ = _epoch(small, volume, rotations, None)
    _, rot_whole, _ = _epoch(full, volume, rotations, None)
    assert torch.equal(rot_disc, rot_small)
    assert float((rot_disc - rotations).abs().max()) > 0.1  # the epoch moved the poses
    assert float((rot_disc - rot_whole).abs().max()) > 1e-4


def test_the_volume_step_and_the_loss_use_the_whole_disc(full, small, start):
    """The loss reported is the whole disc's NLL of the refined poses against the volume the
    batch started from, and the volume step moves voxels the disc's slices never touch
    (``|k| > RADIUS + 2``), as an epoch on the disc's data cannot."""
    volume, rotations = start
    disc = search_refine_disc(_config(RADIUS), full)
    vol_disc, rot_disc, loss = _epoch(full, volume, rotations, disc)
    expected = pose_nll(volume().detach(), rot_disc, None, full.batch(torch.arange(N)), full)
    assert loss == pytest.approx(float(expected.mean()), rel=1e-6)
    beyond = frequency_grid_3d(full.box_px).norm(dim=-1) > RADIUS + 2  # (L, L, L)
    before = volume().detach()[beyond]
    vol_small, _, _ = _epoch(small, volume, rotations, None)
    assert float((vol_disc[beyond] - before).abs().max()) > 1e-3
    assert float((vol_small[beyond] - before).abs().max()) == 0.0


def test_a_radius_below_one_is_refused():
    with pytest.raises(InputError, match="search_refine_radius_px"):
        _config(0.5)


# ----------------------------------------------------------------------------- local epochs


def _local_config(angstrom: float | None):
    return build_config(None, {"optim": {"local_refine_resolution_angstrom": angstrom}})


def _at_radius(data: TrainingData, radius: float) -> float:
    """The resolution (Å) of ``radius`` cycles per box in ``data``'s box."""
    return data.box_px * data.pixel_size_angstrom / radius


def test_the_local_radius_is_the_box_over_the_resolution():
    assert local_refine_radius(2.4, 96.0) == pytest.approx(40.0)
    assert local_refine_radius(None, 96.0) is None
    assert local_refine_radius(2.4, 0.0) is None  # no pixel size
    assert local_refine_radius(96.0, 96.0) == pytest.approx(1.0)
    with pytest.raises(InputError, match="local_refine_resolution_angstrom 100 Å is coarser"):
        local_refine_radius(100.0, 96.0)


def test_the_local_disc_is_the_training_disc_up_to_the_resolution(full):
    assert full.pixel_size_angstrom > 0
    disc = local_refine_disc(_local_config(_at_radius(full, RADIUS)), full)
    assert disc is not None and disc.radius_px == pytest.approx(RADIUS)
    norms = full.frequencies.norm(dim=-1)
    assert torch.equal(disc.columns, torch.nonzero(norms <= RADIUS + 1e-4).squeeze(-1))
    assert torch.equal(disc.frequencies, full.frequencies[disc.columns])
    largest = float(norms.max())
    assert local_refine_disc(_local_config(None), full) is None
    # at or below the training disc's finest resolution: the whole disc
    assert local_refine_disc(_local_config(_at_radius(full, largest)), full) is None
    assert local_refine_disc(_local_config(_at_radius(full, largest) / 2), full) is None
    assert local_refine_disc(_local_config(_at_radius(full, largest - 0.5)), full) is not None
    unknown = dataclasses.replace(full, pixel_size_angstrom=0.0)
    assert local_refine_disc(_local_config(_at_radius(full, RADIUS)), unknown) is None


def test_a_local_epoch_s_pose_steps_fit_the_local_disc_only(full, small, start):
    """The rotations after a local epoch (poses 10–20° from the start's) whose pose steps fit
    the disc are exactly those of the same epoch on data trained on that disc alone, and not
    those of the whole disc's pose steps; the reported loss is the whole disc's."""
    volume, base = start
    gen = torch.Generator().manual_seed(2)
    axis = torch.nn.functional.normalize(torch.randn(N, 3, generator=gen), dim=-1)
    rotations = so3_exp(axis * torch.deg2rad(10 + 10 * torch.rand(N, 1, generator=gen))) @ base
    disc = local_refine_disc(_local_config(_at_radius(full, RADIUS)), full)
    assert disc is not None and torch.equal(small.frequencies, disc.frequencies)
    _, rot_disc, loss = _epoch(full, volume, rotations, disc, local=True)
    _, rot_small, _ = _epoch(small, volume, rotations, None, local=True)
    _, rot_whole, _ = _epoch(full, volume, rotations, None, local=True)
    assert torch.equal(rot_disc, rot_small)
    assert float((rot_disc - rotations).abs().max()) > 1e-3  # the epoch moved the poses
    assert float((rot_disc - rot_whole).abs().max()) > 1e-4
    expected = pose_nll(volume().detach(), rot_disc, None, full.batch(torch.arange(N)), full)
    assert loss == pytest.approx(float(expected.mean()), rel=1e-6)


def test_a_local_resolution_of_zero_is_refused():
    with pytest.raises(InputError, match="local_refine_resolution_angstrom"):
        _local_config(0.0)
