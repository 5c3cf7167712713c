"""``cryospin report``: a tiny simulated run -> report.html with valid, non-blank PNG figures.

Also the report's pure helpers (equal-area orientation bins, view directions, epoch picking,
HTML escaping) and, when a ``chromium`` binary is on PATH, that the page renders headless
without errors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _html import check_png as _check_png  # tests/integration/_html.py
from _html import chromium, render_in_chromium
from _html import image_sources as _image_sources

from cryospin.cli.main import main as cli_main
from cryospin.errors import InputError
from cryospin.io.mrc import write_map
from cryospin.io.star_tables import numbers, read_star_tables
from cryospin.report import write_report
from cryospin.report.analysis import (
    head_usage_table,
    orientation_histogram,
    pick_epochs,
    switch_epoch,
    view_directions,
)
from cryospin.report.ground_truth import gt_in_run_frame
from cryospin.report.html import build_html
from cryospin.rotations import random_rotations
from cryospin.rundir import EpochMetrics, append_metrics, load_run, read_metrics
from cryospin.train.noise_record import read_noise_spectrum

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the report's figures need matplotlib (pip install 'cryospin[report]')",
)
EXPECTED_FIGURES = {"training.png", "head_usage.png", "orientations.png", "map_views.png",
                    "particle_scores.png", "fsc.png", "orientations_gt.png", "rotation_error.png",
                    "rotation_error_epochs.png", "head_errors.png", "noise_spectrum.png"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny simulated dataset and a 2-epoch run on it (switch after epoch 1)."""
    root = tmp_path_factory.mktemp("report")
    data, run = root / "D", root / "R"
    assert cli_main(["simulate", "bundled:6vyb", "-o", str(data), "--n-particles", "64",
                     "--box", "16", "--pixel-size", "13", "--seed", "0", "--no-progress"]) == 0
    assert cli_main(["reconstruct", str(data / "particles.star"), "-o", str(run),
                     "--epochs", "2", "--switch-epoch", "1", "--batch-size", "32",
                     "--no-progress", "--threads", "1", "--device", "cpu"]) == 0
    return {"data": data, "run": run}


@pytest.fixture(scope="module")
def full_report(tiny_run: dict[str, Path]) -> Path:
    """``cryospin report RUN --gt gt.mrc --gt-poses particles.star`` -> report.html."""
    data, run = tiny_run["data"], tiny_run["run"]
    status = cli_main(["report", str(run), "--gt", str(data / "gt.mrc"),
                       "--gt-poses", str(data / "particles.star")])
    assert status == 0
    return run / "report.html"


# ----------------------------------------------------------------------------- end to end
@needs_matplotlib
def test_report_html_and_figures(full_report: Path, tiny_run: dict[str, Path]) -> None:
    figures, n_scripts = _image_sources(full_report)
    assert n_scripts == 0
    assert {p.name for p in figures} == EXPECTED_FIGURES
    for p in figures:
        assert p.parent == tiny_run["run"] / "report"
        _check_png(p)
    text = full_report.read_text(encoding="utf-8")
    for needle in ("particles", "switch", "final loss", "wall time", "FSC 0.143",
                   "rotation error vs ground truth", "cryospin flip-hand", "num_heads"):
        assert needle in text, needle
    summary = json.loads((tiny_run["run"] / "report" / "summary.json").read_text())
    assert summary["particles"] == 64
    assert summary["box_px"] == 16
    assert summary["pixel_size_angstrom"] == pytest.approx(13.0)
    assert summary["epochs_completed"] == 2
    assert summary["switch_epoch"] == 2  # first auto-decoding epoch
    # the particles' scores of poses.star: how many fit no better than an empty image
    scores = summary["particle_scores"]
    written = numbers(read_star_tables(tiny_run["run"] / "poses.star")[0][
        "rlnLogLikeliContribution"])
    low = int((written <= 0).sum())
    assert scores["scored"] == 64 and scores["no_better_than_empty"] == low
    # the preset's junk class: against junk too once it took effect (the last stage-2 epoch
    # with fewer than half its images likeliest junk)
    junk = [r.get("junk_fraction") for r in read_metrics(tiny_run["run"] / "metrics.jsonl")]
    took_effect = junk[-1] is not None and junk[-1] < 0.5
    assert scores["against"] == ("an empty image or junk" if took_effect else "an empty image")
    assert scores["median_score_of_others"] == pytest.approx(float(np.median(written[written > 0])))
    assert f"{low:,} of 64" in text and "Particle scores" in text
    # resolution between Nyquist (26 Å) and the box (208 Å); one value per epoch map
    assert 26.0 - 1e-6 <= summary["resolution_0143_angstrom"] <= 208.0
    assert [r["epoch"] for r in summary["epoch_resolutions"]] == [1, 2]
    assert 0.0 <= summary["median_rotation_error_deg"] <= 180.0
    # the pose track (all 64 particles tracked): error per epoch, per head
    tracked = summary["tracked_rotation_error"]
    assert [r["epoch"] for r in tracked] == [1, 2]
    assert all(0.0 <= r["median_deg"] <= 180.0 and 0.0 <= r["mean_deg"] <= 180.0
               for r in tracked)
    assert all(0.0 <= r["view_median_deg"] <= 180.0 and 0.0 <= r["in_plane_median_deg"] <= 180.0
               for r in tracked)
    # stage 1: the winner is one of the heads, so the best of heads is never worse
    assert [r["stage"] for r in tracked] == ["autoencode", "autodecode"]
    assert tracked[0]["best_head_median_deg"] <= tracked[0]["median_deg"] + 1e-9
    assert tracked[1]["best_head_median_deg"] is None
    for name in ("rotation_error_epochs.png", "head_errors.png"):
        _check_png(tiny_run["run"] / "report" / name)
    assert "Rotation error against epoch" in text and "Per-head rotation error" in text
    fsc_json = json.loads((tiny_run["run"] / "report" / "fsc.json").read_text())
    assert fsc_json["fsc"][0] == pytest.approx(1.0, abs=1e-6)  # DC of aligned maps
    # the default preset whitens the noise: the run saved its spectrum, the page draws it and
    # sums it up over the training disc's shells
    record = read_noise_spectrum(tiny_run["run"] / "noise_spectrum.json")
    on_disc = record.relative_power[record.used_shells()]
    assert summary["noise"]["relative_power_min"] == pytest.approx(on_disc.min())
    assert summary["noise"]["relative_power_max"] == pytest.approx(on_disc.max())
    assert summary["noise"]["relative_power_shell_1"] == pytest.approx(record.relative_power[1])
    assert "Noise spectrum" in text and "noise (whitened)" in text


@needs_matplotlib
def test_report_without_ground_truth_to_other_path(tiny_run: dict[str, Path],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "my report.html"  # the space must be URL-quoted in img paths
    result = write_report(tiny_run["run"], output=out)
    figures, _ = _image_sources(out)
    assert {p.name for p in figures} == {"training.png", "head_usage.png", "orientations.png",
                                         "particle_scores.png", "map_views.png",
                                         "noise_spectrum.png"}
    assert all(p.parent == tmp_path / "my report" for p in figures)
    assert figures == result.figure_paths
    for p in figures:
        _check_png(p)


@pytest.fixture(scope="session")  # higher scope: set up (and skipped) before the run
def browser() -> str:
    """Path of a chromium binary; skips (before any expensive fixture) when there is none."""
    found = chromium()
    if found is None:
        pytest.skip("no chromium or chromium-browser binary on PATH: cannot render the page")
    return found


@needs_matplotlib
def test_report_renders_in_headless_chromium(browser: str, full_report: Path,
                                             tmp_path: Path) -> None:
    render_in_chromium(browser, full_report, tmp_path)


# ----------------------------------------------------------------------------- fake run folder
def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        EpochMetrics(epoch=1, stage="autoencode", loss=5.0, num_images=10, wall_time_s=2.0,
                     images_per_s=5.0, head_usage=[0.5, 0.25, 0.25], elapsed_s=2.0),
        EpochMetrics(epoch=2, stage="autodecode", loss=4.0, num_images=10, wall_time_s=1.0,
                     images_per_s=10.0, head_usage=[0.6, 0.2, 0.2], mean_pose_change_deg=3.0,
                     elapsed_s=3.5, extra={"switch": {"head_usage": [0.6, 0.2, 0.2]}}),
        EpochMetrics(epoch=3, stage="autodecode", loss=float("nan"), num_images=10,
                     wall_time_s=1.0, images_per_s=10.0, mean_pose_change_deg=1.0,
                     elapsed_s=4.5),
    ]
    for r in rows:
        append_metrics(run / "metrics.jsonl", r)
    (run / "config.yaml").write_text("cryospin_version: 0.1.0\nnote: <script>x</script>\n")
    g = torch.Generator().manual_seed(0)
    write_map(run / "map.002.mrc", torch.rand(8, 8, 8, generator=g).numpy(), 3.0)
    return run


@needs_matplotlib
def test_unfinished_fake_run(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    data = load_run(run)
    assert not data.finished and data.map_path == run / "map.002.mrc" and data.poses_path is None
    result = write_report(run)
    text = result.html_path.read_text(encoding="utf-8")
    assert "not finished" in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text and "<script>" not in text
    assert {p.name for p in result.figure_paths} == {"training.png", "head_usage.png",
                                                     "map_views.png"}
    for p in result.figure_paths:
        _check_png(p)
    with pytest.raises(InputError, match="no final poses"):
        write_report(run, gt_poses=tmp_path / "whatever.star")


@needs_matplotlib
def test_ground_truth_on_another_grid(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)  # map 8 px at 3 Å/px
    g = torch.Generator().manual_seed(1)
    write_map(tmp_path / "gt16.mrc", torch.rand(16, 16, 16, generator=g).numpy(), 1.5)
    result = write_report(run, gt_map=tmp_path / "gt16.mrc", max_epoch_fsc=0)
    assert result.summary["resolution_05_angstrom"] >= 6.0 - 1e-9  # Nyquist of 3 Å/px
    assert "fsc.png" in {p.name for p in result.figure_paths}
    assert result.summary["epoch_resolutions"] == []  # unfinished, --epoch-fsc 0
    write_map(tmp_path / "gt_bad.mrc", torch.rand(16, 16, 16, generator=g).numpy(), 3.0)
    with pytest.raises(InputError, match="does not match the run"):
        write_report(run, gt_map=tmp_path / "gt_bad.mrc")
    # a finished run without epoch maps: the final map stands for the last epoch
    (run / "map.002.mrc").rename(run / "map.mrc")
    result = write_report(run, gt_map=tmp_path / "gt16.mrc")
    (only,) = result.summary["epoch_resolutions"]
    assert only["epoch"] == 3 and only["elapsed_s"] == pytest.approx(4.5)
    assert only["resolution_05_angstrom"] == result.summary["resolution_05_angstrom"]


def test_missing_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a cryospin run folder"):
        load_run(tmp_path / "empty")


# ----------------------------------------------------------------------------- pure helpers
def test_switch_epoch_and_head_usage_table(tmp_path: Path) -> None:
    data = load_run(_fake_run(tmp_path))
    assert switch_epoch(data.metrics) == 2
    assert switch_epoch(data.metrics[:1]) is None
    labels, table = head_usage_table(data.metrics)
    assert labels == ["1", "switch"]
    np.testing.assert_allclose(table, [[0.5, 0.25, 0.25], [0.6, 0.2, 0.2]])


def test_view_directions_are_third_rows() -> None:
    from cryospin.io.star import rotation_from_relion_euler

    rot, tilt = torch.tensor([30.0, -120.0]), torch.tensor([50.0, 160.0])
    R = rotation_from_relion_euler(rot, tilt, torch.tensor([10.0, 77.0]))
    v = view_directions(R)
    phi, theta = np.deg2rad(rot.numpy()), np.deg2rad(tilt.numpy())
    expected = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi),
                         np.cos(theta)], axis=1)
    np.testing.assert_allclose(v, expected, atol=1e-12)


def test_orientation_bins_are_equal_area() -> None:
    # uniform directions (third rows of Haar rotations) fill equal-area bins evenly
    R = random_rotations(64_000, generator=torch.Generator().manual_seed(0))
    counts, lon_edges, lat_edges = orientation_histogram(view_directions(R), n_lon=16, n_z=8)
    assert counts.shape == (8, 16) and counts.sum() == 64_000
    expected = 64_000 / counts.size  # 500 per bin
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)  # Poisson, 5 sigma
    # equal area: the band between latitude edges has area 2π (sin b − sin a), equal for all
    np.testing.assert_allclose(np.diff(np.sin(lat_edges)), 2 / 8)
    np.testing.assert_allclose(np.diff(lon_edges), 2 * math.pi / 16)
    # a single direction lands in its bin: +x (lon 0, lat 0) is the first bin right of 0°
    c, _, _ = orientation_histogram(np.array([[1.0, 0.0, 0.0]]) * 3, n_lon=4, n_z=2)
    assert c[1, 2] == 1 and c.sum() == 1


@pytest.mark.parametrize("flipped", [False, True])
def test_gt_in_run_frame_undoes_the_global_alignment(flipped: bool) -> None:
    from cryospin.evaluate.pose_error import flip_hand, pose_error

    g = torch.Generator().manual_seed(3)
    gt = random_rotations(50, generator=g)
    A = random_rotations(1, generator=g)[0]
    pred = (flip_hand(gt) if flipped else gt) @ A
    result = pose_error(pred, gt)
    assert result.flipped == flipped
    torch.testing.assert_close(gt_in_run_frame(gt, result), pred, rtol=0, atol=1e-8)


def test_pick_epochs() -> None:
    assert pick_epochs([3, 1, 2], 10) == [1, 2, 3]
    assert pick_epochs(range(1, 101), 0) == []
    chosen = pick_epochs(range(1, 101), 5, keep=[17])
    assert len(chosen) == 5 and 100 in chosen and 17 in chosen and chosen == sorted(chosen)
    assert pick_epochs(range(1, 11), 3, keep=[5]) == [1, 5, 10]


def test_build_html_is_static_and_escaped() -> None:
    page = build_html(title="a <b>", summary=[("x & y", "1 < 2")],
                      figures=[("Fig", "report/a%20b.png", "caption <i>")], notes=["<b>n</b>"],
                      config_text="k: <v>")
    assert page.startswith("<!DOCTYPE html>")
    assert "a &lt;b&gt;" in page and "x &amp; y" in page and "1 &lt; 2" in page
    assert 'src="report/a%20b.png"' in page and "k: &lt;v&gt;" in page
    assert "<b>n</b>" in page  # notes are trusted HTML
    assert "<script" not in page and "http" not in page


def test_the_epoch_table_has_the_share_of_empty_images_only_when_the_run_recorded_it() -> None:
    from cryospin.report.html import epoch_table

    rows = [{"epoch": 1, "stage": "autoencode", "loss": 2.0, "wall_time_s": 1.0,
             "empty_fraction": None},
            {"epoch": 2, "stage": "autodecode", "loss": 1.0, "wall_time_s": 1.0,
             "empty_fraction": 0.3}]
    _, header, cells = epoch_table(rows, np.array([1.0, 2.0]), [])
    column = header.index("images more likely empty")
    assert [row[column] for row in cells] == ["–", "30.0 %"]
    for r in rows:
        r["empty_fraction"] = None
    _, header, cells = epoch_table(rows, np.array([1.0, 2.0]), [])
    assert "images more likely empty" not in header and len(cells[0]) == len(header)


def test_a_star_without_scores_reads_none_and_the_page_draws_no_histogram(
        tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """A run of a version before the scores: its poses.star has no
    rlnLogLikeliContribution; the page has no score figure nor summary row."""
    import shutil

    from cryospin.io.particles import load_particles, write_particles_star
    from cryospin.report.inputs import read_scores

    run = tmp_path / "old"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("report*"))
    star = run / "poses.star"
    assert read_scores(star, 16) is not None
    old = load_particles(star, metadata_only=True, no_ctf=True)
    assert old.star_table is not None
    old = dataclasses.replace(old, star_table=old.star_table.drop(
        columns=["rlnLogLikeliContribution"]))
    write_particles_star(star, old)
    assert read_scores(star, 16) is None
    result = write_report(run)
    assert "particle_scores.png" not in {p.name for p in result.figure_paths}
    assert "particle_scores" not in result.summary
