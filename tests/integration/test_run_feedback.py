"""Feedback during a run, end to end on tiny data (16 px, 32 particles): ``RUN_DIR/run.log``
(what the console shows, with date and time; appended on ``--resume``; the command line's own
end-of-run lines included) and the progress lines shown without a terminal: every epoch, the
switch's inference pass and the final backprojection, with stage, epoch and ETAs. The clock of
the progress display is replaced by one that advances 1 s per reading, so the lines and their
numbers do not depend on the machine's speed."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from tests._synthetic import make_dataset

from cryospin.cli.main import main as cli_main
from cryospin.encoder import MultiHeadPoseEncoder
from cryospin.io.particles import load_particles
from cryospin.train import feedback as feedback_module
from cryospin.train import fit as fit_module
from cryospin.train.autoencode import infer_best_poses
from cryospin.train.config import build_config
from cryospin.train.data import prepare_data
from cryospin.train.fit import fit
from cryospin.volume import HartleyVolume

N, L = 32, 16
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """32 noisy 16 px images of a blob volume with CTF (particles.mrcs, ctf.pkl)."""
    folder = tmp_path_factory.mktemp("feedback_data")
    make_dataset(folder, box_px=L, n=N, seed=3, draw_order=("defocus", "rotations"), n_blobs=5,
                 spread_px=7.0, variance_px2=1.5)
    return folder


def _particles(folder: Path):
    return load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")


def _config(**run):
    """3 epochs: 1 stage-1, 2 search epochs (the default preset's search is cut by epochs)."""
    return build_config("default", {
        "model": {"num_heads": 2, "width_multiplier": 0.125, "head_hidden": 16,
                  "precision": "fp32", "encoder_box_px": None},
        "optim": {"batch_size": 16, "search_rotations": 64, "search_radius_px": 3.0},
        "schedule": {"epochs": 3, "switch_epoch": 1},
        "run": {"device": "cpu", "num_threads": 1, "seed": 2, "track_particles": 0,
                "keep_epoch_maps": False, **run},
    })


def _lines(path: Path) -> list[str]:
    """The first line of every record of run.log, without its date and time; the records'
    further lines (a table, a traceback) are left out."""
    text = path.read_text(encoding="utf-8")
    assert re.match(STAMP, text)
    return [f"{m[1]} {m[2]}" for m in re.finditer(rf"^{STAMP} (\w+) (.*)$", text, re.M)]


def _run_log_attached() -> bool:
    return any(type(h).__name__ == "_RunLogHandler" for h in logging.getLogger().handlers)


def test_run_log_of_a_run_and_its_resume(data, tmp_path):
    run = tmp_path / "run"
    argv = ["cryospin", "reconstruct", "particles.mrcs", "-o", str(run)]
    partial = fit(_config(progress_interval_s=0.0), _particles(data), run, argv=argv,
                  stop_after=1)
    assert not partial.finished and not _run_log_attached()  # removed after the run
    first = _lines(run / "run.log")
    assert first[0] == f"INFO ==== started: cryospin reconstruct particles.mrcs -o {run} ===="
    assert any(line.startswith("INFO preprocessing 32 particles") for line in first)
    assert any(line.startswith("INFO epoch 1/3 autoencode: loss ") for line in first)

    resumed = ["cryospin", "reconstruct", "--resume", str(run)]
    done = fit(_config(progress_interval_s=0.0), _particles(data), run, resume=True,
               argv=resumed)
    assert done.finished and not _run_log_attached()
    lines = _lines(run / "run.log")
    assert lines[:len(first)] == first  # appended, never rewritten
    rest = lines[len(first):]
    assert rest[0] == f"INFO ==== resumed: cryospin reconstruct --resume {run} ===="
    assert any(line.startswith(f"INFO resuming {run} after epoch 1") for line in rest)
    assert any(line.startswith("INFO switch to auto-decoding") for line in rest)
    assert any(line.startswith("INFO epoch 3/3 autodecode: loss ") for line in rest)
    assert rest[-2].startswith(f"INFO wrote {run / 'map.mrc'}")
    assert rest[-1].startswith("INFO particle scores (rlnLogLikeliContribution in poses.star)")
    assert not any("images/s, ETA" in line for line in lines)  # progress_interval_s = 0


def test_the_inference_pass_reports_every_batch(data):
    """infer_best_poses (the switch's pass, the final poses of the amortized methods) calls
    its progress callback once per batch with the batch's size: the sizes sum to N."""
    config = _config()
    particles = _particles(data)
    training = prepare_data(particles, config.data, device=torch.device("cpu"))
    encoder = MultiHeadPoseEncoder(L, 2, width_multiplier=0.125, head_hidden=16)
    volume = HartleyVolume.ab_initio(L, training.radial_amplitude.cpu(),
                                     generator=torch.Generator().manual_seed(0))
    sizes: list[int] = []
    best = infer_best_poses(encoder, volume, training, batch_size=10, progress=sizes.append)
    assert sizes == [10, 10, 10, 2] and sum(sizes) == N == best.rotations.shape[0]
    sizes.clear()
    infer_best_poses(encoder, volume, training, batch_size=4, progress=sizes.append,
                     indices=torch.arange(1, N, 3))  # a rank's own particles
    assert sizes == [4, 4, 3]


def test_the_run_eta_says_how_soon_an_early_stop_of_the_search_would_end_it(data, tmp_path,
                                                                           monkeypatch):
    """6 epochs: stage 1 in epoch 1, at most 4 search epochs (2-5) that may stop from search
    epoch 2 (after epoch 3) on, then 1 local epoch. Until then each progress line gives the
    run's ETA as planned and, in brackets, if the search stopped after epoch 3; never in the
    local epoch."""
    clock = iter(range(1, 10**6))
    monkeypatch.setattr(feedback_module, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(feedback_module, "stderr_is_terminal", lambda: False)
    config = build_config("default", {
        "model": {"num_heads": 2, "width_multiplier": 0.125, "head_hidden": 16,
                  "precision": "fp32", "encoder_box_px": None},
        "optim": {"batch_size": 16, "search_rotations": 64, "search_radius_px": 3.0},
        "schedule": {"epochs": 6, "switch_epoch": 1, "search_epochs": 4,
                     "search_min_epochs": 2},
        "run": {"device": "cpu", "num_threads": 1, "seed": 2, "track_particles": 0,
                "keep_epoch_maps": False, "progress": True, "progress_interval_s": 1.0},
    })
    run = tmp_path / "run"
    assert fit(config, _particles(data), run).finished
    lines = [line[5:] for line in _lines(run / "run.log")
             if line.startswith("INFO epoch ") and "images/s, ETA" in line]
    early = re.compile(r", run (\d+) s \((\d+) s if the search stops after epoch 3\)$")
    firsts = [early.search(line) for line in lines if line.startswith(("epoch 1/", "epoch 2/"))]
    assert len(firsts) == 4  # two lines per epoch (32 images, batches of 16)
    assert all(m is not None and int(m[2]) < int(m[1]) for m in firsts), lines
    last = [line for line in lines if "(stage 2, local)" in line]
    assert last and not any("if the search stops" in line for line in last)


def test_progress_lines_without_a_terminal(data, tmp_path, monkeypatch):
    """stderr not a terminal, a bar wanted (the default): lines every second of the fake
    clock, i.e. after every batch, for the epochs, the switch's inference pass and the final
    backprojection."""
    clock = iter(range(1, 10**6))
    monkeypatch.setattr(feedback_module, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(feedback_module, "stderr_is_terminal", lambda: False)
    real_switch = fit_module.switch_poses

    def switch_by_inference(config, *args, **kwargs):  # whatever the preset's switch_poses
        kwargs.pop("record", None)
        return real_switch(config, *args, **kwargs)

    monkeypatch.setattr(fit_module, "switch_poses", switch_by_inference)
    run = tmp_path / "run"
    result = fit(_config(progress=True, progress_interval_s=1.0, inference_batch_size=10),
                 _particles(data), run)
    assert result.finished

    lines = [line[5:] for line in _lines(run / "run.log") if line.startswith("INFO ")]
    # epoch 1, first batch: 16 images 1 s after the start, 16 more at 16 images/s (1 s), then
    # 2 * 32 of the search epochs, unmeasured: at 1.6x stage 1's rate (relative_speed, 25.6
    # images/s: 2.5 s), and the final map with the scores (32 * 1.25 C1 images at 3.6 * 64/16
    # times stage 1's rate: 0.17 s); 3.67 s in all (4 s), then 2.67 s (3 s)
    assert ("epoch 1/3 (stage 1): 16/32 images (50 %), 16.0 images/s, ETA epoch 1 s, run 4 s"
            in lines)
    assert "epoch 1/3 (stage 1): 32/32 images (100 %), 16.0 images/s, ETA epoch 0 s, run " \
           "3 s" in lines
    assert [line for line in lines if line.startswith("switch: inference pass")] == [
        f"switch: inference pass: {n}/32 images ({100 * n / 32:.0f} %), 10.0 images/s, "
        f"ETA pass {(32 - n) / 10:.0f} s" for n in (10, 20, 30, 32)][:3] + [
        "switch: inference pass: 32/32 images (100 %), 8.0 images/s, ETA pass 0 s"]
    stage2 = [line for line in lines if line.startswith("epoch 2/3 (stage 2, search): ")]
    assert len(stage2) == 2 and all(", ETA epoch " in x and ", run " in x for x in stage2)
    assert any(line.startswith("epoch 3/3 (stage 2, search): 32/32 images (100 %)")
               and line.endswith(", run 0 s") for line in lines)
    # the final map's pass over the images it keeps (those scoring above an empty image or
    # junk: how many depends on this tiny set's map)
    assert any(re.match(r"final map: backprojection: (\d+)/\1 images \(100 %\)", line)
               for line in lines)


def test_cli_run_log_has_the_printed_lines_and_a_separator_per_invocation(data, tmp_path,
                                                                          capsys):
    run = tmp_path / "cli"
    common = ["--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "16",
              "--device", "cpu", "--threads", "1", "--no-progress", "--seed", "5",
              "--search-rotations", "64", "--search-radius", "3"]
    first = ["reconstruct", str(data / "particles.mrcs"), "--ctf", str(data / "ctf.pkl"),
             "-o", str(run), "--epochs", "1", "--switch-epoch", "1", *common]
    assert cli_main(first) == 0
    assert cli_main(["reconstruct", "--resume", str(run), "--epochs", "2",
                     "--progress-interval", "0"]) == 0
    out = capsys.readouterr().out
    assert "done: 2 epochs" in out
    lines = _lines(run / "run.log")
    headers = [i for i, line in enumerate(lines) if line.startswith("INFO ==== ")]
    assert len(headers) == 2  # one per invocation (the CLI's; fit adds none inside it)
    assert lines[headers[0]].startswith("INFO ==== started: cryospin reconstruct ")
    assert lines[headers[1]] == (f"INFO ==== resumed: cryospin reconstruct --resume {run} "
                                 "--epochs 2 --progress-interval 0 ====")
    before, after = lines[:headers[1]], lines[headers[1]:]
    assert any(line.startswith("INFO contrast check on ") for line in before)
    assert any(line.startswith("INFO done: 1 epochs; map ") for line in before)
    assert any(line.startswith("INFO done: 2 epochs; map ") for line in after)
    assert not _run_log_attached()
