"""``cryospin reconstruct --starts K``: K ordinary runs from consecutive seeds, the one with
the lowest final loss chosen (``choice.json``, the ``chosen`` link), resumable, with its
refusals."""

from __future__ import annotations

import json

import pytest
from tests._cli import refused
from tests._synthetic import make_dataset

from cryospin.cli.main import main
from cryospin.rundir import Checkpoint, read_metrics
from cryospin.train import starts as starts_module
from cryospin.train.config import load_config
from cryospin.train.fit import TrainingInterrupted

_FLAGS = ["--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "32",
          "--search-rotations", "256", "--device", "cpu", "--threads", "1", "--no-progress",
          "--epochs", "3", "--switch-epoch", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("starts") / "data"
    made = make_dataset(folder, box_px=16, n=64, seed=5)
    return [str(made.folder / "particles.mrcs"), "--ctf", str(made.folder / "ctf.pkl")]


@pytest.fixture(scope="module")
def two_starts(data, tmp_path_factory):
    """``--starts 2 --seed 4`` run to the end; its folder and what it printed."""
    run = tmp_path_factory.mktemp("two") / "run"
    assert main(["reconstruct", *data, "-o", str(run), "--starts", "2", "--seed", "4",
                 *_FLAGS]) == 0
    return run


def _final_losses(run) -> list[float]:
    return [read_metrics(run / f"start_{k}" / "metrics.jsonl")[-1]["loss"] for k in (1, 2)]


def test_each_start_is_an_ordinary_run_from_its_own_seed(two_starts, data, tmp_path):
    marker = json.loads((two_starts / "starts.json").read_text())
    assert (marker["starts"], marker["seeds"]) == (2, [4, 5])
    assert [load_config(two_starts / f"start_{k}" / "config.yaml").run.seed
            for k in (1, 2)] == [4, 5]
    for k in (1, 2):
        for name in ("map.mrc", "poses.star", "report.html"):
            assert (two_starts / f"start_{k}" / name).is_file()
    # the premise of comparing final losses: both starts fit the same rows under one noise
    # variance (estimated from the data, not the seed)
    data_1, data_2 = (Checkpoint.load(two_starts / f"start_{k}" / "checkpoint.pt").data
                      for k in (1, 2))
    assert data_1["noise_variance_hartley"] == data_2["noise_variance_hartley"]
    assert data_1 == data_2
    plain = tmp_path / "plain"  # the same command without --starts, seed 5: start 2's run
    assert main(["reconstruct", *data, "-o", str(plain), "--seed", "5", *_FLAGS]) == 0
    assert ([r["loss"] for r in read_metrics(plain / "metrics.jsonl")]
            == [r["loss"] for r in read_metrics(two_starts / "start_2" / "metrics.jsonl")])


def test_the_start_with_the_lowest_final_loss_is_chosen_and_linked(two_starts):
    losses = _final_losses(two_starts)
    best = 1 if losses[0] <= losses[1] else 2
    choice = json.loads((two_starts / "choice.json").read_text())
    assert choice["chosen"] == str(two_starts / f"start_{best}")
    assert [r["final_loss_nats"] for r in choice["runs"]] == losses
    other = choice["runs"][2 - best]
    assert set(other["map_vs_chosen"]) == {"correlation", "mirrored",
                                           "fsc_0.5_resolution_angstrom"}
    link = two_starts / "chosen"
    assert link.is_symlink() and str(link.readlink()) == f"start_{best}"
    assert (link / "map.mrc").samefile(two_starts / f"start_{best}" / "map.mrc")
    log = (two_starts / "run.log").read_text()
    assert "start 1 of 2 (start_1, seed 4)" in log and "start 2 of 2 (start_2, seed 5)" in log
    assert "start 1 of 2 took " in log and "; the 1 left, about " in log
    assert "seed 4): starting it; the ETAs below are this start's, 1 more follow" in log
    assert "seed 5): starting it\n" in log
    assert f"the chosen one is {link} -> start_{best}" in log


def test_stopped_starts_resume_to_the_same_choice(two_starts, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["reconstruct", *data, "-o", str(run), "--starts", "2", "--seed", "4",
                 "--stop-after", "2", *_FLAGS]) == 0
    assert "stopped after epoch(s) 2, 2 of the 2 starts" in capsys.readouterr().out
    assert not (run / "choice.json").exists() and not (run / "chosen").exists()
    assert main(["reconstruct", "--resume", str(run)]) == 0
    assert _final_losses(run) == _final_losses(two_starts)
    chosen = json.loads((run / "choice.json").read_text())["chosen"]
    assert chosen.replace(str(run), "") == json.loads(
        (two_starts / "choice.json").read_text())["chosen"].replace(str(two_starts), "")


def test_an_interrupted_start_names_the_starts_folder_and_resumes(data, tmp_path, capsys,
                                                                  monkeypatch):
    run = tmp_path / "run"
    real = starts_module.fit
    calls = []

    def second_start_interrupted(config, particles, folder, **kwargs):
        calls.append(folder.name)
        if folder.name == "start_2":
            raise TrainingInterrupted(folder, 0)
        return real(config, particles, folder, **kwargs)

    monkeypatch.setattr(starts_module, "fit", second_start_interrupted)
    assert main(["reconstruct", *data, "-o", str(run), "--starts", "2", *_FLAGS]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(starts_module, "fit", real)
    assert main(["reconstruct", "--resume", str(run)]) == 0
    assert calls == ["start_1", "start_2"]
    assert (run / "chosen").is_symlink()
    assert "start_1 (seed 0) is finished (3 epochs)" in (run / "run.log").read_text()


def test_refusals(two_starts, data, tmp_path, capsys):
    refused(["reconstruct", *data, "-o", str(tmp_path / "a"), "--starts", "0", *_FLAGS],
            capsys, "--starts must be at least 1, got 0")
    refused(["reconstruct", "--resume", str(two_starts), "--starts", "3"], capsys,
            f"{two_starts}: the run has 2 starts, not 3")
    refused(["reconstruct", "--resume", str(two_starts / "start_1"), "--starts", "2"], capsys,
            "--starts cannot be added on --resume")
    refused(["reconstruct", *data, "-o", str(two_starts), *_FLAGS], capsys,
            f"{two_starts}: already holds a run")
    refused(["reconstruct", *data, "-o", str(two_starts), "--starts", "2", *_FLAGS], capsys,
            f"{two_starts}: already holds a run")


def test_the_report_of_a_starts_run_is_its_chosen_starts(two_starts, tmp_path, capsys):
    chosen = (two_starts / "chosen").resolve().name
    assert main(["report", str(two_starts), "-o", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert f"a --starts run: the report of the chosen start, {chosen}" in out
    assert (tmp_path / "r.html").is_file()
    (two_starts / "chosen").rename(tmp_path / "link")  # as before the choice was made
    try:
        refused(["report", str(two_starts)], capsys, "a --starts run without a choice yet",
                f"cryospin report {two_starts / 'start_1'}")
    finally:
        (tmp_path / "link").rename(two_starts / "chosen")


def test_each_starts_report_shows_the_choice(two_starts):
    choice = json.loads((two_starts / "choice.json").read_text())
    for row in choice["runs"]:
        name = row["run_dir"].rsplit("/", 1)[-1]
        page = (two_starts / name / "report.html").read_text()
        assert "Several starts" in page
        assert f"This run is <b>{name}</b>, one of the 2 starts" in page
        if row["chosen"]:
            assert "the chosen one: its images fit best" in page
        else:
            assert (f"not the chosen one: its final loss is {row['above_lowest_nats']:.2f} "
                    "nats per image above") in page
        for other in choice["runs"]:
            assert f"<td>{other['final_loss_nats']:.2f}</td>" in page
        assert (two_starts / name / "report" / "starts_loss.png").stat().st_size > 0

