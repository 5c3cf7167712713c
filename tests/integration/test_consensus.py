"""``optim.copy_consensus`` (``--copy-consensus``, :mod:`cryospin.train.consensus`): when the
search ends, a pseudo-symmetric particle's split between its copies is scrambled and settled
on one copy, kept only if the images fit better; which group it works with, when it is due,
the step on a split that follows the true views, the revert, and a whole run that records
it and resumes across it."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from tests._synthetic import make_dataset, random_ctf_params

from cryospin.cli import reconstruct as cli
from cryospin.cli.flags import reconstruct as flags
from cryospin.errors import InputError
from cryospin.forward.ctf import compute_ctf
from cryospin.forward.hartley import hartley3, ihartley2
from cryospin.forward.model import render
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.report.analysis import run_events, run_summary
from cryospin.report.html import _consensus_row, run_summary_rows
from cryospin.rotations import geodesic_distance_deg, random_rotations
from cryospin.rundir import Checkpoint, RunFiles, Stage, load_run, read_metrics
from cryospin.symmetry import point_group_rotations
from cryospin.symmetry_search import GroupFit, SymmetrySearch
from cryospin.train import consensus as consensus_module
from cryospin.train.config import build_config
from cryospin.train.consensus import consensus_due, consensus_group, consensus_on_state
from cryospin.train.data import prepare_data
from cryospin.train.fit import fit
from cryospin.train.setup import initial_state
from cryospin.train.state import TrainState, build_pose_table
from cryospin.volume import HartleyVolume

F64 = torch.float64
EYE = torch.eye(3, dtype=F64)


def _fit(group: str, order: int, score: float) -> GroupFit:
    return GroupFit(group, order, score, EYE)


def _search(*fits: GroupFit) -> SymmetrySearch:
    return SymmetrySearch(fits=fits, centre_px=torch.zeros(3, dtype=F64), threshold=0.7,
                          gap=0.1)


def test_the_group_is_the_best_cyclic_one_of_a_map_that_shows_none() -> None:
    c1, c2, c3, d3 = (_fit("C1", 1, 1.0), _fit("C2", 2, 0.31), _fit("C3", 3, 0.45),
                      _fit("D3", 6, 0.6))
    assert consensus_group(_search(c1, c3, c2)) is c3
    assert consensus_group(_search(c1, d3, c2)) is c2  # dihedral groups are not taken
    assert consensus_group(_search(c1, _fit("C3", 3, 0.2))) is None  # below MIN_SCORE
    assert consensus_group(_search(c1, d3)) is None
    assert consensus_group(_search(_fit("C3", 3, 0.8), c1)) is None  # the map shows C3
    assert consensus_group(_search(c1, c3), min_score=0.5) is None


def _config(on: str = "auto", *, box_px: int = 16, epochs: int = 5):
    """Stage 1 in epoch 1, search in epochs 2-3, local epochs 4-5 (3 heads, tiny encoder)."""
    return build_config("default", {
        "model": {"num_heads": 3, "width_multiplier": 0.125, "head_hidden": 32,
                  "precision": "fp32", "predict_shifts": False},
        "optim": {"batch_size": 32, "encoder_lr": 1e-3, "search_rotations": 256,
                  "search_radius_px": 3.0, "copy_consensus": on,
                  "search_refine_radius_px": box_px / 2},
        "schedule": {"epochs": epochs, "switch_epoch": 1, "search_epochs": 2,
                     "search_min_epochs": None},
        "run": {"device": "cpu", "num_threads": 1, "seed": 3, "progress": False},
    })


def _pseudo_c3_volume(L: int, gen: torch.Generator) -> torch.Tensor:
    """`(L, L, L)` float64: three identical blob pairs at 120 deg about z (the map's C3
    axis, through the box centre) and one blob near the first pair only."""
    k = torch.arange(L, dtype=F64) - L // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    parts = [(torch.tensor([L * 0.22, 0.0, L * 0.12], dtype=F64), 1.0),
             (torch.tensor([L * 0.1, L * 0.05, -L * 0.15], dtype=F64), 0.8)]
    vol = torch.zeros(L, L, L, dtype=F64)
    for g in point_group_rotations("C3").to(F64):
        for p, a in parts:
            cx, cy, cz = (g @ p).tolist()
            vol += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 4.5)
    ax, ay, az = L * 0.3, L * 0.1, L * 0.05
    vol += 0.7 * torch.exp(-((x - ax) ** 2 + (y - ay) ** 2 + (z - az) ** 2) / 3.0)
    return vol


@pytest.fixture(scope="module")
def pseudo_c3(tmp_path_factory):
    """400 images of 24 px of :func:`_pseudo_c3_volume` (SNR 5, CTF), their true rotations,
    and the particles as the trainer loads them."""
    folder = tmp_path_factory.mktemp("pseudo_c3")
    gen = torch.Generator().manual_seed(11)
    L, n, apix = 24, 400, 4.0
    vol = _pseudo_c3_volume(L, gen)
    rotations = random_rotations(n, generator=gen, dtype=F64)
    ctf = random_ctf_params(n, gen)
    clean = ihartley2(render(hartley3(vol), rotations, None, compute_ctf(ctf, L, apix)))
    sigma = float(clean.std()) / math.sqrt(5.0)
    images = clean + sigma * torch.randn(clean.shape, generator=gen, dtype=F64)
    write_stack(folder / "particles.mrcs", images, apix)
    write_cryodrgn_ctf(folder / "ctf.pkl", ctf, L, apix)
    particles = load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")
    return particles, rotations


def _state(config, data, rotations: torch.Tensor) -> TrainState:
    """A stage-2 state whose pose table holds ``rotations`` (no shifts)."""
    volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu(),
                                     generator=torch.Generator().manual_seed(0))
    state = TrainState.start(config, volume, Stage.AUTODECODE, torch.device("cpu"), None,
                             data.box_px)
    state.switch(config, build_pose_table(config, rotations.float(), None))
    return state


def _at_the_truth(particles, truth: torch.Tensor):
    """The 24 px config, the prepared data, a stage-2 state at the true poses and a copy of
    its rotations."""
    config = _config(box_px=24)
    data = prepare_data(particles, config.data)
    state = _state(config, data, truth)
    assert state.pose_table is not None
    return config, data, state, state.pose_table.rotations.clone()


def _place_c3_on_z(monkeypatch) -> None:
    """The detection finds no group but C3 about z through the centre, scoring 0.5."""
    monkeypatch.setattr(consensus_module, "detect_symmetry",
                        lambda volume: _search(_fit("C1", 1, 1.0), _fit("C3", 3, 0.5)))


def _copy_of(rotations: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """`(N,)`: the element ``k`` of C3 about z with ``rotations ≈ truth g_k`` (-1: none
    within 2 deg)."""
    g = point_group_rotations("C3").to(F64)
    dist = geodesic_distance_deg(rotations.double()[:, None], truth[:, None] @ g[None])  # (N, 3)
    best, k = dist.min(dim=1)
    return torch.where(best < 2.0, k, torch.full_like(k, -1))


@pytest.mark.parametrize("given", ["auto", "C3"])
def test_a_split_that_follows_the_true_views_is_settled_on_one_copy(pseudo_c3, monkeypatch,
                                                                    given):
    """Each particle on the copy ``g_k`` of its true pose, ``k`` its true view's azimuth
    sector (a split coherent over the views, as the search leaves on small data sets): the
    step (``auto``: the detection finds C3 at 0.5 and no group; ``C3`` given: placed, here at
    0.9, a score ``auto`` would take for the group shown) scrambles, settles every particle
    on one copy within its rounds, finds the images fit better and keeps the new poses and
    their map."""
    particles, truth = pseudo_c3
    config = _config(given, box_px=24)
    data = prepare_data(particles, config.data)
    view = truth[:, 2, :]  # the beam axis in the map frame
    sector = ((torch.atan2(view[:, 1], view[:, 0]) + math.pi) / (2 * math.pi / 3)).long() % 3
    g = point_group_rotations("C3").to(F64)
    split = truth @ g[sector]
    assert sorted(torch.bincount(sector, minlength=3).tolist())[0] > 100  # a three-way split
    state = _state(config, data, split)
    _place_c3_on_z(monkeypatch)
    monkeypatch.setattr(consensus_module, "place_group",
                        lambda volume, group: _search(_fit(group, 3, 0.9)))
    volume_before = state.volume
    record = consensus_on_state(config, state, particles, data, None, remade=False)
    assert record["group"] == "C3" and record["kept"]
    assert record["given"] is (given == "C3")
    assert record["score"] == pytest.approx(0.9 if given == "C3" else 0.5)
    assert record["nll_before"] is not None and record["nll_after"] is not None
    assert record["nll_after"] < record["nll_before"]
    assert 1 <= record["rounds"] == len(record["moved_fractions"])
    assert state.pose_table is not None
    copies = _copy_of(state.pose_table.rotations, truth)
    share = torch.bincount(copies[copies >= 0], minlength=3).max() / len(copies)
    assert float(share) >= 0.95, torch.bincount(copies + 1, minlength=4).tolist()
    assert state.volume is not volume_before  # the map from the new poses, a new optimiser
    assert not state.decoder_opt.state
    assert bool((state.pose_table.exp_avg_rot == 0).all())


def test_the_old_poses_are_kept_when_the_new_ones_fit_worse(pseudo_c3, monkeypatch):
    """From the true poses with no rounds after the scramble, the scrambled poses fit their
    map worse: the true poses are put back exactly and the volume is left as it was."""
    particles, truth = pseudo_c3
    config, data, state, before = _at_the_truth(particles, truth)
    _place_c3_on_z(monkeypatch)
    monkeypatch.setattr(consensus_module, "MAX_ROUNDS", 0)
    volume_before = state.volume
    record = consensus_on_state(config, state, particles, data, None, remade=False)
    assert record["group"] == "C3" and not record["kept"] and record["rounds"] == 0
    assert record["nll_after"] is not None and record["nll_before"] is not None
    assert record["nll_after"] > record["nll_before"]
    assert torch.equal(state.pose_table.rotations, before)
    assert state.volume is volume_before


@pytest.mark.parametrize(("fits", "detected", "score", "words"), [
    ((_fit("C1", 1, 1.0), _fit("C3", 3, 0.1), _fit("D3", 6, 0.05)), "C1", 0.1,
     "the map shows no point group and no cyclic pseudo-symmetry scoring >= 0.25 "
     "(the best 0.100)"),
    ((_fit("C3", 3, 0.85), _fit("C1", 1, 1.0)), "C3", 0.85,
     "the map shows C3 (score 0.850): its copies agree"),
])
def test_nothing_is_done_where_the_map_shows_no_pseudo_symmetry(pseudo_c3, monkeypatch, caplog,
                                                                fits, detected, score, words):
    """No cyclic group scoring 0.25, or a group the map shows: the poses stay, the record
    and the log say why."""
    particles, truth = pseudo_c3
    config, data, state, before = _at_the_truth(particles, truth)
    monkeypatch.setattr(consensus_module, "detect_symmetry", lambda volume: _search(*fits))
    with caplog.at_level("INFO", logger="cryospin.train.consensus"):
        record = consensus_on_state(config, state, particles, data, None, remade=True)
    assert record["group"] == "C1" and record["detected"] == detected
    assert record["score"] == pytest.approx(score)
    assert record["rounds"] == 0 and not record["kept"] and record["nll_before"] is None
    assert torch.equal(state.pose_table.rotations, before)
    assert f"copy consensus: {words}; nothing to do" in caplog.text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("tiny_cc"), box_px=16, n=64, seed=2)
    return load_particles(data.folder / "particles.mrcs", ctf_pkl=data.folder / "ctf.pkl")


def test_the_step_is_due_at_the_first_epoch_after_the_search(tiny, tmp_path) -> None:
    """Search in epochs 2-3: due at epoch 4 only, at 3 when the search stopped after epoch
    2; never with the option off, in stage 1 or with a group imposed on the volume."""
    config, run = _config(), tmp_path / "run"
    fit(config, tiny, run, stop_after=2)
    data = prepare_data(tiny, config.data)
    state = initial_state(config, RunFiles(run), data, torch.device("cpu"), None,
                          Checkpoint.load(RunFiles(run).checkpoint),
                          torch.Generator().manual_seed(0), main=True)
    assert [consensus_due(config, e, state) for e in range(1, 6)] == [
        False, False, False, True, False]
    assert not any(consensus_due(_config("off"), e, state) for e in range(1, 6))
    assert [consensus_due(_config("C3"), e, state) for e in range(1, 6)] == [
        False, False, False, True, False]
    state.search_stopped_after = 2
    assert [consensus_due(config, e, state) for e in range(1, 6)] == [
        False, False, True, False, False]
    state.volume = HartleyVolume.ab_initio(16, data.radial_amplitude.cpu(), symmetry="C3",
                                           generator=torch.Generator().manual_seed(0))
    assert not any(consensus_due(config, e, state) for e in range(1, 6))
    fresh = tmp_path / "fresh"
    fit(config, tiny, fresh, stop_after=1)
    stage1 = initial_state(config, RunFiles(fresh), data, torch.device("cpu"), None,
                           Checkpoint.load(RunFiles(fresh).checkpoint),
                           torch.Generator().manual_seed(0), main=True)
    assert not any(consensus_due(config, e, stage1) for e in range(1, 6))


def test_a_whole_run_records_the_step_and_resumes_across_it(tiny, tmp_path,
                                                            monkeypatch) -> None:
    """With C3 placed on every map: epoch 4's metrics hold the step's record (and only
    epoch 4's), the log its line, and a run stopped after epoch 3 and resumed ends with the
    uninterrupted run's poses."""
    _place_c3_on_z(monkeypatch)
    config = _config()
    whole = tmp_path / "whole"
    fit(config, tiny, whole)
    rows = read_metrics(whole / "metrics.jsonl")
    marked = [r["epoch"] for r in rows if "consensus" in (r.get("extra") or {})]
    assert marked == [4]
    record = rows[3]["extra"]["consensus"]
    assert record["group"] == "C3" and record["rounds"] == len(record["moved_fractions"]) >= 1
    log = (whole / "run.log").read_text()
    assert ("copy consensus: the map shows no point group but a pseudo-C3 (score 0.500); every "
            "particle to a random copy of its pose, then up to 10 rounds") in log
    assert "copy consensus on the pseudo-C3 (score 0.500 in the map)" in log
    data = load_run(whole)
    rows_html = dict(run_summary_rows(run_summary(data, num_poses=64, box_px=16,
                                                  pixel_size_angstrom=4.0), data))
    assert rows_html["copy consensus after the search"].startswith(
        "at the start of epoch 4: the map showed no point group but a pseudo-C3 (score 0.500); "
        "each particle moved to a random copy, then ")
    assert ("copies settled" in dict(run_events(rows)).get(3, "")) == record["kept"]
    split = tmp_path / "split"
    fit(config, tiny, split, stop_after=3)
    fit(config, tiny, split, resume=True)
    a = load_particles(whole / "poses.star", metadata_only=True, no_ctf=True)
    b = load_particles(split / "poses.star", metadata_only=True, no_ctf=True)
    assert a.rotations is not None and b.rotations is not None
    torch.testing.assert_close(a.rotations, b.rotations, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("argv", "value"), [(["--copy-consensus", "C3"], "C3"),
                                             (["--copy-consensus", "off"], "off"),
                                             ([], "off")])
def test_the_flag_reaches_the_config(argv, value) -> None:
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *argv])
    assert build_config(None, cli._overrides(args)).optim.copy_consensus == value


@pytest.mark.parametrize("value", ["D3", "C1", "T", "X7"])
def test_only_a_cyclic_group_auto_or_off_is_taken(value) -> None:
    with pytest.raises(InputError, match="optim.copy_consensus"):
        build_config(None, {"optim": {"copy_consensus": value}})


@pytest.mark.parametrize(("preset", "argv", "value"), [
    ("default", [], "auto"),
    ("default", ["--copy-consensus", "off"], "off"),
    ("paper-synthetic", [], "off"),
    ("paper-real", [], "off"),
])
def test_on_in_the_default_preset_only(preset, argv, value) -> None:
    """The ``default`` preset runs the step after its search (its comment gives the
    measurements); the paper presets have no search; the flag turns it off."""
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *argv])
    assert build_config(preset, cli._overrides(args)).optim.copy_consensus == value


def test_the_report_row_says_what_the_step_did() -> None:
    base = {"rounds": 0, "moved_fractions": [], "nll_before": None, "nll_after": None,
            "kept": False, "seconds": 1.5, "given": False}
    assert _consensus_row(4, {**base, "group": "C1", "detected": "C3", "score": 0.848}) == (
        "at the start of epoch 4: the map showed C3 (score 0.848): its copies agree; nothing "
        "to do (1.5 s)")
    assert _consensus_row(6, {**base, "group": "C1", "detected": "C1", "score": 0.106}) == (
        "at the start of epoch 6: the map showed no point group and no cyclic "
        "pseudo-symmetry (best 0.106); nothing to do (1.5 s)")
    worked = {**base, "group": "C3", "detected": "C1", "score": 0.441, "rounds": 2,
              "moved_fractions": [0.467, 0.003], "nll_before": 430.12, "nll_after": 417.45}
    assert _consensus_row(14, {**worked, "kept": True}) == (
        "at the start of epoch 14: the map showed no point group but a pseudo-C3 (score "
        "0.441); each particle moved to a random copy, then 2 rounds of each to its best copy "
        "under the map from the poses (% moved: 46.7, 0.3); mean NLL 417.45 against 430.12: "
        "the images fit the new poses better: they and their map were kept (1.5 s)")
    assert _consensus_row(14, worked).endswith(
        "the images fit the old poses better: they were kept (1.5 s)")
    assert _consensus_row(14, {**worked, "given": True, "detected": "C3"}).startswith(
        "at the start of epoch 14: C3 given (score 0.441 in the map); each particle moved")
