"""End to end: ``cryospin reconstruct --halves`` on a tiny simulated data set (16 px, 200
particles, 2 epochs, one thread), stopped after epoch 1, resumed, then resumed again after
half B lost its final outputs.

The particles are made with cryospin's own forward model (an "inverse crime", acceptable: the
test checks the workflow and its files, not accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
from _html import (  # tests/integration/_html.py
    check_png,
    chromium,
    image_sources,
    link_targets,
    render_in_chromium,
)
from tests._synthetic import make_dataset

from cryospin.cli.main import main as cli_main
from cryospin.evaluate.sharpen import lowpass
from cryospin.io.mrc import read_map
from cryospin.io.particles import load_indices, load_particles, write_particles_star
from cryospin.io.pkl import write_cryodrgn_poses
from cryospin.io.star import read_relion_star
from cryospin.io.star_tables import numbers
from cryospin.rundir import HalvesFiles, read_metrics
from cryospin.train.config import load_config

L, N, APIX = 16, 200, 4.0


@pytest.fixture(scope="module")
def star_with_subsets(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """``particles.star`` (RELION 3.1) with an ``rlnRandomSubset`` column; returns it and the
    subsets."""
    folder = tmp_path_factory.mktemp("halves_data")
    truth = make_dataset(folder, box_px=L, n=N, seed=2, snr=4.0, pixel_size_angstrom=APIX,
                         draw_order=("rotations", "defocus"), n_blobs=5)
    ps = load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")
    subsets = np.random.default_rng(0).permutation(np.repeat([1, 2], N // 2)).astype(np.int64)
    write_particles_star(folder / "particles.star", dataclasses.replace(ps,
                                                                        random_subset=subsets))
    write_cryodrgn_poses(folder / "gt_poses.pkl", truth.rotations,
                         torch.zeros(N, 2, dtype=torch.float64), L)
    return folder / "particles.star", subsets


OUTPUTS = ("half_A.mrc", "half_B.mrc", "map.mrc", "mask.mrc", "map_masked.mrc",
           "postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "locres.mrc",
           "fsc.json", "fsc.png", "guinier.png", "locres.png", "poses.star", "poses.pkl")


def test_halves_end_to_end_with_resume(star_with_subsets, tmp_path, capsys) -> None:
    """``--max-starts 1``: each half one run folder, never another start (the default layout,
    each half a ``--starts`` folder that can grow: test_halves_restart.py)."""
    star, subsets = star_with_subsets
    run = tmp_path / "run"
    status = cli_main([
        "reconstruct", str(star), "-o", str(run), "--halves", "--max-starts", "1", "--epochs", "2",
        "--switch-epoch", "1", "--heads", "2", "--width", "0.125", "--no-bf16",
        "--batch-size", "50", "--search-rotations", "128", "--device", "cpu",
        "--threads", "1", "--no-progress", "--seed", "4", "--stop-after", "1",
    ])
    assert status == 0
    assert "--resume" in capsys.readouterr().out
    for name in ("half_A", "half_B"):  # both halves stopped after epoch 1
        assert [r["epoch"] for r in read_metrics(run / name / "metrics.jsonl")] == [1]
    assert not any((run / f).exists() for f in OUTPUTS)
    # the split is rlnRandomSubset; each half's config names its particles
    np.testing.assert_array_equal(np.load(run / "half_set.npy"), subsets)
    for which, name in ((1, "half_A"), (2, "half_B")):
        ind = np.load(run / name / "particles.ind.npy")
        np.testing.assert_array_equal(ind, np.flatnonzero(subsets == which))
        cfg = load_config(run / name / "config.yaml")
        assert cfg.input.ind == str((run / name / "particles.ind.npy").resolve())
        assert cfg.run.seed == 4 + (1000 if which == 2 else 0)  # independent initialisations
    assert json.loads((run / "halves.json").read_text())["split_source"] == "rlnRandomSubset"
    # no report for an unfinished halves run: a one-line error naming the folder
    assert cli_main(["report", str(run)]) != 0
    err = capsys.readouterr().err
    assert "has not finished" in err and str(run) in err and "Traceback" not in err
    assert not (run / "report.html").exists()

    # --resume finds the halves run and finishes both halves, then combines them
    assert cli_main(["reconstruct", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "FSC 0.143" in out and "corrected" in out
    for f in OUTPUTS:
        assert (run / f).is_file(), f
    for name in ("half_A", "half_B"):
        assert [r["epoch"] for r in read_metrics(run / name / "metrics.jsonl")] == [1, 2]
    # RUN/run.log: both invocations, both halves and the summary; each half has its own
    log = (run / "run.log").read_text()
    assert log.count(" INFO ==== started: ") == 1 and log.count(" INFO ==== resumed: ") == 1
    assert "half_A: starting a run" in log and "half_B: resuming the run" in log
    assert "epoch 2/2 autodecode: loss" in log and "FSC 0.143: " in log
    for name in ("half_A", "half_B"):
        half_log = (run / name / "run.log").read_text()
        assert half_log.count(" INFO ==== started: ") == 1
        assert half_log.count(" INFO ==== resumed: ") == 1
        assert "epoch 2/2 autodecode: loss" in half_log and "FSC 0.143: " not in half_log
        # each half, a plain run, logs its convergence check: labelled, never a resolution
        assert "convergence check (NOT a resolution)" in half_log

    blocks = starfile.read(run / "postprocess.star", always_dict=True)
    general, table = blocks["general"], blocks["fsc"]
    assert len(table) == L // 2 + 1
    assert general["rlnUnfilteredMapHalf1"] == "half_A.mrc"
    assert general["rlnMaskName"] == "mask.mrc"
    summary = json.loads((run / "fsc.json").read_text())
    final = summary["final_resolution_angstrom"]
    assert final is not None and 2 * APIX <= final
    assert general["rlnFinalResolution"] == pytest.approx(final, rel=1e-5)
    np.testing.assert_allclose(table["rlnFourierShellCorrelationCorrected"],
                               summary["fsc_corrected"], atol=1e-6)
    assert summary["half_sizes"] == [N // 2, N // 2]
    assert isinstance(summary["alignment"]["flipped"], bool)
    half_05 = summary["resolutions"]["corrected"]["0.5_angstrom"]  # beside 0.143 at the end
    assert f"FSC 0.5: corrected {half_05:.2f} Å" in out

    combined, apix = read_map(run / "map.mrc")
    assert combined.shape == (L, L, L) and math.isclose(apix, APIX, rel_tol=1e-5)
    assert np.isfinite(combined).all()
    mask, _ = read_map(run / "mask.mrc")
    assert mask.min() >= 0 and mask.max() <= 1 + 1e-6 and mask.max() > 0.99
    # the mask from the halves' noise (never the whole box), the corrected FSC a correlation
    assert summary["mask"]["fraction_of_box"] == pytest.approx(float(mask.mean()), rel=1e-4)
    assert 0 < summary["mask"]["fraction_of_box"] <= 0.4
    assert float(mask[0, 0, 0]) == 0.0
    if summary["mask"]["fallback"] is None:
        assert summary["mask"]["threshold_sigmas"] == pytest.approx(4.0)
    assert np.all(np.abs(summary["fsc_corrected"]) <= 1.0)
    # sharpening: at 4 Å per voxel in 16 voxels at most two shells lie between 10 Å and
    # Nyquist, too few for a Guinier line: no B-factor, map.mrc low-passed at the resolution
    sharpening = summary["sharpening"]
    assert sharpening["bfactor_a2"] == 0.0 and sharpening["guinier_fit"] is None
    assert sharpening["no_fit_reason"] and sharpening["lowpass_resolution"] == final
    assert general["rlnBfactorUsedForSharpening"] == 0.0
    assert "rlnLogAmplitudesSharpened" in blocks["guinier"].columns
    assert "sharpening: none (" in log and "not sharpened: " in out
    post, _ = read_map(run / "postprocess.mrc")
    expected = lowpass(torch.tensor(combined, dtype=torch.float64), final, APIX).numpy()
    np.testing.assert_allclose(post, expected, atol=1e-5 * float(np.abs(expected).max()))
    post_masked, _ = read_map(run / "postprocess_masked.mrc")
    np.testing.assert_allclose(post_masked, post * mask, atol=1e-6 * float(np.abs(post).max()))
    # local resolution: within the mask, from Nyquist to the window, 0 outside
    local = summary["local_resolution"]
    assert local["fsc_threshold"] == 0.143 and local["window_px"] == L and local["points"] > 0
    assert 2 * APIX <= local["percentile_5"] <= local["median"] <= local["percentile_95"]
    assert local["percentile_95"] <= L * APIX
    locres, _ = read_map(run / "locres.mrc")
    assert float(np.abs(locres[mask < 0.5]).max()) == 0.0
    assert "local resolution (FSC 0.143 in 16-voxel windows" in log
    assert f"local resolution: median {local['median']:.2f} Å within the mask" in out
    if local["density_median"] is not None:  # the made mask's density: some points on it
        assert 0 < local["density_points"] <= local["points"]
        assert f"{local['density_median']:.2f} Å on density" in out

    poses = read_relion_star(run / "poses.star", metadata_only=True)
    assert len(poses) == N
    np.testing.assert_array_equal(poses.random_subset, subsets)
    R = poses.rotations
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand(N, 3, 3),
                               atol=1e-9, rtol=0)
    # half A's poses are copied unchanged
    half_a = read_relion_star(run / "half_A" / "poses.star", metadata_only=True)
    torch.testing.assert_close(R[torch.from_numpy(subsets == 1)], half_a.rotations,
                               atol=1e-9, rtol=0)
    # each particle's score is its own half's, and selected.pkl lists those above the line
    scores = numbers(poses.star_table["rlnLogLikeliContribution"])
    for which, name in ((1, "half_A"), (2, "half_B")):
        half = read_relion_star(run / name / "poses.star", metadata_only=True)
        np.testing.assert_array_equal(scores[subsets == which],
                                      numbers(half.star_table["rlnLogLikeliContribution"]))
    np.testing.assert_array_equal(load_indices(run / "selected.pkl", n=N),
                                  np.flatnonzero(scores > 0))

    # the run report, written at the end: the halves' pages and the whole run's
    _check_halves_report(run, run / "report.html", gt=False)
    assert cli_main(["report", str(run), "--gt", str(star.parent / "gt.mrc"),
                     "--gt-poses", str(star.parent / "gt_poses.pkl"), "--epoch-fsc", "0",
                     "-o", str(run / "with_gt.html")]) == 0
    summary = _check_halves_report(run, run / "with_gt.html", gt=True)
    assert 2 * APIX - 1e-6 <= summary["resolution_0143_angstrom"] <= L * APIX
    assert 0.0 <= summary["median_rotation_error_deg"] <= 180.0
    assert summary["resolution_0143_corrected"] == pytest.approx(final, rel=1e-6)
    # a run from before the sharpening (no fsc.json sharpening, no data_guinier): the page
    # goes without the Guinier plot and the row
    old = tmp_path / "old"
    shutil.copytree(run, old, symlinks=True)
    shutil.rmtree(old / "report")
    record = json.loads((old / "fsc.json").read_text())
    del record["sharpening"], record["local_resolution"]
    (old / "locres.mrc").unlink()
    (old / "fsc.json").write_text(json.dumps(record))
    starfile.write({k: v for k, v in starfile.read(old / "postprocess.star",
                                                   always_dict=True).items() if k != "guinier"},
                   old / "postprocess.star")
    assert cli_main(["report", str(old)]) == 0
    text = (old / "report.html").read_text(encoding="utf-8")
    assert "Guinier plot" not in text and "sharpening</th>" not in text
    assert "Local resolution" not in text and "local resolution</th>" not in text
    assert not (old / "report" / "guinier.png").exists()
    assert json.loads((old / "report" / "summary.json").read_text())[
        "sharpening_bfactor_a2"] is None
    # a run whose fsc.json records a B-factor applied: the page also shows postprocess.mrc
    # (at this size none is fitted; the record is what the page reads)
    sharp = tmp_path / "sharp"
    shutil.copytree(run, sharp, symlinks=True)
    shutil.rmtree(sharp / "report")
    record = json.loads((sharp / "fsc.json").read_text())
    record["sharpening"]["bfactor_a2"] = -50.0
    (sharp / "fsc.json").write_text(json.dumps(record))
    assert cli_main(["report", str(sharp)]) == 0
    text = (sharp / "report.html").read_text(encoding="utf-8")
    assert "Sharpened map" in text and "B-factor -50 Å²" in text
    check_png(sharp / "report" / "map_views_sharpened.png")

    # half B loses its final outputs (as after a crash while writing them): --resume redoes
    # only those, leaving the finished half A alone
    a_ckpt = (run / "half_A" / "checkpoint.pt").stat().st_mtime_ns
    (run / "half_B" / "map.mrc").unlink()
    assert cli_main(["reconstruct", "--resume", str(run)]) == 0
    assert (run / "half_B" / "map.mrc").is_file()
    assert (run / "half_A" / "checkpoint.pt").stat().st_mtime_ns == a_ckpt
    assert [r["epoch"] for r in read_metrics(run / "half_B" / "metrics.jsonl")] == [1, 2]


HALVES_FIGURES = {"fsc_gold.png", "guinier.png", "local_resolution.png", "training.png",
                  "orientations.png", "particle_scores.png", "map_views.png"}
HALVES_GT_FIGURES = {"fsc.png", "orientations_gt.png", "rotation_error.png"}


def _check_halves_report(run: Path, page: Path, *, gt: bool) -> dict:
    """The halves page: its figures (valid, not blank), links to both halves' reports (which
    exist and show their figures), its summary; returns the summary."""
    figures, n_scripts = image_sources(page)
    assert n_scripts == 0
    assert {p.name for p in figures} == HALVES_FIGURES | (HALVES_GT_FIGURES if gt else set())
    for p in figures:
        assert p.parent == run / page.stem
        check_png(p)
    links = link_targets(page)
    assert links == [run / "half_A" / "report.html", run / "half_B" / "report.html"]
    for half_page in links:
        half_figures, _ = image_sources(half_page)
        assert {"training.png", "map_views.png", "orientations.png"} <= {
            p.name for p in half_figures}
        for p in half_figures:
            check_png(p)
    text = page.read_text(encoding="utf-8")
    for needle in ("gold standard", "corrected FSC 0.143", "half B onto half A",
                   "Gold-standard FSC resolutions", "cryospin flip-hand", "Guinier plot",
                   "sharpening</th>", "postprocess.mrc is map.mrc low-passed at",
                   "local resolution</th>"):
        assert needle in text, needle
    summary = json.loads((run / page.stem / "summary.json").read_text())
    assert summary["half_sizes"] == [N // 2, N // 2] and summary["particles"] == N
    assert summary["split_source"] == "rlnRandomSubset"
    assert summary["epochs_completed"] == [2, 2]
    assert all(w > 0 for w in summary["wall_time_s"])
    sharpening = json.loads((run / "fsc.json").read_text())["sharpening"]
    assert summary["sharpening_bfactor_a2"] == sharpening["bfactor_a2"] == 0.0
    assert summary["sharpening_no_fit_reason"] == sharpening["no_fit_reason"]
    # the combined star's scores (each half's own): counted on the page as in poses.star
    scores = numbers(read_relion_star(run / "poses.star", metadata_only=True).star_table[
        "rlnLogLikeliContribution"])
    assert summary["particle_scores"]["scored"] == N
    assert summary["particle_scores"]["no_better_than_empty"] == int((scores <= 0).sum())
    assert "particles no better than an empty image" in text
    return summary


@pytest.fixture(scope="session")
def browser() -> str:
    """Path of a chromium binary; skips (before the run) when there is none."""
    found = chromium()
    if found is None:
        pytest.skip("no chromium or chromium-browser binary on PATH: cannot render the page")
    return found


def test_halves_report_renders_in_headless_chromium(browser, star_with_subsets,
                                                    tmp_path) -> None:
    star, _ = star_with_subsets
    run = tmp_path / "run"
    assert cli_main([
        "reconstruct", str(star), "-o", str(run), "--halves", "--epochs", "2",
        "--switch-epoch", "1", "--heads", "2", "--width", "0.125", "--no-bf16",
        "--batch-size", "50", "--search-rotations", "128", "--device", "cpu",
        "--threads", "1", "--no-progress", "--seed", "4",
    ]) == 0
    for i, page in enumerate((run / "report.html", HalvesFiles(run).half_run(1) / "report.html")):
        scratch = tmp_path / f"browser{i}"
        scratch.mkdir()
        render_in_chromium(browser, page, scratch)


def test_halves_refuses_a_used_folder(star_with_subsets, tmp_path, capsys) -> None:
    star, _ = star_with_subsets
    run = tmp_path / "run"
    run.mkdir()
    (run / "halves.json").write_text("{}")
    status = cli_main(["reconstruct", str(star), "-o", str(run), "--halves", "--epochs", "1",
                       "--device", "cpu", "--threads", "1", "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0]


def test_halves_on_a_cs_input_write_poses_cs_with_each_halfs_scores(star_with_subsets,
                                                                     tmp_path) -> None:
    """A cryoSPARC input: the halves run's ``poses.cs`` is its rows with the combined poses
    (half B's in half A's frame, as in ``poses.star``), the split as ``alignments3D/split``
    and each particle's score under its own half's map as ``cryospin/score``."""
    star, subsets = star_with_subsets
    ps = load_particles(star)
    table = np.zeros(N, dtype=[
        ("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
        ("alignments3D/pose", "<f4", (3,)), ("alignments3D/split", "<u4")])
    table["uid"] = np.arange(N) + 10**12
    table["blob/path"] = "particles.mrcs"
    table["blob/idx"] = np.arange(N)
    table["blob/shape"] = L
    table["blob/psize_A"] = APIX
    table["ctf/accel_kv"] = ps.ctf.voltage_kv.numpy()
    table["ctf/cs_mm"] = ps.ctf.cs_mm.numpy()
    table["ctf/amp_contrast"] = ps.ctf.amplitude_contrast.numpy()
    table["ctf/df1_A"] = ps.ctf.defocus_u_angstrom.numpy()
    table["ctf/df2_A"] = ps.ctf.defocus_v_angstrom.numpy()
    table["ctf/df_angle_rad"] = np.deg2rad(ps.ctf.defocus_angle_deg.numpy())
    table["alignments3D/split"] = subsets - 1  # read with a pose, as cryoSPARC writes them
    cs = star.parent / "particles.cs"
    with open(cs, "wb") as fh:
        np.save(fh, table)
    run = tmp_path / "run"
    assert cli_main([
        "reconstruct", str(cs), "-o", str(run), "--halves", "--epochs", "1",
        "--switch-epoch", "1", "--heads", "2", "--width", "0.125", "--no-bf16",
        "--batch-size", "50", "--device", "cpu", "--threads", "1", "--no-progress",
        "--seed", "4",
    ]) == 0
    assert json.loads((run / "halves.json").read_text())["split_source"] == "rlnRandomSubset"
    out = np.load(run / "poses.cs")
    np.testing.assert_array_equal(out["uid"], table["uid"])
    np.testing.assert_array_equal(out["alignments3D/split"], subsets - 1)
    poses = read_relion_star(run / "poses.star", metadata_only=True)
    scores = numbers(poses.star_table["rlnLogLikeliContribution"])
    assert out.dtype["cryospin/score"] == np.dtype("<f4")
    np.testing.assert_allclose(out["cryospin/score"], scores, rtol=1e-6, atol=1e-3)
    for which in (1, 2):  # each half's own scores (its chosen start's)
        half = read_relion_star(HalvesFiles(run).half_run(which) / "poses.star",
                                metadata_only=True)
        np.testing.assert_array_equal(scores[subsets == which],
                                      numbers(half.star_table["rlnLogLikeliContribution"]))
    back = load_particles(run / "poses.cs", datadir=star.parent)
    angle = torch.linalg.matrix_norm(back.rotations - poses.rotations).max()
    assert float(angle) < 1e-5  # float32 axis-angle against the star's text
