"""Per-particle scores: the log-likelihood ratio against an empty image
(:func:`cryospin.losses.log_likelihood_ratio`), the pass over a run's particles
(:mod:`cryospin.train.scores`), and the empty class of stage 2 (``model.empty_class``:
:func:`cryospin.losses.class_responsibility` weighting the volume step, the final map
leaving out the empty images)."""

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
from cryospin.io.particles import load_indices, load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.losses import class_responsibility, gaussian_nll, log_likelihood_ratio
from cryospin.pose import PoseTable
from cryospin.rotations import random_rotations
from cryospin.rundir import RunFiles
from cryospin.train import outputs as outputs_module
from cryospin.train.autodecode import RotationSearch, autodecode_epoch, pose_nll
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import prepare_data
from cryospin.train.outputs import _write_selection, final_backprojection, write_final
from cryospin.train.scores import EMPTY_SCORE, particle_scores, selected_indices
from cryospin.volume import HartleyVolume

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


def test_the_responsibility_is_the_two_class_posterior_and_weights_the_mixture_gradient():
    """Equal priors, particle ``y = ŷ + noise`` or empty ``y = noise``: ``σ(llr)`` is the
    particle class's posterior (from the Gaussian densities, float64), and the gradient of the
    mixture's NLL with respect to ``ŷ`` is it times the gradient of the particle's NLL."""
    g = _gen(4)
    B, P, var = 6, 30, 0.8
    pred = (torch.randn(B, P, generator=g, dtype=F64) * 0.3).requires_grad_(True)
    obs = torch.randn(B, P, generator=g, dtype=F64)
    obs[:3] += pred.detach()[:3]  # three particles, three empty images
    nll_particle = gaussian_nll(pred[:, None], obs, var)[:, 0]  # constants dropped alike
    nll_empty = gaussian_nll(torch.zeros_like(pred)[:, None], obs, var)[:, 0]
    log_joint = torch.stack([-nll_particle, -nll_empty], dim=1) + math.log(0.5)  # (B, 2)
    posterior = torch.softmax(log_joint, dim=1)[:, 0]
    w = class_responsibility(log_likelihood_ratio(pred.detach(), obs, var))
    torch.testing.assert_close(w, posterior.detach(), rtol=1e-12, atol=1e-15)
    mixture_nll = -torch.logsumexp(log_joint, dim=1).sum()
    (grad_mixture,) = torch.autograd.grad(mixture_nll, pred, retain_graph=True)
    (grad_particle,) = torch.autograd.grad(nll_particle.sum(), pred)
    torch.testing.assert_close(grad_mixture, w[:, None] * grad_particle, rtol=1e-10,
                               atol=1e-12)


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
    then ``N_EMPTY`` images of the same noise alone: the truth and the data as trained on
    (the true noise variance in training units)."""
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
    return vol, rotations, _training_data(particles), particles


def _training_data(particles):
    """The particles as trained on, with the true noise variance of one Hartley coefficient
    in the training's image units."""
    data = prepare_data(particles, DataConfig())
    return dataclasses.replace(data, noise_variance=(SIGMA * data.image_scale) ** 2 * L * L)


def test_with_the_true_map_and_poses_particles_score_above_and_empty_images_below(half_empty):
    vol, rotations, data, _ = half_empty
    volume_ht = (hartley3(vol) * data.image_scale).float()  # the truth in training units
    seen: list[int] = []
    scores = particle_scores(volume_ht, rotations, None, data, batch_size=7,
                             progress=seen.append)
    assert scores.shape == (N_PARTICLES + N_EMPTY,) and scores.dtype == F64
    assert seen == [7, 7, 6]
    assert bool((scores[:N_PARTICLES] > EMPTY_SCORE).all())
    assert bool((scores[N_PARTICLES:] <= EMPTY_SCORE).all())
    np.testing.assert_array_equal(selected_indices(scores), np.arange(N_PARTICLES))
    # a run on rows `ind` of its input: the input's indices of the particles above the line
    ind = np.arange(100, 100 + N_PARTICLES + N_EMPTY)[::-1].copy()
    np.testing.assert_array_equal(selected_indices(scores, ind), ind[:N_PARTICLES])
    with pytest.raises(ValueError, match="does not match"):
        selected_indices(scores, ind[:3])


def test_scores_are_the_training_nll_of_an_empty_image_minus_that_of_the_pose(half_empty):
    """Any volume, poses and shifts: the score equals the difference of the training's own
    per-image NLL (:func:`pose_nll`) for a zero volume and for the given one."""
    _, _, data, _ = half_empty
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
    _, _, data, _ = half_empty
    with pytest.raises(ValueError, match="rotations"):
        particle_scores(torch.zeros(L, L, L), torch.eye(3).expand(3, 3, 3), None, data)


def _epoch(volume: HartleyVolume, data, rotations, *, empty_class: bool, search=None):
    """One stage-2 epoch in a single batch (one pose step, then one volume step)."""
    optimizer = torch.optim.Adam(volume.parameters(), lr=1e-2)
    table = PoseTable(rotations.float().clone(), None, lr_rot=0.05, lr_shift=0.05)
    return autodecode_epoch(volume, table, data, optimizer, batch_size=len(data), pose_steps=1,
                            refine_shifts=False, generator=_gen(5), epoch=1, search=search,
                            empty_class=empty_class)


def test_an_epoch_with_the_empty_class_reports_the_empty_images_and_counts_only_the_others_jumps(
        half_empty):
    """The true map and poses, a global search in the epoch: the particles stay, the empty
    images jump to whichever grid pose fits their noise best; with the empty class those are
    reported as empty and their jumps do not count."""
    vol, rotations, data, _ = half_empty
    search = RotationSearch.build(data, 512, 3.0)
    outcome = {}
    for empty_class in (False, True):
        volume = HartleyVolume.from_real_space((vol * data.image_scale).float())
        outcome[empty_class] = _epoch(volume, data, rotations, empty_class=empty_class,
                                      search=search)
    assert outcome[True].empty_fraction == pytest.approx(N_EMPTY / (N_PARTICLES + N_EMPTY))
    assert outcome[False].empty_fraction is None
    assert outcome[False].jump_fraction > 0  # the empty images' jumps
    assert outcome[True].jump_fraction == 0.0


def test_images_the_empty_class_finds_empty_leave_the_volume_alone(half_empty):
    """On the empty images alone, under the true map (scores about −1,000 nats): their
    responsibilities are 0, so the volume step moves nothing; without the empty class it
    pulls the map towards them."""
    vol, rotations, _, particles = half_empty
    rows = np.arange(N_PARTICLES, N_PARTICLES + N_EMPTY)
    data = _training_data(particles.subset(rows))
    start = HartleyVolume.from_real_space((vol * data.image_scale).float())
    moved = {}
    for empty_class in (False, True):
        volume = HartleyVolume.from_real_space((vol * data.image_scale).float())
        _epoch(volume, data, rotations[rows], empty_class=empty_class)
        with torch.no_grad():
            moved[empty_class] = float((volume() - start()).abs().max() / start().abs().max())
    assert moved[True] == 0.0
    assert moved[False] > 1e-3


def test_the_final_map_without_the_empty_images_is_the_map_of_the_others(half_empty):
    """``final_backprojection(keep=...)`` equals the backprojection of those particles as
    their own run would give it (their images at the same scale)."""
    _, rotations, data, particles = half_empty
    keep = np.arange(N_PARTICLES)
    alone = dataclasses.replace(_training_data(particles.subset(keep)),
                                image_scale=data.image_scale)
    expected = final_backprojection(particles.subset(keep), alone, rotations[keep], None)
    got = final_backprojection(particles, data, rotations, None, keep=keep)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    everything = final_backprojection(particles, data, rotations, None)
    assert not torch.equal(got, everything)


@pytest.mark.parametrize(("flag", "value"), [("--empty-class", True), ("--no-empty-class", False),
                                             (None, False)])
def test_the_flag_reaches_the_config(flag, value):
    import argparse

    from cryospin.cli import reconstruct as cli
    from cryospin.cli.flags import reconstruct as flags

    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *([flag] if flag else [])])
    preset = {"model": {"empty_class": not value}} if flag else {}
    assert build_config(None, {**preset, **cli._overrides(args)}).model.empty_class is value


def test_the_selection_line_names_the_others_median_or_says_none_is_selected(tmp_path, caplog):
    """Some above the line: ``selected.pkl`` lists them and the line gives their median; none
    above (7 real particles of a four-epoch run did this): an empty list and a warning saying
    so, no ``nan``."""
    files = RunFiles(tmp_path)
    with caplog.at_level("INFO", logger="cryospin.train.outputs"):
        _write_selection(files, torch.tensor([3.0, -1.0, 5.0, 0.0], dtype=F64), None)
    np.testing.assert_array_equal(load_indices(files.selected), [0, 2])
    assert "2 of 4 particles (50.0 %)" in caplog.text
    assert "median score of the others 4)" in caplog.text and "lists the other 2" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="cryospin.train.outputs"):
        _write_selection(files, torch.tensor([-3.0, -1.0, 0.0], dtype=F64), None)
    assert load_indices(files.selected).size == 0
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "nan" not in record.getMessage()
    assert "3 of 3 particles (100.0 %)" in record.getMessage()
    assert "selected.pkl is empty: no particle to select" in record.getMessage()


@pytest.mark.parametrize(("above", "says"), [(0, "no particle scores"),
                                             (1, "only 1 particle scores")])
def test_with_fewer_than_two_above_the_line_the_final_map_uses_every_particle(
        half_empty, tmp_path, caplog, above, says):
    """The empty class on, ``above`` particles (0 or 1) scoring above an empty image: no map
    from fewer than two images; the final map backprojects all, with a warning that says
    so."""
    vol, rotations, data, particles = half_empty
    n = rotations.shape[0]
    scores = torch.full((n,), -1.0, dtype=F64)
    scores[:above] = 5.0
    config = build_config("default", {"model": {"empty_class": True}})
    volume = HartleyVolume.from_real_space((vol * data.image_scale).float())
    seen: list[int] = []
    real_backprojection = outputs_module.final_backprojection

    def spy(*args, **kwargs):
        seen.append(args[2].shape[0] if kwargs.get("keep") is None else len(kwargs["keep"]))
        return real_backprojection(*args, **kwargs)

    files = RunFiles(tmp_path)
    with caplog.at_level("WARNING", logger="cryospin.train.outputs"), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(outputs_module, "final_backprojection", spy)
        write_final(files, config, particles, data, volume, rotations.float(), None,
                    scores=scores)
    assert seen == [n]
    assert f"{says} above an empty image: the final map uses all {n}" in caplog.text
    assert files.map.is_file() and load_indices(files.selected).size == above
