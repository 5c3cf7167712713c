"""Per-particle scores: the log-likelihood ratio against an empty image
(:func:`cryospin.losses.log_likelihood_ratio`) and the pass over a run's particles
(:mod:`cryospin.train.scores`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from tests._synthetic import blob_volume, ctf_params

from cryospin.forward.ctf import compute_ctf
from cryospin.forward.hartley import hartley3, ihartley2
from cryospin.forward.model import render
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.losses import gaussian_nll, log_likelihood_ratio
from cryospin.rotations import random_rotations
from cryospin.train.autodecode import pose_nll
from cryospin.train.config import DataConfig
from cryospin.train.data import prepare_data
from cryospin.train.scores import EMPTY_SCORE, particle_scores, selected_indices

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("variance", ["scalar", "per_frequency", "per_image"])
def test_the_ratio_is_the_nll_of_an_empty_image_minus_the_nll_of_the_prediction(variance):
    g = _gen(0)
    pred, obs = torch.randn(5, 40, generator=g, dtype=F64), torch.randn(5, 40, generator=g,
                                                                          dtype=F64)
    var = {"scalar": 0.7, "per_frequency": torch.rand(40, generator=g, dtype=F64) + 0.2,
           "per_image": torch.rand(5, 1, generator=g, dtype=F64) + 0.2}[variance]
    expected = (gaussian_nll(torch.zeros_like(pred)[:, None], obs, var)
                - gaussian_nll(pred[:, None], obs, var))[:, 0]
    got = log_likelihood_ratio(pred, obs, var)
    assert got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_ratio_of_a_particle_and_of_pure_noise_has_the_stated_mean_and_spread():
    """``y = ŷ + noise``: mean ``Σŷ²/(2σ²)``; ``y = noise``: ``−Σŷ²/(2σ²)``; standard
    deviation ``‖ŷ‖/σ`` both (the docstring), over 20,000 noise draws."""
    g = _gen(1)
    P, draws, sigma = 60, 20_000, 1.5
    yhat = torch.randn(P, generator=g, dtype=F64) * 0.8  # one prediction
    power = float(yhat.square().sum())
    noise = sigma * torch.randn(draws, P, generator=g, dtype=F64)
    pred = yhat.expand(draws, P)
    for obs, sign in ((pred + noise, 1.0), (noise, -1.0)):
        llr = log_likelihood_ratio(pred, obs, sigma ** 2)
        std = math.sqrt(power) / sigma
        assert abs(float(llr.mean()) - sign * power / (2 * sigma ** 2)) < 4 * std / math.sqrt(draws)
        assert float(llr.std()) == pytest.approx(std, rel=0.03)


def test_the_ratio_rejects_other_shapes_and_a_variance_that_is_not_positive():
    with pytest.raises(ValueError, match="same shape"):
        log_likelihood_ratio(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="positive"):
        log_likelihood_ratio(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


# --------------------------------------------------------------------- the pass over a run

L, N_PARTICLES, N_EMPTY, SIGMA, APIX = 16, 12, 8, 2.0, 4.0


@pytest.fixture(scope="module")
def half_empty(tmp_path_factory):
    """``N_PARTICLES`` images of a blob density at random poses with white noise ``SIGMA``,
    then ``N_EMPTY`` images of the same noise alone: the particles, the truth and the data as
    trained on (the true noise variance in training units)."""
    folder = tmp_path_factory.mktemp("scores")
    g = _gen(2)
    vol = blob_volume(L, g) * 10.0
    n = N_PARTICLES + N_EMPTY
    rotations = random_rotations(n, generator=g)
    ctf = ctf_params(torch.linspace(8000.0, 15000.0, n, dtype=F64))
    clean = ihartley2(render(hartley3(vol), rotations, None, compute_ctf(ctf, L, APIX)))
    clean[N_PARTICLES:] = 0  # the empty images
    images = clean + SIGMA * torch.randn(clean.shape, generator=g, dtype=F64)
    write_stack(folder / "particles.mrcs", images, APIX)
    write_cryodrgn_ctf(folder / "ctf.pkl", ctf, L, APIX)
    particles = load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")
    data = prepare_data(particles, DataConfig())
    # the true noise variance of one Hartley coefficient, in the training's image units
    data = dataclasses.replace(data, noise_variance=(SIGMA * data.image_scale) ** 2 * L * L)
    return vol, rotations, data


def test_with_the_true_map_and_poses_particles_score_above_and_empty_images_below(half_empty):
    vol, rotations, data = half_empty
    volume_ht = (hartley3(vol) * data.image_scale).float()  # the truth in training units
    seen: list[int] = []
    scores = particle_scores(volume_ht, rotations, None, data, batch_size=7,
                             progress=seen.append)
    assert scores.shape == (N_PARTICLES + N_EMPTY,) and scores.dtype == F64
    assert seen == [7, 7, 6]
    assert bool((scores[:N_PARTICLES] > EMPTY_SCORE).all())
    assert bool((scores[N_PARTICLES:] <= EMPTY_SCORE).all())
    np.testing.assert_array_equal(selected_indices(scores), np.arange(N_PARTICLES))


def test_scores_are_the_training_nll_of_an_empty_image_minus_that_of_the_pose(half_empty):
    """Any volume, poses and shifts: the score equals the difference of the training's own
    per-image NLL (:func:`pose_nll`) for a zero volume and for the given one."""
    _, _, data = half_empty
    n, g = len(data), _gen(3)
    volume_ht = torch.randn(L, L, L, generator=g)
    rotations = random_rotations(n, generator=g, dtype=torch.float32)
    shifts = torch.randn(n, 2, generator=g)
    scores = particle_scores(volume_ht, rotations, shifts, data, batch_size=6)
    batch = data.batch(torch.arange(n))
    expected = (pose_nll(torch.zeros_like(volume_ht), rotations, shifts, batch, data).double()
                - pose_nll(volume_ht, rotations, shifts, batch, data).double())
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-3)


def test_scores_need_one_pose_per_particle(half_empty):
    _, _, data = half_empty
    with pytest.raises(ValueError, match="rotations"):
        particle_scores(torch.zeros(L, L, L), torch.eye(3).expand(3, 3, 3), None, data)
