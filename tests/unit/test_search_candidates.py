"""The global search's candidates (``optim.search_candidates``): each image's K best grid poses
on the search's low-frequency disc (:func:`search_top_poses`), polished by a pattern search
(:func:`polish_rotations`) and decided, against the current pose, on a wider disc
(:func:`decide_candidates`). Float64 throughout."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tests._synthetic import synthetic_particles

import cryospin.train.autodecode as autodecode_module
from cryospin.forward.lattice import frequency_grid_3d
from cryospin.forward.model import render
from cryospin.rotations import geodesic_distance_deg, random_rotations, so3_exp
from cryospin.train.autodecode import (
    JUMP_THRESHOLD_DEG,
    RotationSearch,
    decide_candidates,
    polish_rotations,
    polish_step_deg,
    pose_nll,
    search_rotations,
    search_top_poses,
    shift_grid,
    super_fibonacci_rotations,
)
from cryospin.train.batches import Batch
from cryospin.train.config import DataConfig
from cryospin.train.data import TrainingData, prepare_data, sub_disc

L = 16
N = 6
SEARCH_RADIUS = 3.0  # cycles per box; the training disc reaches 7


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TrainingData:
    particles = synthetic_particles(tmp_path_factory.mktemp("cand"), box_px=L, n=N, seed=7)
    return prepare_data(particles, DataConfig(noise_variance=0.5))


def _volume(seed: int) -> torch.Tensor:
    """A random Hartley volume `(L, L, L)` float64 (any real array is one; its images well
    above the noise variance 0.5), zero from the frequency L/2 - 1 on."""
    gen = torch.Generator().manual_seed(seed)
    vol = torch.randn(L, L, L, generator=gen, dtype=torch.float64)
    radius = frequency_grid_3d(L).double().norm(dim=-1)
    return 100.0 * vol * (radius < L // 2 - 1) / (1.0 + radius)


def _clean(data: TrainingData, volume: torch.Tensor, rotations: torch.Tensor,
           noise: float = 0.0, seed: int = 0) -> Batch:
    """A float64 batch of the first N images replaced by ``volume``'s images at
    ``rotations`` with their own CTF (plus Gaussian noise of variance ``noise``)."""
    batch = data.batch(torch.arange(N))
    ctf = batch.ctf.double()
    images = render(volume, rotations, None, ctf, frequencies=data.frequencies.double(),
                    negation_index=data.negation_index)  # (N, P)
    if noise:
        gen = torch.Generator().manual_seed(seed)
        images = images + math.sqrt(noise) * torch.randn(images.shape, generator=gen,
                                                         dtype=torch.float64)
    return dataclasses.replace(batch, hartley=images, ctf=ctf)


def _search(data: TrainingData, grid: torch.Tensor, candidates: int = 1,
            decision_radius: float | None = None) -> RotationSearch:
    decision = None if decision_radius is None else sub_disc(data.frequencies, L,
                                                             decision_radius)
    return RotationSearch(grid, sub_disc(data.frequencies, L, SEARCH_RADIUS), None,
                          candidates, decision)


def test_the_top_poses_are_the_k_lowest_nll_grid_poses_in_order(data):
    """Across chunk boundaries: the K best of all grid poses by their NLL on the search disc,
    ascending, with those NLLs; the first is search_rotations' pose."""
    volume = _volume(1)
    truth = random_rotations(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = _clean(data, volume, truth, noise=0.5, seed=3)
    grid = super_fibonacci_rotations(300, dtype=torch.float64)
    search = _search(data, grid)
    rot, nll, shift = search_top_poses(volume, search, batch, data, chunk=64, top_k=5)
    assert rot.shape == (N, 5, 3, 3) and nll.shape == (N, 5) and shift is None
    sub = batch.restrict(search.disc)
    every = torch.stack([pose_nll(volume, grid[r].expand(N, 3, 3), None, sub, data, search.disc)
                         for r in range(grid.shape[0])], dim=1)  # (N, 300)
    expected, order = every.sort(dim=1)
    torch.testing.assert_close(nll, expected[:, :5], rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(rot, grid[order[:, :5]], rtol=0, atol=0)
    assert bool((nll[:, 1:] >= nll[:, :-1]).all())
    one_rot, one_nll, _ = search_rotations(volume, search, batch, data, chunk=64)
    torch.testing.assert_close(one_rot, rot[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(one_nll, nll[:, 0], rtol=1e-12, atol=1e-10)


def test_more_candidates_than_grid_poses_returns_the_whole_grid_sorted(data):
    volume = _volume(4)
    batch = _clean(data, volume, random_rotations(
        N, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    grid = super_fibonacci_rotations(8, dtype=torch.float64)
    rot, nll, _ = search_top_poses(volume, _search(data, grid), batch, data, top_k=20)
    assert rot.shape == (N, 8, 3, 3)
    assert bool((nll[:, 1:] >= nll[:, :-1]).all())
    # every grid rotation once per image
    dist = geodesic_distance_deg(rot[:, :, None], grid[None, None])  # (N, 8, 8)
    assert bool(((dist < 1e-6).sum(dim=1) == 1).all())


def test_polishing_never_raises_the_nll_and_recovers_an_axis_offset(data):
    """Noise-free images: a candidate two steps off the truth about one axis comes back to
    within half a step in two sweeps, every candidate's NLL is at most its start's, and the
    true pose itself does not move."""
    volume = _volume(6)
    truth = random_rotations(N, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    batch = _clean(data, volume, truth)
    disc = sub_disc(data.frequencies, L, 6.0)
    sub = batch.restrict(disc)
    step = 3.0
    offset = so3_exp(torch.tensor([0.0, 2 * math.radians(step), 0.0], dtype=torch.float64))
    starts = torch.stack([offset @ truth, truth,
                          random_rotations(N, generator=torch.Generator().manual_seed(9),
                                           dtype=torch.float64)], dim=1)  # (N, 3, 3, 3)
    start_nll = torch.stack([pose_nll(volume, starts[:, k], None, sub, data, disc)
                             for k in range(3)], dim=1)
    polished, nll = polish_rotations(volume, starts, None, sub, data, disc, step_deg=step,
                                     sweeps=2)
    assert bool((nll <= start_nll).all())
    again = torch.stack([pose_nll(volume, polished[:, k], None, sub, data, disc)
                         for k in range(3)], dim=1)
    torch.testing.assert_close(nll, again, rtol=1e-10, atol=1e-10)
    assert float(geodesic_distance_deg(polished[:, 0], truth).max()) < step / 2
    torch.testing.assert_close(polished[:, 1], truth, rtol=0, atol=0)
    assert float(nll[:, 1].abs().max()) < 1e-18


def test_the_decision_keeps_the_true_pose_and_replaces_a_wrong_one(data):
    """Noise-free: no candidate beats an image's true pose; from random poses the chosen
    candidate is in the true pose's basin (within half the jump threshold)."""
    volume = _volume(10)
    truth = random_rotations(N, generator=torch.Generator().manual_seed(11),
                             dtype=torch.float64)
    batch = _clean(data, volume, truth)
    search = _search(data, super_fibonacci_rotations(2048, dtype=torch.float64), 4, None)
    _, _, better = decide_candidates(volume, search, batch, data, truth, None)
    assert not bool(better.any())
    wrong = random_rotations(N, generator=torch.Generator().manual_seed(12),
                             dtype=torch.float64)
    chosen, shift, better = decide_candidates(volume, search, batch, data, wrong, None)
    assert bool(better.all()) and shift is None
    assert float(geodesic_distance_deg(chosen, truth).max()) < JUMP_THRESHOLD_DEG / 2


def test_a_pose_in_the_true_basin_is_left_to_the_pose_steps(data):
    """Noise-free, the current poses 5° off the truth: when every candidate is a grid pose
    in the current pose's basin (within 20°), none is polished or chosen, though the best
    of them fits better than the current pose: the pose steps refine it instead."""
    volume = _volume(17)
    truth = random_rotations(N, generator=torch.Generator().manual_seed(18),
                             dtype=torch.float64)
    batch = _clean(data, volume, truth)
    search = _search(data, super_fibonacci_rotations(8192, dtype=torch.float64), 2, None)
    tilt = so3_exp(torch.tensor([math.radians(5.0), 0.0, 0.0], dtype=torch.float64))
    current = tilt @ truth
    grid_rot, grid_nll, _ = search_top_poses(volume, search, batch, data, top_k=2)
    assert bool((geodesic_distance_deg(grid_rot, current[:, None]) < 20.0).all())
    sub = batch.restrict(search.disc)
    assert bool((grid_nll[:, 0] < pose_nll(volume, current, None, sub, data,
                                           search.disc)).any())
    chosen, _, better = decide_candidates(volume, search, batch, data, current, None)
    assert not bool(better.any())
    torch.testing.assert_close(chosen, grid_rot[:, 0], rtol=0, atol=0)  # unpolished


def test_a_wider_decision_disc_tells_apart_copies_the_search_disc_cannot(data):
    """A volume exactly symmetric under the 180° turn g about z up to the search disc (and
    two voxels beyond, the trilinear stencil), asymmetric beyond: on the search disc an
    image's true pose R and its copy R g fit equally well; with 2 candidates decided on the
    training disc, every image gets R, whatever its current pose."""
    volume = _volume(13)
    k = frequency_grid_3d(L)  # (L, L, L, 3) xyz, index [z, y, x]
    turned = torch.flip(volume, dims=(1, 2)).roll(shifts=(1, 1), dims=(1, 2))  # V(-x, -y, z)
    low = (k.double().norm(dim=-1) <= SEARCH_RADIUS + 2)
    volume = torch.where(low, 0.5 * (volume + turned), volume)
    g = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    truth = random_rotations(N, generator=torch.Generator().manual_seed(14),
                             dtype=torch.float64)
    batch = _clean(data, volume, truth)
    grid = torch.cat([truth @ g, truth])  # the copy first
    search = _search(data, grid, candidates=2)
    sub = batch.restrict(search.disc)
    at_truth = pose_nll(volume, truth, None, sub, data, search.disc)
    at_copy = pose_nll(volume, truth @ g, None, sub, data, search.disc)
    torch.testing.assert_close(at_copy, at_truth, rtol=0, atol=1e-12)  # indistinguishable
    whole = pose_nll(volume, truth @ g, None, batch, data)
    assert float(whole.min()) > 1.0  # but not on the training disc
    current = random_rotations(N, generator=torch.Generator().manual_seed(15),
                               dtype=torch.float64)
    chosen, _, better = decide_candidates(volume, search, batch, data, current, None)
    assert bool(better.all())
    assert float(geodesic_distance_deg(chosen, truth).max()) < 1e-6


def test_the_polishing_step_is_half_the_median_distance_to_the_grid():
    """polish_step_deg(R) against the measured median distance of random rotations to the
    nearest of R super-Fibonacci rotations: the formula (uniform random points) is within
    15 % of twice the measured half-distance, and scales as R^(-1/3)."""
    grid = super_fibonacci_rotations(4096, dtype=torch.float64)
    probes = random_rotations(2000, generator=torch.Generator().manual_seed(16),
                              dtype=torch.float64)
    nearest = geodesic_distance_deg(probes[:, None], grid[None]).min(dim=1).values
    assert polish_step_deg(4096) == pytest.approx(0.5 * float(nearest.median()), rel=0.15)
    assert polish_step_deg(8 * 4096) == pytest.approx(polish_step_deg(4096) / 2, rel=1e-12)


def test_with_a_shift_grid_the_chosen_candidate_carries_its_grid_shift(data):
    """Noise-free images at unknown grid rotations and grid shifts, current poses random
    with wrong shifts: the chosen candidate is the image's grid rotation and grid shift."""
    volume = _volume(19)
    grid = super_fibonacci_rotations(1024, dtype=torch.float64)
    shifts = shift_grid(2.0, 1.0).double()  # (25, 2)
    pick_r, pick_t = torch.tensor([5, 300, 77, 1000, 512, 9]), torch.tensor([0, 3, 12, 24, 7, 18])
    batch = data.batch(torch.arange(N))
    ctf = batch.ctf.double()
    images = render(volume, grid[pick_r], shifts[pick_t], ctf,
                    frequencies=data.frequencies.double(), negation_index=data.negation_index)
    batch = dataclasses.replace(batch, hartley=images, ctf=ctf)
    search = dataclasses.replace(_search(data, grid, candidates=4), shifts_px=shifts)
    current = random_rotations(N, generator=torch.Generator().manual_seed(20),
                               dtype=torch.float64)
    wrong = torch.full((N, 2), 0.7, dtype=torch.float64)
    chosen, chosen_shift, better = decide_candidates(volume, search, batch, data, current,
                                                     wrong)
    assert bool(better.all())
    torch.testing.assert_close(chosen, grid[pick_r], rtol=0, atol=1e-12)  # exact: NLL 0
    torch.testing.assert_close(chosen_shift, shifts[pick_t], rtol=0, atol=0)


def test_images_with_and_without_a_basin_to_choose_in_one_batch(data):
    """Noise-free, half the images at their true pose (every candidate in their basin: kept
    as they are), half at random poses (replaced by their true basin's polished pose)."""
    volume = _volume(21)
    truth = random_rotations(N, generator=torch.Generator().manual_seed(22),
                             dtype=torch.float64)
    batch = _clean(data, volume, truth)
    search = _search(data, super_fibonacci_rotations(8192, dtype=torch.float64), 2, None)
    current = truth.clone()
    current[N // 2:] = random_rotations(N - N // 2, generator=torch.Generator().manual_seed(23),
                                        dtype=torch.float64)
    grid_rot, _, _ = search_top_poses(volume, search, batch, data, top_k=2)
    assert bool((geodesic_distance_deg(grid_rot[:N // 2], truth[:N // 2, None]) < 20).all())
    chosen, _, better = decide_candidates(volume, search, batch, data, current, None)
    assert better.tolist() == [False] * (N // 2) + [True] * (N - N // 2)
    torch.testing.assert_close(chosen[:N // 2], grid_rot[:N // 2, 0], rtol=0, atol=0)
    assert float(geodesic_distance_deg(chosen[N // 2:], truth[N // 2:]).max()) \
        < JUMP_THRESHOLD_DEG / 2


def _tilted_truth_and_copy(data: TrainingData, seed: int):
    """Noise-free images at one rotation ``truth`` (their CTFs differ); current poses 5° off
    it; the grid (2 rotations) holds the truth and its copy ``truth g`` (g: 180° about z)."""
    volume = _volume(seed)
    truth = random_rotations(1, generator=torch.Generator().manual_seed(seed + 1),
                             dtype=torch.float64).expand(N, 3, 3)
    batch = _clean(data, volume, truth)
    g = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    tilt = so3_exp(torch.tensor([math.radians(5.0), 0.0, 0.0], dtype=torch.float64))
    return volume, truth, batch, g, tilt @ truth


def test_other_basins_that_fit_far_worse_on_the_search_disc_are_not_weighed(data, monkeypatch):
    """The margin rule: the current pose 5° off the truth, the candidates the truth (same
    basin) and its copy (another basin, fitting the asymmetric volume far worse on the search
    disc than the current pose, by more than CANDIDATE_MARGIN_NATS): nothing is polished or
    decided. With the margin lifted the copy counts, both are polished, and the truth (NLL 0)
    replaces the tilted pose."""
    volume, truth, batch, g, current = _tilted_truth_and_copy(data, 24)
    search = _search(data, torch.cat([truth[:1], truth[:1] @ g]), candidates=2)
    grid_rot, grid_nll, _ = search_top_poses(volume, search, batch, data, top_k=2)
    sub = batch.restrict(search.disc)
    now = pose_nll(volume, current, None, sub, data, search.disc)
    far = geodesic_distance_deg(grid_rot, current[:, None]) > JUMP_THRESHOLD_DEG  # (N, 2)
    assert bool(far.any(dim=1).all())
    margin = autodecode_module.CANDIDATE_MARGIN_NATS
    assert bool((grid_nll[far] > now[:, None].expand(N, 2)[far] + margin).all())
    _, _, better = decide_candidates(volume, search, batch, data, current, None)
    assert not bool(better.any())
    monkeypatch.setattr(autodecode_module, "CANDIDATE_MARGIN_NATS", math.inf)
    chosen, _, better = decide_candidates(volume, search, batch, data, current, None)
    assert bool(better.all())
    torch.testing.assert_close(chosen, truth, rtol=0, atol=1e-12)


def test_with_a_point_group_a_copy_of_the_current_pose_is_in_its_basin(data, monkeypatch):
    """``search.group`` {1, g}: the copy ``truth g`` of a pose 5° from the truth is within 5°
    of it modulo g, so neither candidate is another basin and nothing is decided (the margin
    lifted, so only the distance decides); without the group the copy is another basin and
    the truth replaces the tilted pose."""
    monkeypatch.setattr(autodecode_module, "CANDIDATE_MARGIN_NATS", math.inf)
    volume, truth, batch, g, current = _tilted_truth_and_copy(data, 26)
    search = _search(data, torch.cat([truth[:1], truth[:1] @ g]), candidates=2)
    _, _, better = decide_candidates(volume, search, batch, data, current, None)
    assert bool(better.all())
    grouped = dataclasses.replace(search, group=torch.stack([torch.eye(3, dtype=torch.float64),
                                                             g]))
    _, _, better = decide_candidates(volume, grouped, batch, data, current, None)
    assert not bool(better.any())


@pytest.mark.parametrize("symmetry", ["C1", "C3", "D7"])
def test_the_polishing_step_follows_the_grid_density_over_so3(data, symmetry):
    """RotationSearch.polish_step: the step of the grid's density over SO(3) — the same for
    a grid over one asymmetric unit (R/|G| rotations searched) as for the whole grid."""
    search = RotationSearch.build(data, 8192, SEARCH_RADIUS, symmetry=symmetry)
    assert search.polish_step == pytest.approx(polish_step_deg(8192), rel=0.02)
