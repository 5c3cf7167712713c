"""``cryospin choose-run`` on runs that ``cryospin reconstruct`` made: the table, the choice
(the lowest last-epoch loss of ``metrics.jsonl``), the JSON, and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from tests._cli import refused
from tests._synthetic import blob_volume, make_dataset

from cryospin.cli.main import main
from cryospin.io.mrc import write_map
from cryospin.rundir import read_metrics
from cryospin.train.choice_record import map_agreement

_COMMON = ["--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "32",
           "--search-rotations", "256", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished 16 px runs of the same particles: seeds 1 and 2 (one thread), and seed
    3 with two threads and float32 named (settings that may differ); the folder."""
    folder = tmp_path_factory.mktemp("choose")
    data = make_dataset(folder / "data", box_px=16, n=64, seed=4)
    inputs = [str(data.folder / "particles.mrcs"), "--ctf", str(data.folder / "ctf.pkl")]
    for seed, threads in ((1, 1), (2, 1), (3, 2)):
        assert main(["reconstruct", *inputs, "-o", str(folder / f"s{seed}"), "--epochs", "3",
                     "--switch-epoch", "1", "--seed", str(seed), "--threads", str(threads),
                     *_COMMON]) == 0
    assert main(["reconstruct", *inputs, "-o", str(folder / "longer"), "--epochs", "4",
                 "--switch-epoch", "1", "--seed", "1", "--threads", "1", *_COMMON]) == 0
    return folder


def test_the_run_whose_last_epoch_fit_best_is_chosen(runs, capsys):
    names = ["s1", "s2", "s3"]
    final = {n: read_metrics(runs / n / "metrics.jsonl")[-1]["loss"] for n in names}
    best = min(names, key=lambda n: (final[n], names.index(n)))
    assert main(["choose-run", *(str(runs / n) for n in names), "-o",
                 str(runs / "chosen.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("3 runs of the same 64 particles; chosen by the lowest final loss")
    rows = {line.split()[0]: line for line in out[2:5]}
    for n in names:
        line = rows[str(runs / n)]
        assert f"{final[n]:.2f}" in line and f"{final[n] - final[best]:.2f}" in line
        assert line.endswith("<- chosen") == (n == best)
    assert out[5].startswith(f"chosen: {runs / best} (map {runs / best / 'map.mrc'})")
    record = json.loads((runs / "chosen.json").read_text())
    assert record["chosen"] == str(runs / best)
    assert [r["final_loss_nats"] for r in record["runs"]] == [final[n] for n in names]
    assert [r["seed"] for r in record["runs"]] == [1, 2, 3]
    assert [r["chosen"] for r in record["runs"]] == [n == best for n in names]


def test_one_run_is_refused(runs, capsys):
    refused(["choose-run", str(runs / "s1")], capsys,
            "give at least two run folders to choose from")


def test_a_run_with_other_settings_is_refused_by_name(runs, capsys):
    refused(["choose-run", str(runs / "s1"), str(runs / "longer")], capsys,
            f"{runs / 'longer'}: not comparable with {runs / 's1'}",
            "schedule.epochs 4 vs 3")


def test_an_unfinished_run_is_refused_with_the_resume_command(runs, tmp_path, capsys):
    data = runs / "data"
    run = tmp_path / "part"
    assert main(["reconstruct", str(data / "particles.mrcs"), "--ctf", str(data / "ctf.pkl"),
                 "-o", str(run), "--epochs", "3", "--switch-epoch", "1", "--seed", "1",
                 "--threads", "1", "--stop-after", "2", *_COMMON]) == 0
    capsys.readouterr()
    refused(["choose-run", str(runs / "s1"), str(run)], capsys,
            f"{run}: the run has not finished (last epoch 2",
            f"cryospin reconstruct --resume {run}")


def test_maps_adds_each_maps_agreement_with_the_chosen_one(runs, capsys):
    names = ["s1", "s2", "s3"]
    assert main(["choose-run", *(str(runs / n) for n in names), "--maps", "-o",
                 str(runs / "maps.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("; maps aligned onto the chosen one's")
    assert out[1].split()[-4:] == ["correlation", "FSC", "0.5", "Å"]
    record = json.loads((runs / "maps.json").read_text())
    for row, line in zip(record["runs"], out[2:5], strict=True):
        if row["chosen"]:
            assert "map_vs_chosen" not in row and line.split()[-4:-2] == ["-", "-"]
            continue
        agreement = row["map_vs_chosen"]
        assert -1 <= agreement["correlation"] <= 1
        assert f"{agreement['correlation']:.3f}" in line


def test_a_mirrored_copy_of_the_chosen_map_agrees_with_it(tmp_path):
    """map_agreement finds the hand and the alignment: a map against its own mirror image,
    rotated a quarter turn, correlates fully and agrees at every shell (FSC = 0.5 never
    crossed: the Nyquist resolution, 2 voxels)."""
    volume = blob_volume(24, torch.Generator().manual_seed(2)).float()
    write_map(tmp_path / "a.mrc", volume.numpy(), 3.0)
    moved = torch.rot90(volume.flip(-1), 1, dims=(1, 2))
    write_map(tmp_path / "b.mrc", moved.numpy(), 3.0)
    agreement = map_agreement(tmp_path / "a.mrc", tmp_path / "b.mrc")
    assert agreement.flipped
    assert agreement.correlation > 0.999
    assert agreement.resolution_angstrom == 2 * 3.0
