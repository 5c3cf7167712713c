"""``cryospin reconstruct --halves --starts K``: each half a ``--starts`` folder (K runs of
that half from its own seeds, the lowest final loss chosen within the half), the chosen starts
combined into the gold-standard outputs; resumable, with its report and refusals.

The particles are made with cryospin's own forward model (an "inverse crime", acceptable: the
test checks the workflow and its files, not accuracy).
"""

from __future__ import annotations

import html
import json
import logging
import shutil

import numpy as np
import pytest
import starfile
from tests._cli import refused
from tests._synthetic import make_dataset

from cryospin.cli.main import main
from cryospin.io.mrc import read_map
from cryospin.io.particles import load_particles
from cryospin.io.star import read_relion_star
from cryospin.io.star_tables import numbers
from cryospin.rundir import read_metrics
from cryospin.train.config import load_config
from cryospin.train.halves import HALF_FIT_GAP, combine_halves
from cryospin.train.scores import SCORE_COLUMN

_FLAGS = ["--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "32",
          "--search-rotations", "256", "--device", "cpu", "--threads", "1", "--no-progress",
          "--epochs", "3", "--switch-epoch", "1"]
L = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("halves_starts") / "data"
    made = make_dataset(folder, box_px=L, n=96, seed=5, pixel_size_angstrom=4.0)
    return [str(made.folder / "particles.mrcs"), "--ctf", str(made.folder / "ctf.pkl")]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """``--halves --starts 2 --max-starts 2 --seed 4`` run to the end (two starts in each
    half, never more)."""
    folder = tmp_path_factory.mktemp("hs") / "run"
    assert main(["reconstruct", *data, "-o", str(folder), "--halves", "--starts", "2",
                 "--max-starts", "2", "--seed", "4", *_FLAGS]) == 0
    return folder


def _final_loss(start) -> float:
    return read_metrics(start / "metrics.jsonl")[-1]["loss"]


def test_each_half_runs_its_starts_from_its_own_seeds(run):
    assert json.loads((run / "halves.json").read_text())["starts"] == 2
    half_set = np.load(run / "half_set.npy")
    for which, name, seed in ((1, "half_A", 4), (2, "half_B", 1004)):
        half = run / name
        assert json.loads((half / "starts.json").read_text())["seeds"] == [seed, seed + 1]
        ind = np.load(half / "particles.ind.npy")
        np.testing.assert_array_equal(ind, np.flatnonzero(half_set == which))
        for k in (1, 2):
            config = load_config(half / f"start_{k}" / "config.yaml")
            assert config.run.seed == seed + k - 1
            assert config.input.ind == str((half / "particles.ind.npy").resolve())
            assert (half / f"start_{k}" / "map.mrc").is_file()
            assert (half / f"start_{k}" / "report.html").is_file()


def test_each_half_keeps_its_own_lowest_final_loss_and_the_chosen_are_combined(run):
    combined = json.loads((run / "fsc.json").read_text())["half_runs"]
    for i, name in enumerate(("half_A", "half_B")):
        half = run / name
        losses = [_final_loss(half / f"start_{k}") for k in (1, 2)]
        best = f"start_{1 if losses[0] <= losses[1] else 2}"
        assert str((half / "chosen").readlink()) == best
        choice = json.loads((half / "choice.json").read_text())
        assert choice["chosen"] == str(half / best)
        assert [r["final_loss_nats"] for r in choice["runs"]] == losses
        assert combined[i] == f"{name}/{best}"
    # half A's map is its chosen start's, unmoved; half A's particles keep that start's poses
    a_map = read_map(run / "half_A.mrc")[0]
    np.testing.assert_array_equal(a_map, read_map(run / "half_A" / "chosen" / "map.mrc")[0])
    poses = read_relion_star(run / "poses.star", no_ctf=True, metadata_only=True, box_px=L)
    own = read_relion_star(run / "half_A" / "chosen" / "poses.star", no_ctf=True,
                           metadata_only=True, box_px=L)
    a = np.flatnonzero(np.load(run / "half_set.npy") == 1)
    assert poses.rotations is not None and own.rotations is not None
    np.testing.assert_allclose(poses.rotations[a].numpy(), own.rotations.numpy(), atol=1e-5)


def test_the_log_and_the_report_say_which_starts_were_kept(run):
    log = (run / "run.log").read_text()
    assert "half_A: running 2 starts on 48 particles, then half B's" in log
    assert "half_B: running 2 starts on 48 particles\n" in log
    chosen = [(run / n / "chosen").resolve().name for n in ("half_A", "half_B")]
    assert f"half_A: the chosen start is {chosen[0]}" in log
    assert f"half_B: the chosen start is {chosen[1]}" in log
    assert "half A took " in log and "; half B (48 particles), about " in log
    page = (run / "report.html").read_text()
    assert html.escape(f"half A 2, half B 2; each half's own lowest final loss kept: half A "
                       f"{chosen[0]}, half B {chosen[1]}") in page
    assert "added for fitting its images clearly worse" not in page  # --max-starts 2
    assert f'half_A/{chosen[0]}/report.html">half A ({chosen[0]})</a>' in page
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["starts_per_half"] == [2, 2] and summary["chosen_starts"] == chosen
    walls = [sum(read_metrics(run / n / f"start_{k}" / "metrics.jsonl")[-1]["elapsed_s"]
                 for k in (1, 2)) for n in ("half_A", "half_B")]  # each half's starts together
    assert summary["wall_time_s"] == pytest.approx(walls, rel=1e-6)
    for name in ("half_A", "half_B"):  # each start's report shows its half's choice
        for k in (1, 2):
            assert "Several starts" in (run / name / f"start_{k}" / "report.html").read_text()


def test_stopped_halves_with_starts_resume_to_the_same_result(run, data, tmp_path, capsys):
    again = tmp_path / "run"
    assert main(["reconstruct", *data, "-o", str(again), "--halves", "--starts", "2",
                 "--max-starts", "2", "--seed", "4", "--stop-after", "2", *_FLAGS]) == 0
    assert "continue with: cryospin reconstruct --resume" in capsys.readouterr().out
    for name in ("half_A", "half_B"):
        assert not (again / name / "chosen").exists()
        for k in (1, 2):
            assert read_metrics(again / name / f"start_{k}" / "metrics.jsonl")[-1]["epoch"] == 2
    assert not (again / "fsc.json").exists()
    assert main(["reconstruct", "--resume", str(again)]) == 0
    for name in ("half_A", "half_B"):
        for k in (1, 2):
            assert (_final_loss(again / name / f"start_{k}")
                    == _final_loss(run / name / f"start_{k}"))
    first, second = (json.loads((r / "fsc.json").read_text()) for r in (run, again))
    assert second["half_runs"] == first["half_runs"]
    assert second["final_resolution_angstrom"] == first["final_resolution_angstrom"]


def test_refusals(run, data, tmp_path, capsys):
    refused(["reconstruct", "--resume", str(run), "--starts", "3"], capsys,
            f"{run}: each half of the run has 2 start(s), not 3")
    plain = tmp_path / "plain"  # a halves run of one run per half, stopped
    assert main(["reconstruct", *data, "-o", str(plain), "--halves", "--stop-after", "1",
                 *_FLAGS]) == 0
    capsys.readouterr()
    refused(["reconstruct", "--resume", str(plain), "--starts", "2"], capsys,
            f"{plain}: each half of the run has 1 start(s), not 2")
    refused(["reconstruct", *data, "-o", str(tmp_path / "z"), "--halves", "--starts", "0",
             *_FLAGS], capsys, "--starts must be at least 1, got 0")
    refused(["choose-run", str(run / "half_A"), str(run / "half_B")], capsys,
            str(run / "half_A"))


def _half_scores(run, which: int) -> np.ndarray:
    star = run / "poses.star"  # the combined star: each particle's score under its half's map
    ps = read_relion_star(star, no_ctf=True, metadata_only=True, box_px=L)
    assert ps.star_table is not None
    scores = numbers(ps.star_table[SCORE_COLUMN])
    return scores[np.load(run / "half_set.npy") == which]


def test_the_halves_own_fit_is_recorded_and_reported(run):
    fit = json.loads((run / "fsc.json").read_text())["half_fit"]
    means = [float(np.mean(_half_scores(run, w))) for w in (1, 2)]
    assert fit["mean_score_nats"] == pytest.approx(means, rel=1e-6)
    gap = abs(means[0] - means[1]) / max(means)
    assert fit["relative_gap"] == pytest.approx(gap, rel=1e-6)
    assert fit["agree"] == (gap <= HALF_FIT_GAP) and fit["threshold"] == HALF_FIT_GAP
    assert "the halves' own fit: mean particle score" in (run / "run.log").read_text()
    assert f"{100 * gap:.1f} % apart" in (run / "report.html").read_text()


def test_a_half_that_fits_its_images_clearly_worse_is_warned_about(run, data, tmp_path,
                                                                    caplog):
    """Half B's scores lowered by a fifth in its chosen start's ``poses.star`` (as a half on
    a wrong structure has them): the combination warns, ``fsc.json`` and the report say so."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    star = copy / "half_B" / "chosen" / "poses.star"
    blocks = starfile.read(star, always_dict=True)
    table = blocks["particles"]
    table[SCORE_COLUMN] = table[SCORE_COLUMN] * 0.8 - 0.2 * abs(table[SCORE_COLUMN].mean())
    starfile.write(blocks, star, overwrite=True)
    particles = load_particles(data[0], ctf_pkl=data[2])
    config = load_config(copy / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="cryospin.train.halves"):
        combine_halves(copy, particles, np.load(copy / "half_set.npy"), config=config)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("half B's map explains its images clearly worse" in w for w in warned), warned
    fit = json.loads((copy / "fsc.json").read_text())["half_fit"]
    assert fit["agree"] is False and fit["relative_gap"] > HALF_FIT_GAP
    assert main(["report", str(copy)]) == 0
    page = html.unescape((copy / "report.html").read_text())
    assert "one half explains its images clearly worse" in page


def test_a_half_without_its_choice_is_named(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    (copy / "half_B" / "chosen").unlink()  # as before half B's choice was made
    refused(["report", str(copy)], capsys,
            f"{copy / 'half_B'}: the half has no chosen start (not every start has finished)")
