"""The junk class (``model.junk_class``): the random-phase image model
(:func:`cryospin.losses.random_phase_log_likelihood_ratio`), its signal power from a batch's
predictions (:func:`cryospin.losses.shell_signal_power`), the three-class posterior
(:func:`cryospin.losses.class_responsibility`), the scores and a stage-2 epoch with the
class."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from tests._synthetic import blob_volume, ctf_params

from cryospin.forward.ctf import compute_ctf
from cryospin.forward.hartley import hartley3, ihartley2
from cryospin.forward.lattice import disc_frequencies, disc_indices
from cryospin.forward.model import render
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.losses import (
    class_responsibility,
    gaussian_nll,
    log_likelihood_ratio,
    random_phase_log_likelihood_ratio,
    shell_signal_power,
)
from cryospin.pose import PoseTable
from cryospin.rotations import random_rotations
from cryospin.train.autodecode import RotationSearch, autodecode_epoch
from cryospin.train.config import DataConfig
from cryospin.train.data import prepare_data
from cryospin.train.scores import (
    EMPTY_SCORE,
    JUNK_GATE_FRACTION,
    junk_takes_effect,
    particle_scores,
)
from cryospin.volume import HartleyVolume

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal_log_density(y: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Σ_p log N(y_p; 0, var_p) `(B,)`, from the density's definition."""
    return (-0.5 * y.square() / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)


@pytest.mark.parametrize("variance", ["scalar", "per_frequency"])
def test_the_junk_ratio_is_the_random_phase_density_over_the_empty_one(variance):
    g = _gen(0)
    obs = torch.randn(5, 40, generator=g, dtype=F64) * 2
    power = torch.rand(5, 40, generator=g, dtype=F64) * 3
    power[:, :4] = 0  # no signal at some frequencies: those add nothing
    var = {"scalar": torch.tensor(0.7, dtype=F64),
           "per_frequency": torch.rand(40, generator=g, dtype=F64) + 0.2}[variance]
    expected = (_normal_log_density(obs, (var + power).broadcast_to(obs.shape))
                - _normal_log_density(obs, var.broadcast_to(obs.shape)))
    got = random_phase_log_likelihood_ratio(obs, power, var)
    assert got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    zero = random_phase_log_likelihood_ratio(obs, torch.zeros_like(power), var)
    torch.testing.assert_close(zero, torch.zeros(5, dtype=F64), rtol=0, atol=0)


def test_the_junk_ratio_of_a_random_phase_image_and_of_noise_has_the_stated_means():
    """``a = S/σ²``: mean ``Σ ½(a − log(1+a))`` for ``y ~ N(0, σ² + S)`` and
    ``−Σ ½(log(1+a) − a/(1+a))`` for ``y ~ N(0, σ²)`` (the docstring), over 20,000 draws."""
    g = _gen(1)
    P, draws, var = 50, 20_000, 1.3
    power = torch.rand(P, generator=g, dtype=F64) * 4
    a = power / var
    noise = math.sqrt(var) * torch.randn(draws, P, generator=g, dtype=F64)
    junk = torch.randn(draws, P, generator=g, dtype=F64) * power.sqrt() + noise
    for obs, mean in ((junk, float((0.5 * (a - torch.log1p(a))).sum())),
                      (noise, -float((0.5 * (torch.log1p(a) - a / (1 + a))).sum()))):
        llr = random_phase_log_likelihood_ratio(obs, power, var)
        assert abs(float(llr.mean()) - mean) < 4 * float(llr.std()) / math.sqrt(draws)
    assert float((0.5 * (a - torch.log1p(a))).sum()) > 0


def test_the_junk_ratio_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        random_phase_log_likelihood_ratio(torch.zeros(2, 3), torch.ones(2, 3), 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        random_phase_log_likelihood_ratio(torch.zeros(2, 3), -torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        random_phase_log_likelihood_ratio(torch.zeros(3), torch.ones(3), 1.0)


@pytest.mark.parametrize("empty", [True, False])
def test_the_responsibility_is_the_class_posterior_and_weights_the_mixture_gradient(empty):
    """Equal priors over particle ``y = ŷ + noise``, random-phase junk ``y ~ N(0, σ² + S)``
    and (``empty``) the empty image: the weight is the particle's posterior from the Gaussian
    densities, and the gradient of the mixture's NLL with respect to ``ŷ`` is it times the
    gradient of the particle's NLL (float64)."""
    g = _gen(4)
    B, P, var = 9, 30, 0.8
    pred = (torch.randn(B, P, generator=g, dtype=F64) * 0.4).requires_grad_(True)
    power = torch.rand(P, generator=g, dtype=F64) * 0.3
    obs = torch.randn(B, P, generator=g, dtype=F64) * math.sqrt(var)
    obs[:3] += pred.detach()[:3]  # three particles
    obs[3:6] += torch.randn(3, P, generator=g, dtype=F64) * power.sqrt()  # three junk
    v = torch.full_like(obs, var)
    log_particle = _normal_log_density(obs - pred, v)
    log_junk = _normal_log_density(obs, v + power)
    logs = [log_particle, log_junk] + ([_normal_log_density(obs, v)] if empty else [])
    log_joint = torch.stack(logs, dim=1) - math.log(len(logs))  # (B, K), equal priors
    posterior = torch.softmax(log_joint, dim=1)[:, 0]
    w = class_responsibility(log_likelihood_ratio(pred.detach(), obs, var),
                             random_phase_log_likelihood_ratio(obs, power, var), empty=empty)
    torch.testing.assert_close(w, posterior.detach(), rtol=1e-12, atol=1e-15)
    mixture_nll = -torch.logsumexp(log_joint, dim=1).sum()
    (grad_mixture,) = torch.autograd.grad(mixture_nll, pred)
    nll_particle = gaussian_nll(pred[:, None], obs, var)[:, 0]
    (grad_particle,) = torch.autograd.grad(nll_particle.sum(), pred)
    torch.testing.assert_close(grad_mixture, w[:, None] * grad_particle, rtol=1e-10,
                               atol=1e-12)


def test_without_junk_the_responsibility_is_the_sigmoid_of_the_score():
    llr = torch.linspace(-30, 30, 13, dtype=F64)
    torch.testing.assert_close(class_responsibility(llr), torch.sigmoid(llr), rtol=1e-14,
                               atol=1e-300)


def test_the_signal_power_is_the_batch_power_per_shell_out_of_the_ctf():
    """Against its definition by a loop over shells (float64): ``P(r) = Σ ŷ² / Σ c²`` over
    the batch's coefficients with ``round(|k|) = r``, then ``S = c² P(r)``; without a CTF
    the mean square per shell; a shift changes no power."""
    g = _gen(5)
    L = 16
    freqs = disc_frequencies(L, dtype=F64)  # (P, 2)
    vol = hartley3(blob_volume(L, g))
    rot = random_rotations(6, generator=g, dtype=F64)
    ctf = compute_ctf(ctf_params(torch.linspace(8000.0, 15000.0, 6, dtype=F64)), L, APIX)
    ctf = ctf.flatten(1)[:, disc_indices(L)]  # (B, P) on the disc
    pred = render(vol, rot, None, ctf, frequencies=freqs)  # (B, P)
    shell = freqs.norm(dim=-1).round().long()
    expected = torch.empty_like(pred)
    for r in range(int(shell.max()) + 1):
        on = shell == r
        per_shell = pred[:, on].square().sum() / ctf[:, on].square().sum()
        expected[:, on] = ctf[:, on].square() * per_shell
    torch.testing.assert_close(shell_signal_power(pred, ctf, freqs), expected, rtol=1e-12,
                               atol=0)
    plain = render(vol, rot, None, None, frequencies=freqs)
    expected = torch.empty_like(plain)
    for r in range(int(shell.max()) + 1):
        on = shell == r
        expected[:, on] = plain[:, on].square().mean()
    torch.testing.assert_close(shell_signal_power(plain, None, freqs), expected, rtol=1e-12,
                               atol=0)
    shifted = render(vol, rot, torch.randn(6, 2, generator=g, dtype=F64) * 3, ctf,
                     frequencies=freqs)
    torch.testing.assert_close(shell_signal_power(shifted, ctf, freqs),
                               shell_signal_power(pred, ctf, freqs), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"\(P, 2\)"):
        shell_signal_power(pred, ctf, freqs[:-1])


# ------------------------------------------------------------------ an epoch with the class

L, N_PARTICLES, N_JUNK, SIGMA, APIX = 16, 12, 8, 4.0, 4.0


@pytest.fixture(scope="module")
def with_junk(tmp_path_factory):
    """``N_PARTICLES`` images of a blob density at random poses, then ``N_JUNK`` of another
    blob density (structure the map does not hold), all under the CTF with noise ``SIGMA``."""
    folder = tmp_path_factory.mktemp("junk")
    g = _gen(8)
    vol, other = blob_volume(L, g) * 10.0, blob_volume(L, g) * 10.0
    n = N_PARTICLES + N_JUNK
    rotations = random_rotations(n, generator=g)
    ctf_t = compute_ctf(ctf_params(torch.linspace(8000.0, 15000.0, n, dtype=F64)), L, APIX)
    clean = ihartley2(render(hartley3(vol), rotations, None, ctf_t))
    clean[N_PARTICLES:] = ihartley2(render(hartley3(other), rotations[N_PARTICLES:], None,
                                           ctf_t[N_PARTICLES:]))
    images = clean + SIGMA * torch.randn(clean.shape, generator=g, dtype=F64)
    write_stack(folder / "particles.mrcs", images, APIX)
    write_cryodrgn_ctf(folder / "ctf.pkl", ctf_params(torch.linspace(8000.0, 15000.0, n,
                                                                     dtype=F64)), L, APIX)
    particles = load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")
    return vol, rotations, _training_data(particles), particles


def _training_data(particles, image_scale: float | None = None):
    """The particles as trained on, with the true noise variance of one Hartley coefficient
    in the training's image units (at ``image_scale`` when given)."""
    data = prepare_data(particles, DataConfig())
    scale = data.image_scale if image_scale is None else image_scale
    return dataclasses.replace(data, image_scale=scale,
                               noise_variance=(SIGMA * scale) ** 2 * L * L)


def _epoch(volume, data, rotations, search=None, **classes):
    optimizer = torch.optim.Adam(volume.parameters(), lr=1e-2)
    table = PoseTable(rotations.float().clone(), None, lr_rot=0.05, lr_shift=0.05)
    return autodecode_epoch(volume, table, data, optimizer, batch_size=len(data), pose_steps=1,
                            refine_shifts=False, generator=_gen(9), epoch=1, search=search,
                            **classes)


def test_an_epoch_with_the_junk_class_finds_the_other_structure_junk(with_junk):
    """The true map and poses: the other density's images are likelier junk than the
    particle or an empty image; the particles are not. With the empty class alone the map
    explains them worse than an empty image (the true map; a map trained on them would
    not)."""
    vol, rotations, data, _ = with_junk
    stats = {}
    for junk_class in (False, True):
        volume = HartleyVolume.from_real_space((vol * data.image_scale).float())
        stats[junk_class] = _epoch(volume, data, rotations, empty_class=True,
                                   junk_class=junk_class)
    n = N_PARTICLES + N_JUNK
    assert stats[True].junk_fraction == pytest.approx(N_JUNK / n)
    assert stats[True].empty_fraction == 0.0  # likelier junk than empty
    assert stats[False].junk_fraction is None
    assert stats[False].empty_fraction == pytest.approx(N_JUNK / n)


def test_images_the_junk_class_finds_junk_leave_the_volume_alone(with_junk):
    """On the other density's images alone, the junk class without the empty class: their
    particle responsibilities are ~0 (junk scores hundreds of nats above the particle), so
    the volume step moves the map by less than 1e-6 of what it moves with no class."""
    vol, rotations, data, particles = with_junk
    rows = np.arange(N_PARTICLES, N_PARTICLES + N_JUNK)
    sub = _training_data(particles.subset(rows))
    moved = {}
    for junk_class in (False, True):
        volume = HartleyVolume.from_real_space((vol * sub.image_scale).float())
        start = volume().detach().clone()
        _epoch(volume, sub, rotations[rows], empty_class=False, junk_class=junk_class)
        with torch.no_grad():
            moved[junk_class] = float((volume() - start).abs().max())
    assert moved[False] > 0
    assert moved[True] < 1e-6 * moved[False]


def test_scores_with_the_junk_class_put_the_other_structure_at_or_below_the_line(with_junk):
    """``particle_scores(junk_class=True)``: the particle's log-likelihood ratio against the
    likelier of an empty image and junk; the particles above 0, the other density at or
    below (without the class they score above too)."""
    vol, rotations, data, _ = with_junk
    volume_ht = (hartley3(vol) * data.image_scale).float()
    plain = particle_scores(volume_ht, rotations, None, data, batch_size=N_PARTICLES + N_JUNK)
    scores = particle_scores(volume_ht, rotations, None, data, batch_size=N_PARTICLES + N_JUNK,
                             junk_class=True)
    assert bool((scores[:N_PARTICLES] > EMPTY_SCORE).all())
    assert bool((scores[N_PARTICLES:] <= EMPTY_SCORE).all())
    assert bool((plain[:N_PARTICLES] > EMPTY_SCORE).all())
    assert bool((scores <= plain).all())  # the empty image is still an alternative


def test_the_class_takes_effect_once_fewer_than_half_the_images_are_junk():
    assert JUNK_GATE_FRACTION == 0.5
    assert not junk_takes_effect(None)  # no stage-2 epoch yet
    assert not junk_takes_effect(1.0) and not junk_takes_effect(0.5)
    assert junk_takes_effect(0.4999) and junk_takes_effect(0.0)


def test_an_epoch_counts_the_junk_class_without_weighing_it_in_when_told(with_junk):
    """``junk_weights=False``: the junk images are still reported, the weights are the empty
    class's alone, so the volume moves exactly as in an epoch without the junk class."""
    vol, rotations, data, _ = with_junk
    maps, stats = {}, {}
    for junk_class, weights in ((False, True), (True, False)):
        volume = HartleyVolume.from_real_space((vol * data.image_scale).float())
        stats[junk_class] = _epoch(volume, data, rotations, empty_class=True,
                                   junk_class=junk_class, junk_weights=weights)
        with torch.no_grad():
            maps[junk_class] = volume().clone()
    torch.testing.assert_close(maps[True], maps[False], rtol=0, atol=0)
    assert stats[True].junk_fraction == pytest.approx(N_JUNK / (N_PARTICLES + N_JUNK))
    assert stats[True].junk_weighted is False and stats[False].junk_weighted is None


def test_a_junk_class_not_in_effect_leaves_the_jump_fraction_alone(with_junk):
    """A global search in the epoch, no empty class: the other density's images (and only
    they) jump to whichever grid pose fits them best. Junk not yet in effect, their jumps
    count as without the class; in effect, those likeliest junk are left out of the count."""
    vol, rotations, data, _ = with_junk
    search = RotationSearch.build(data, 512, 3.0)
    jumps = {}
    for classes in ((False, True), (True, False), (True, True)):
        volume = HartleyVolume.from_real_space((vol * data.image_scale).float())
        stats = _epoch(volume, data, rotations, empty_class=False, junk_class=classes[0],
                       junk_weights=classes[1], search=search)
        jumps[classes] = stats.jump_fraction
        junk = stats.junk_fraction
    n = N_PARTICLES + N_JUNK
    assert jumps[(False, True)] == pytest.approx(N_JUNK / n)  # the other density's images
    assert jumps[(True, False)] == jumps[(False, True)]
    assert junk is not None and junk > 0
    assert jumps[(True, True)] == pytest.approx((N_JUNK - junk * n) / (n - junk * n))


@pytest.mark.parametrize(("flag", "value"), [("--junk-class", True), ("--no-junk-class", False),
                                             (None, False)])
def test_the_flag_reaches_the_config(flag, value):
    import argparse

    from cryospin.cli import reconstruct as cli
    from cryospin.cli.flags import reconstruct as flags
    from cryospin.train.config import build_config

    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *([flag] if flag else [])])
    preset = {"model": {"junk_class": not value}} if flag else {}
    assert build_config(None, {**preset, **cli._overrides(args)}).model.junk_class is value


def test_the_junk_functions_leave_their_float64_inputs_alone():
    g = _gen(10)
    obs, power = torch.randn(3, 8, generator=g, dtype=F64), torch.rand(3, 8, generator=g,
                                                                          dtype=F64)
    pred, ctf = torch.randn(3, 8, generator=g, dtype=F64), torch.randn(3, 8, generator=g,
                                                                         dtype=F64)
    copies = [t.clone() for t in (obs, power, pred, ctf)]
    random_phase_log_likelihood_ratio(obs, power, 0.5)
    shell_signal_power(pred, ctf, torch.randn(8, 2, generator=g, dtype=F64))
    for before, after in zip(copies, (obs, power, pred, ctf), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
