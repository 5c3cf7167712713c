"""``optim.rebackproject_after_search`` (``--rebackproject-after-search``): the first local
epoch starts with the volume replaced by the Wiener backprojection from the poses after the
search; ``optim.rebackproject_during_search`` (``--rebackproject-during-search``): so does
every search epoch from the second, there up to the shells the search's discs read (a
low-pass backprojection, the trained volume beyond). Recorded in those epochs' metrics; a run
resumed across them is the uninterrupted run."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._synthetic import SyntheticDataset, make_dataset

from cryospin.cli import reconstruct as cli
from cryospin.cli.flags import reconstruct as flags
from cryospin.forward.hartley import hartley3
from cryospin.io.mrc import read_map
from cryospin.io.particles import load_particles
from cryospin.report.analysis import (
    rebackprojection,
    run_events,
    run_summary,
    search_rebackprojections,
)
from cryospin.report.html import run_summary_rows
from cryospin.rundir import Checkpoint, RunData, RunFiles, load_checkpoint, load_run, read_metrics
from cryospin.train import outputs as outputs_module
from cryospin.train import rebackproject as rebackproject_module
from cryospin.train.config import build_config
from cryospin.train.data import prepare_data
from cryospin.train.fit import fit
from cryospin.train.outputs import final_backprojection
from cryospin.train.rebackproject import (
    rebackproject_due,
    rebackproject_on_state,
    search_reach_px,
)
from cryospin.train.setup import initial_state
from cryospin.volume import radial_shells


def _config(rebackproject: bool, symmetry: str = "C1", during: bool = False,
            refine_radius_px: float = 16.0):
    """16 px, 3 heads; stage 1 in epoch 1, search in epochs 2-3, local epochs 4-5; no copy
    consensus (:mod:`cryospin.train.consensus`, tested on its own)."""
    return build_config("default", {
        "model": {"num_heads": 3, "width_multiplier": 0.125, "head_hidden": 32,
                  "precision": "fp32", "predict_shifts": True, "max_shift_px": 2.0,
                  "symmetry": symmetry},
        "optim": {"batch_size": 32, "encoder_lr": 1e-3, "search_rotations": 256,
                  "search_radius_px": 3.0, "rebackproject_after_search": rebackproject,
                  "rebackproject_during_search": during,
                  "search_refine_radius_px": refine_radius_px, "copy_consensus": "off"},
        "schedule": {"epochs": 5, "switch_epoch": 1, "search_epochs": 2,
                     "search_min_epochs": None},
        "run": {"device": "cpu", "num_threads": 1, "seed": 3, "progress": False},
    })


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SyntheticDataset:
    return make_dataset(tmp_path_factory.mktemp("tiny_rb"), box_px=16, n=64, seed=2,
                        max_shift_px=1.0)


def _particles(data: SyntheticDataset):
    return load_particles(data.folder / "particles.mrcs", ctf_pkl=data.folder / "ctf.pkl")


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rb") / "run"
    fit(_config(True), _particles(tiny), run)
    return run


def test_the_step_is_recorded_at_the_first_local_epoch_only(uninterrupted) -> None:
    rows = read_metrics(uninterrupted / "metrics.jsonl")
    marked = [r["epoch"] for r in rows if "rebackproject" in (r.get("extra") or {})]
    assert marked == [4]
    record = rows[3]["extra"]["rebackproject"]
    assert record["images"] == 64 and record["group"] == "C1" and record["seconds"] >= 0


def _report_rows(run: Path) -> dict[str, str]:
    """The report's summary table of the run."""
    data = load_run(run)
    return dict(run_summary_rows(run_summary(data, num_poses=64, box_px=16,
                                             pixel_size_angstrom=4.0), data))


def test_the_report_says_when_the_volume_was_re_made(uninterrupted) -> None:
    line = _report_rows(uninterrupted)["volume re-made after the search"]
    assert line.startswith("at the start of epoch 4: the Wiener backprojection of 64 images "
                           "from the poses replaced the trained volume")


def test_off_no_step(tiny, tmp_path) -> None:
    fit(_config(False), _particles(tiny), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert not any("rebackproject" in (r.get("extra") or {}) for r in rows)
    assert "volume re-made after the search" not in _report_rows(tmp_path / "run")


def test_the_new_volume_is_the_backprojection_from_the_poses(tiny, tmp_path) -> None:
    """After the search (checkpoint of epoch 3), the step's volume is the backprojection of
    the training images from the pose table, with a fresh optimiser."""
    config, particles, run = _config(True), _particles(tiny), tmp_path / "run"
    fit(config, particles, run, stop_after=3)
    ckpt = Checkpoint.load(RunFiles(run).checkpoint)
    data = prepare_data(particles, config.data)
    state = initial_state(config, RunFiles(run), data, torch.device("cpu"), None, ckpt,
                          torch.Generator().manual_seed(0), main=True)
    assert rebackproject_due(config, 4, state)
    assert not rebackproject_due(config, 3, state) and not rebackproject_due(config, 5, state)
    assert not rebackproject_due(_config(False), 4, state)
    assert state.pose_table is not None
    rotations, shifts = state.pose_table.gather(torch.arange(len(data)))
    expected = final_backprojection(particles, data, rotations, shifts, seed=config.run.seed)
    record = rebackproject_on_state(config, state, particles, data, None, "after_search")
    assert record["images"] == len(data)
    got = state.volume.to_real_space().detach().double()
    scale = float(expected.double().abs().max())
    np.testing.assert_allclose(got.numpy(), expected.double().numpy(), rtol=0,
                               atol=1e-5 * scale)
    assert not state.decoder_opt.state  # a new optimiser: no moments of the old volume
    assert state.decoder_opt.param_groups[0]["params"][0] is next(state.volume.parameters())


def test_a_run_resumed_across_the_step_is_the_uninterrupted_run(uninterrupted, tiny,
                                                                 tmp_path) -> None:
    run = tmp_path / "run"
    fit(_config(True), _particles(tiny), run, stop_after=3)
    fit(_config(True), _particles(tiny), run, resume=True)
    np.testing.assert_allclose(read_map(run / "map.mrc")[0],
                               read_map(uninterrupted / "map.mrc")[0], rtol=0, atol=1e-6)
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(uninterrupted /
                                                                  "checkpoint.pt")
    torch.testing.assert_close(a["pose_table"]["rotations"], b["pose_table"]["rotations"],
                               atol=1e-6, rtol=0)
    assert ([r["loss"] for r in read_metrics(run / "metrics.jsonl")]
            == pytest.approx([r["loss"] for r in read_metrics(uninterrupted /
                                                              "metrics.jsonl")], rel=1e-6))


@pytest.mark.parametrize(("flag", "value"), [("--rebackproject-after-search", True),
                                             ("--no-rebackproject-after-search", False),
                                             (None, False)])
def test_the_flag_reaches_the_config(flag, value) -> None:
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *([flag] if flag else [])])
    preset = {"optim": {"rebackproject_after_search": not value}} if flag else {}
    assert (build_config(None, {**preset, **cli._overrides(args)})
            .optim.rebackproject_after_search is value)


@pytest.mark.parametrize(("preset", "argv", "value"), [
    ("default", [], True),
    ("default", ["--no-rebackproject-after-search"], False),
    ("paper-synthetic", [], False),
    ("paper-real", [], False),
])
def test_on_in_the_default_preset_only(preset, argv, value) -> None:
    """The ``default`` preset re-makes the volume after its search (its comment gives the
    measurements); the paper presets follow the paper (no such step); the flag turns it off."""
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *argv])
    assert build_config(preset, cli._overrides(args)).optim.rebackproject_after_search is value


def test_with_a_group_imposed_the_step_averages_the_c1_sums_over_it(tiny, tmp_path,
                                                                     monkeypatch,
                                                                     caplog) -> None:
    """``--symmetry C3`` (imposed after the search, at the start of epoch 4, before the step):
    the step backprojects with the volume's group, each image inserted once and the sums
    averaged over C3 by resampling (``symmetrize="resample"``); the final map inserts each
    image at its three poses."""
    calls: list[tuple[str, str, str]] = []

    def spy(*args, **kwargs):
        calls.append((kwargs.get("label", "final map"), kwargs["symmetry"],
                      kwargs.get("symmetrize", "insert")))
        return final_backprojection(*args, **kwargs)

    monkeypatch.setattr(rebackproject_module, "final_backprojection", spy)
    monkeypatch.setattr(outputs_module, "final_backprojection", spy)
    caplog.set_level("INFO", logger="cryospin.train.outputs")
    fit(_config(True, symmetry="C3"), _particles(tiny), tmp_path / "run")
    assert calls == [("volume after the search", "C3", "resample"), ("final map", "C3", "insert")]
    lines = [r.getMessage() for r in caplog.records if "Wiener backprojection" in r.getMessage()]
    assert lines == [
        "volume after the search: Wiener backprojection of 64 images from the current poses, "
        "symmetry C3 (each image inserted once, the sums averaged over the group)",
        "final map: Wiener backprojection of 64 images from the final poses, symmetry C3"]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[3]["extra"]["rebackproject"]["group"] == "C3"


def _rows_of(metrics: list[dict], box_px: int, pixel_size_angstrom: float) -> dict[str, str]:
    """The report's summary table of a run (no folder) with these ``metrics.jsonl`` rows."""
    run = RunData(run_dir=Path("run"), metrics=metrics, config={}, config_text=None,
                  map_path=None, epoch_maps={}, poses_path=None, finished=False)
    return dict(run_summary_rows(run_summary(run, num_poses=None, box_px=box_px,
                                             pixel_size_angstrom=pixel_size_angstrom), run))


def test_the_report_names_the_imposed_group() -> None:
    """With a point group imposed the row names it (the step's record as training writes it,
    :class:`cryospin.train.metrics.RebackprojectRecord`)."""

    metrics = [{"epoch": 1, "extra": {}},
               {"epoch": 7, "extra": {"rebackproject": {"images": 20000, "group": "D7",
                                                        "seconds": 9.3}}}]
    assert rebackprojection(metrics) == (7, 20000, "D7", 9.3)
    line = _rows_of(metrics, box_px=64, pixel_size_angstrom=3.4)
    assert line["volume re-made after the search"] == (
        "at the start of epoch 7: the Wiener backprojection of 20,000 images from the poses "
        "(symmetry D7: each image inserted once, the sums averaged over the group) replaced "
        "the trained volume for the local epochs (9.3 s)")
    assert rebackprojection(metrics[:1]) is None


@pytest.fixture(scope="module")
def during(tiny, tmp_path_factory) -> Path:
    """The run with the volume re-made at the start of search epoch 3 and local epoch 4."""
    run = tmp_path_factory.mktemp("rb_during") / "run"
    fit(_config(True, during=True), _particles(tiny), run)
    return run


def test_during_the_search_the_step_starts_every_search_epoch_from_the_second(during) -> None:
    rows = read_metrics(during / "metrics.jsonl")
    marked = {r["epoch"]: r["extra"]["rebackproject"] for r in rows
              if "rebackproject" in (r.get("extra") or {})}
    assert sorted(marked) == [3, 4]
    assert marked[3]["during_search"] and not marked[4]["during_search"]
    assert all(r["images"] == 64 and r["group"] == "C1" for r in marked.values())
    assert marked[3]["radius_px"] is None  # 16 px: the search's discs reach the whole ball
    assert search_rebackprojections(rows) == [(3, marked[3]["seconds"], None)]
    assert rebackprojection(rows) == (4, 64, "C1", marked[4]["seconds"])
    # the figure marks the one after the search only (the others are part of the search)
    assert [label for _, label in run_events(rows)] == ["volume re-made"]
    line = _report_rows(during)["volume re-made during the search"]
    assert line.startswith("at the start of epoch 3 (each search epoch from the second): the "
                           "Wiener backprojection from the poses of the epoch before replaced "
                           "the trained volume (once, ")


def test_which_step_is_due_when(tiny, tmp_path) -> None:
    """Stage 1 in epoch 1, search 2-3: the during-search step starts epoch 3, the after-search
    one epoch 4; with the search stopped after epoch 2 the after-search one moves to epoch 3;
    neither in stage 1 (no pose table) or with the options off."""
    config, particles, run = _config(True, during=True), _particles(tiny), tmp_path / "run"
    fit(config, particles, run, stop_after=2)
    ckpt = Checkpoint.load(RunFiles(run).checkpoint)
    data = prepare_data(particles, config.data)
    state = initial_state(config, RunFiles(run), data, torch.device("cpu"), None, ckpt,
                          torch.Generator().manual_seed(0), main=True)
    assert [rebackproject_due(config, e, state) for e in range(1, 6)] == [
        None, None, "during_search", "after_search", None]
    assert [rebackproject_due(_config(False, during=True), e, state) for e in range(1, 6)] == [
        None, None, "during_search", None, None]
    assert all(rebackproject_due(_config(False), e, state) is None for e in range(1, 6))
    state.search_stopped_after = 2
    assert [rebackproject_due(config, e, state) for e in range(1, 6)] == [
        None, None, "after_search", None, None]
    fresh = tmp_path / "fresh"
    fit(config, particles, fresh, stop_after=1)  # still in stage 1 after epoch 1
    stage1 = initial_state(config, RunFiles(fresh), data, torch.device("cpu"), None,
                           Checkpoint.load(RunFiles(fresh).checkpoint),
                           torch.Generator().manual_seed(0), main=True)
    assert stage1.pose_table is None
    assert all(rebackproject_due(config, e, stage1) is None for e in range(1, 6))


def test_the_search_epoch_step_logs_what_it_did(tiny, tmp_path, caplog) -> None:
    caplog.set_level("INFO", logger="cryospin.train")
    fit(_config(False, during=True), _particles(tiny), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(("the volume is now", "volume after"))]
    assert [line.split(" (")[0] for line in lines] == [
        "volume after epoch 2: Wiener backprojection of 64 images from the current poses",
        "the volume is now the backprojection from the poses after epoch 2"]
    assert lines[1].endswith("; the search goes on against it")


def test_a_run_resumed_across_a_search_epoch_step_is_the_uninterrupted_run(during, tiny,
                                                                           tmp_path) -> None:
    run = tmp_path / "run"
    fit(_config(True, during=True), _particles(tiny), run, stop_after=2)
    fit(_config(True, during=True), _particles(tiny), run, resume=True)
    np.testing.assert_allclose(read_map(run / "map.mrc")[0], read_map(during / "map.mrc")[0],
                               rtol=0, atol=1e-6)
    assert ([r["loss"] for r in read_metrics(run / "metrics.jsonl")]
            == pytest.approx([r["loss"] for r in read_metrics(during / "metrics.jsonl")],
                             rel=1e-6))


@pytest.mark.parametrize(("preset", "argv", "value"), [
    ("default", [], True),
    ("default", ["--no-rebackproject-during-search"], False),
    ("paper-synthetic", [], False),
    ("paper-synthetic", ["--rebackproject-during-search"], True),
    ("paper-real", [], False),
])
def test_during_the_search_on_in_the_default_preset_only(preset, argv, value) -> None:
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *argv])
    assert build_config(preset, cli._overrides(args)).optim.rebackproject_during_search is value


def test_the_report_counts_the_volumes_re_made_during_the_search() -> None:
    """Three search epochs began with the step (``during_search``), then the local epochs:
    one row for each kind; a record without the key (runs made before it existed) is the
    after-search one."""
    remade = {"images": 5000, "group": "C1", "seconds": 2.0, "during_search": True}
    metrics = [{"epoch": 2, "extra": {}}, {"epoch": 3, "extra": {"rebackproject": remade}},
               {"epoch": 4, "extra": {"rebackproject": {**remade, "seconds": 2.5}}},
               {"epoch": 5, "extra": {"rebackproject": {**remade, "seconds": 1.5}}},
               {"epoch": 6, "extra": {"rebackproject": {"images": 5000, "group": "C1",
                                                        "seconds": 2.1}}}]
    assert search_rebackprojections(metrics) == [(3, 2.0, None), (4, 2.5, None),
                                                 (5, 1.5, None)]
    assert rebackprojection(metrics) == (6, 5000, "C1", 2.1)
    assert run_events(metrics) == [(5, "volume re-made")]
    rows = _rows_of(metrics, box_px=48, pixel_size_angstrom=4.5)
    assert rows["volume re-made during the search"] == (
        "at the start of epochs 3–5 (each search epoch from the second): the Wiener "
        "backprojection from the poses of the epoch before replaced the trained volume "
        "(3 times, 6.0 s in all)")
    assert rows["volume re-made after the search"].startswith("at the start of epoch 6: ")


def test_the_report_says_up_to_which_shell() -> None:
    """Records with ``radius_px`` (a low-pass re-make): the row says up to where."""
    remade = {"images": 20000, "group": "C1", "seconds": 3.0, "during_search": True,
              "radius_px": 18}
    metrics = [{"epoch": 3, "extra": {"rebackproject": remade}},
               {"epoch": 4, "extra": {"rebackproject": remade}}]
    assert search_rebackprojections(metrics) == [(3, 3.0, 18), (4, 3.0, 18)]
    assert _rows_of(metrics, box_px=128, pixel_size_angstrom=1.7)[
        "volume re-made during the search"] == (
        "at the start of epochs 3–4 (each search epoch from the second): the Wiener "
        "backprojection from the poses of the epoch before replaced the trained volume up to "
        "18 cycles/box (the shells the search reads; beyond, the volume as trained) (2 times, "
        "6.0 s in all)")


@pytest.mark.parametrize(("box_px", "overrides", "group", "reach"), [
    (64, {}, "C1", 18),                       # the default: pose steps on 16 cycles/box
    (128, {}, "C1", 18),
    (32, {}, "C1", None),                     # 18 reaches the ball (16): every frequency
    (64, {"search_refine_radius_px": None}, "C1", None),  # the pose steps on the whole disc
    (64, {"search_refine_radius_px": 4.0}, "C1", 8),      # the search's own 6 is the larger
    (64, {"search_refine_radius_px": 4.0}, "D7", 12),     # with a group: its 10 cycles/box
    (64, {"search_refine_radius_px": 4.0, "search_radius_end_px": 12.0}, "C1", 14),
])
def test_the_search_reads_the_shells_within_reach_of_its_discs(box_px, overrides, group,
                                                               reach) -> None:
    """``round(|k|)`` of the farthest trilinear corner of the search's discs: the largest of
    its radii + √3, rounded (16 + 1.73 → 18)."""
    config = build_config("default", {"optim": overrides})
    if "search_refine_radius_px" in overrides and overrides["search_refine_radius_px"] is None:
        config = dataclasses.replace(config, optim=dataclasses.replace(
            config.optim, search_refine_radius_px=None))  # a None override keeps the preset's
    assert search_reach_px(config, box_px, group) == reach


def test_the_low_pass_step_replaces_the_shells_the_search_reads(tiny, tmp_path,
                                                               caplog) -> None:
    """Pose steps on 3 cycles/box at 16 px (the search's disc 3 too): the step re-makes the
    shells ``round(|k|) <= 5`` and keeps the trained volume beyond. On those shells the new
    volume is the low-pass backprojection from the poses; beyond, the old volume's values
    exactly; a fresh optimiser; recorded and logged with the radius."""
    config = _config(True, during=True, refine_radius_px=3.0)
    particles, run = _particles(tiny), tmp_path / "run"
    fit(config, particles, run, stop_after=2)
    ckpt = Checkpoint.load(RunFiles(run).checkpoint)
    data = prepare_data(particles, config.data)
    state = initial_state(config, RunFiles(run), data, torch.device("cpu"), None, ckpt,
                          torch.Generator().manual_seed(0), main=True)
    assert rebackproject_due(config, 3, state) == "during_search"
    assert search_reach_px(config, 16, "C1") == 5
    before = state.volume().detach().clone()
    assert state.pose_table is not None
    rotations, shifts = state.pose_table.gather(torch.arange(len(data)))
    expected = hartley3(final_backprojection(particles, data, rotations, shifts,
                                             seed=config.run.seed, radius_px=5).double())
    caplog.set_level("INFO", logger="cryospin.train")
    record = rebackproject_on_state(config, state, particles, data, None, "during_search")
    assert record["radius_px"] == 5 and record["during_search"]
    after = state.volume().detach().double()
    low = radial_shells(16, 3) <= 5
    scale = float(expected.abs().max())
    assert float((after - expected)[low].abs().max()) < 1e-5 * scale
    torch.testing.assert_close(after[~low], before[~low].double(), rtol=1e-6, atol=0)
    assert float((after - before.double())[low].abs().max()) > 1e-2 * scale  # it changed
    assert not state.decoder_opt.state
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("volume after epoch 2: Wiener backprojection of 64 images "
                               "from the current poses, up to 5 cycles/box") for line in lines)
    assert any("(64 images, up to 5 cycles/box, the trained volume beyond; " in line
               for line in lines)


def test_a_run_with_the_low_pass_step_records_it_and_resumes_across_it(tiny, tmp_path) -> None:
    """A whole run with the search's discs inside the ball (pose steps on 3 cycles/box at
    16 px): the search epoch's re-make is low-pass (``radius_px`` 5), the one after the search
    whole (None); the report row says up to where; a run resumed across the step is the
    uninterrupted run."""
    config, run = _config(True, during=True, refine_radius_px=3.0), tmp_path / "run"
    fit(config, _particles(tiny), run)
    rows = read_metrics(run / "metrics.jsonl")
    marked = {r["epoch"]: r["extra"]["rebackproject"] for r in rows
              if "rebackproject" in (r.get("extra") or {})}
    assert {e: (m["during_search"], m["radius_px"]) for e, m in marked.items()} == {
        3: (True, 5), 4: (False, None)}
    assert "up to 5 cycles/box (the shells the search reads; beyond, the volume as trained)" in (
        _report_rows(run)["volume re-made during the search"])
    resumed = tmp_path / "resumed"
    fit(config, _particles(tiny), resumed, stop_after=2)
    fit(config, _particles(tiny), resumed, resume=True)
    np.testing.assert_allclose(read_map(resumed / "map.mrc")[0], read_map(run / "map.mrc")[0],
                               rtol=0, atol=1e-6)
