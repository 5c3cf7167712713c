"""End-to-end tests of the trainer and ``cryospin reconstruct`` on tiny simulated data.

The particles are made with cryospin's own forward model (central slices, CTF, shift, white
noise). That is an "inverse crime", acceptable here: these tests check that training runs,
improves, writes its outputs, resumes exactly and fails cleanly — not absolute accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from tests._synthetic import SyntheticDataset, make_dataset

from cryospin.cli.main import main as cli_main
from cryospin.errors import CryospinError
from cryospin.forward.ctf import compute_ctf
from cryospin.forward.hartley import hartley3
from cryospin.forward.model import render
from cryospin.io.cs import read_cryosparc
from cryospin.io.mrc import read_map, write_stack
from cryospin.io.particle_set import ParticleSet
from cryospin.io.particles import load_indices, load_particles
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.io.star_tables import read_star_tables
from cryospin.report.analysis import run_summary
from cryospin.report.html import run_summary_rows
from cryospin.rotations import random_rotations
from cryospin.rundir import load_checkpoint, load_run, read_metrics, save_checkpoint
from cryospin.train import fit as fit_module
from cryospin.train import switch as switch_module
from cryospin.train.config import build_config, load_config
from cryospin.train.fit import TrainingInterrupted, fit
from cryospin.train.metrics import NonFiniteLossError
from cryospin.train.progress import BACKPROJECT

# ----------------------------------------------------------------------------- data


def _particles(data: SyntheticDataset):
    folder = data.folder
    return load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")


def _tiny_config(**changes):
    """Small and fast: 16 px, 3 heads, narrow float32 encoder, one thread."""
    overrides = {
        "model": {"num_heads": 3, "width_multiplier": 0.125, "head_hidden": 32,
                  "precision": "fp32", "predict_shifts": True, "max_shift_px": 2.0},
        "optim": {"batch_size": 32, "encoder_lr": 1e-3, "search_rotations": 256,
                  "search_radius_px": 3.0},
        "schedule": {"epochs": 3, "switch_epoch": 1},
        "run": {"device": "cpu", "num_threads": 1, "seed": 3, "progress": False},
    }
    for section, values in changes.items():
        overrides.setdefault(section, {}).update(values)
    return build_config("default", overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SyntheticDataset:
    return make_dataset(tmp_path_factory.mktemp("tiny"), box_px=16, n=64, seed=1,
                        max_shift_px=1.0)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The reference run: 3 epochs (1 auto-encoding + 2 auto-decoding), never stopped."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = fit(_tiny_config(), _particles(tiny), run_dir)
    return result


# ----------------------------------------------------------------------------- outputs


def test_final_map_decoder_is_the_trained_volume(tiny, tmp_path):
    """``run.final_map = "decoder"``: map.mrc is the trained volume, no map_decoder.mrc."""
    result = fit(_tiny_config(schedule={"epochs": 2}, run={"final_map": "decoder"}),
                 _particles(tiny), tmp_path / "run")
    run = result.run_dir
    assert not (run / "map_decoder.mrc").exists()
    np.testing.assert_array_equal(read_map(run / "map.mrc")[0], read_map(run / "map.002.mrc")[0])


def test_outputs_and_round_trips(uninterrupted, tiny):
    run = uninterrupted.run_dir
    assert uninterrupted.finished and uninterrupted.epochs_completed == 3
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "map.mrc", "poses.star",
                 "poses.pkl", "map.001.mrc", "map.002.mrc", "map.003.mrc"):
        assert (run / name).is_file(), name
    assert not [p for p in run.iterdir() if ".tmp." in p.name]  # no temp files left

    # map_decoder.mrc: the trained volume = the last epoch's map; map.mrc: the backprojection
    # from the final poses (same voxel size, finite, agrees with the trained volume)
    final, voxel = read_map(run / "map.mrc")
    decoder, voxel_dec = read_map(run / "map_decoder.mrc")
    assert voxel == pytest.approx(4.0) and voxel_dec == pytest.approx(4.0)
    assert np.isfinite(final).all() and final.shape == (16, 16, 16)
    np.testing.assert_array_equal(decoder, read_map(run / "map.003.mrc")[0])
    from cryospin.train.data import prepare_data
    from cryospin.train.outputs import final_backprojection

    config = _tiny_config()
    again = final_backprojection(
        _particles(tiny), prepare_data(_particles(tiny), config.data, device=torch.device("cpu")),
        uninterrupted.rotations, uninterrupted.shifts_px, seed=config.run.seed,
    )
    np.testing.assert_allclose(final, again.numpy(), rtol=1e-5, atol=1e-6 * np.abs(final).max())
    assert not np.array_equal(final, decoder)

    # metrics: one line per epoch, stages, switch info, pose change in stage 2
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["stage"] for r in rows] == ["autoencode", "autodecode", "autodecode"]
    assert len(rows[0]["head_usage"]) == 3 and sum(rows[0]["head_usage"]) == pytest.approx(1)
    assert "switch" in rows[1]["extra"]
    assert rows[1]["mean_pose_change_deg"] > 0 and rows[2]["mean_shift_change_px"] >= 0
    assert all(r["images_per_s"] > 0 and r["num_images"] == 64 for r in rows)

    # poses.star read back equals the pose table of the checkpoint
    state = load_checkpoint(run / "checkpoint.pt")
    table_rot = state["pose_table"]["rotations"].double()
    table_shift = state["pose_table"]["shifts_px"].double()
    back = load_particles(run / "poses.star", datadir=tiny.folder)
    assert len(back) == 64 and back.box_px == 16
    torch.testing.assert_close(back.rotations, table_rot, atol=2e-5, rtol=0)
    torch.testing.assert_close(back.shifts_px, table_shift, atol=1e-4, rtol=0)
    torch.testing.assert_close(back.ctf.defocus_u_angstrom,
                               _particles(tiny).ctf.defocus_u_angstrom, atol=1e-2, rtol=0)
    rot_pkl, shift_pkl = read_cryodrgn_poses(run / "poses.pkl", 16)
    torch.testing.assert_close(rot_pkl, table_rot, atol=1e-6, rtol=0)
    torch.testing.assert_close(shift_pkl, table_shift, atol=1e-5, rtol=0)

    # config.yaml gives back the run's configuration
    assert load_config(run / "config.yaml") == _tiny_config()


def test_poses_star_holds_each_particles_score_and_selected_pkl_the_others(uninterrupted,
                                                                          tiny):
    """``rlnLogLikeliContribution``: each particle's score recomputed from the checkpoint's
    volume and pose table (:func:`particle_scores`; against junk too when the last epoch's
    junk fraction let the class weigh in); ``selected.pkl``: those above the empty-image
    line, readable as ``--ind``."""
    from cryospin.train.data import prepare_data
    from cryospin.train.scores import EMPTY_SCORE, junk_takes_effect, particle_scores
    from cryospin.volume import HartleyVolume

    run = uninterrupted.run_dir
    table, _ = read_star_tables(run / "poses.star")
    written = table["rlnLogLikeliContribution"].astype(float).to_numpy()
    state = load_checkpoint(run / "checkpoint.pt")
    data = prepare_data(_particles(tiny), _tiny_config().data, device=torch.device("cpu"))
    volume = HartleyVolume(16, init_scale=0.0)
    volume.load_state_dict(state["volume"])
    junk = junk_takes_effect(read_metrics(run / "metrics.jsonl")[-1]["junk_fraction"])
    with torch.no_grad():
        again = particle_scores(volume(), state["pose_table"]["rotations"],
                                state["pose_table"]["shifts_px"], data, junk_class=junk)
    np.testing.assert_allclose(written, again.numpy(), atol=1e-3, rtol=1e-6)
    assert (written > EMPTY_SCORE).any()
    selected = load_indices(run / "selected.pkl", n=64)
    np.testing.assert_array_equal(selected, np.flatnonzero(written > EMPTY_SCORE))


def _assert_final_map_of(result, particles, config, keep: np.ndarray) -> None:
    """The run's ``map.mrc`` is the backprojection of the particles ``keep`` alone."""
    from cryospin.train.data import prepare_data
    from cryospin.train.outputs import final_backprojection

    data = prepare_data(particles, config.data, device=torch.device("cpu"))
    expected = final_backprojection(particles, data, result.rotations, result.shifts_px,
                                    seed=config.run.seed, keep=keep)
    final = read_map(result.run_dir / "map.mrc")[0]
    np.testing.assert_allclose(final, expected.numpy(), rtol=1e-5,
                               atol=1e-6 * np.abs(final).max())


def test_the_empty_class_finds_the_empty_images_and_the_final_map_leaves_them_out(
        tiny, tmp_path, caplog):
    """``model.empty_class``: a quarter of the images replaced by noise alone; each stage-2
    epoch logs and records the share of images more likely empty (its value is measured on
    the 64 px sets, benchmarks/RESULTS.md), and the final map is the backprojection of the
    particles scoring above an empty image."""
    import logging

    folder = tmp_path / "data"
    folder.mkdir()
    images = np.array(read_map(tiny.folder / "particles.mrcs")[0], dtype=np.float64)
    rng = np.random.default_rng(0)
    sigma = images[:, 0, :].std()  # the noise: the blobs leave the box's edge empty
    images[48:] = rng.normal(0.0, sigma, size=images[48:].shape)  # 16 empty images
    write_stack(folder / "particles.mrcs", images, 4.0)
    particles = load_particles(folder / "particles.mrcs", ctf_pkl=tiny.folder / "ctf.pkl")
    # the plain search decision: on this faint 16 px set the noise images' best poses score
    # within a few nats of an empty image, and the decision among polished candidates
    # (search_candidates 4) fits their noise better (all 16 then score 1-10 nats above 0; 6 of
    # 16 at or below it with 1). At 64 px (30 % empty images) both leave out exactly the
    # empty images: benchmarks/RESULTS.md, "The search's decision on a wider disc".
    config = _tiny_config(model={"empty_class": True, "junk_class": False},
                          schedule={"epochs": 5}, optim={"search_candidates": 1})
    with caplog.at_level(logging.INFO, logger="cryospin"):
        result = fit(config, particles, tmp_path / "run")
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[0]["empty_fraction"] is None  # stage 1
    assert all(0.0 <= r["empty_fraction"] <= 1.0 for r in rows[1:])
    assert "% of the images more likely empty" in caplog.text
    table, _ = read_star_tables(result.run_dir / "poses.star")
    scores = table["rlnLogLikeliContribution"].astype(float).to_numpy()
    # every empty image scores below every particle; some of them (a map of 64 tiny
    # particles is faint: the others' best-fitting poses score a few nats above 0) at or
    # below the line, and no particle
    assert scores[48:].max() < scores[:48].min()
    keep = np.flatnonzero(scores > 0)
    assert 48 <= keep.size < 64
    assert f"({64 - keep.size:,} scoring no better than an empty image left out)" in caplog.text
    _assert_final_map_of(result, particles, config, keep)


def _with_other_structure(folder: Path, snr: float) -> ParticleSet:
    """128 images of a blob density at 16 px, the last 32 replaced by those of another
    density (a second simulated set: other blobs, its own CTF and noise), at ``snr``."""
    base = make_dataset(folder / "base", box_px=16, n=128, seed=1, snr=snr)
    other = make_dataset(folder / "other", box_px=16, n=128, seed=7, snr=snr)
    images = np.array(read_map(base.folder / "particles.mrcs")[0], dtype=np.float64)
    images[96:] = np.array(read_map(other.folder / "particles.mrcs")[0])[96:]
    write_stack(folder / "particles.mrcs", images, 4.0)
    return load_particles(folder / "particles.mrcs", ctf_pkl=base.folder / "ctf.pkl")


def _junk_config(epochs: int):
    return _tiny_config(model={"empty_class": True, "junk_class": True,
                               "predict_shifts": False},
                        optim={"search_rotations": 1024}, schedule={"epochs": epochs})


def _final_scores(result, particles, config, *, junk_class: bool) -> np.ndarray:
    """The scores of the finished run recomputed from its last checkpoint's volume and its
    final poses."""
    from cryospin.train.data import prepare_data
    from cryospin.train.scores import particle_scores
    from cryospin.volume import HartleyVolume

    data = prepare_data(particles, config.data, device=torch.device("cpu"))
    ckpt = load_checkpoint(result.run_dir / "checkpoint.pt")
    volume = HartleyVolume(data.box_px, init_scale=0.0)
    volume.load_state_dict(ckpt["volume"])
    with torch.no_grad():
        return particle_scores(volume(), result.rotations, None, data,
                               batch_size=config.run.inference_batch_size,
                               junk_class=junk_class).numpy()


@pytest.fixture(scope="module")
def junk_run(tmp_path_factory):
    """``model.junk_class`` at SNR 1 on a quarter of another density's images, 8 epochs."""
    folder = tmp_path_factory.mktemp("junk")
    particles = _with_other_structure(folder, snr=1.0)
    config = _junk_config(epochs=8)
    return particles, config, fit(config, particles, folder / "run")


def test_the_junk_class_weighs_in_once_the_map_beats_junk_and_scores_against_it(junk_run):
    """While most images fit junk better than the forming map the class is only counted;
    once fewer than half do it weighs in (``junk_weighted``), the scores in ``poses.star``
    are taken against the likelier of an empty image and junk, the other density's images
    score lower than the particles, and the final map is the backprojection of those above
    0."""

    particles, config, result = junk_run
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[0]["junk_fraction"] is None and rows[0]["junk_weighted"] is None  # stage 1
    fractions = [r["junk_fraction"] for r in rows[1:]]
    weighted = [r["junk_weighted"] for r in rows[1:]]
    assert fractions[0] >= 0.5 and weighted[0] is False  # the first stage-2 epoch: counted
    # each epoch weighs junk in exactly when the one before had fewer than half junk
    assert weighted[1:] == [f < 0.5 for f in fractions[:-1]]
    assert fractions[-1] < 0.5 and weighted[-1]
    log = (result.run_dir / "run.log").read_text()
    assert "% more likely junk (not yet weighed in)" in log
    table, _ = read_star_tables(result.run_dir / "poses.star")
    scores = table["rlnLogLikeliContribution"].astype(float).to_numpy()
    np.testing.assert_allclose(scores, _final_scores(result, particles, config, junk_class=True),
                               atol=0.01)
    assert np.median(scores[96:]) < np.median(scores[:96])
    keep = np.flatnonzero(scores > 0)
    assert 2 <= keep.size < 128
    assert f"({128 - keep.size:,} scoring no better than an empty image or junk left out)" in log
    _assert_final_map_of(result, particles, config, keep)


def test_the_report_of_a_junk_run_says_the_scores_are_against_junk(junk_run, tmp_path):
    """Its summary, histogram and summary row: against an empty image or junk; the epoch
    table's column of images more likely junk."""
    import json

    from cryospin.report import write_report

    _, _, result = junk_run
    page = write_report(result.run_dir, output=tmp_path / "report.html").html_path
    text = page.read_text()
    summary = json.loads((page.parent / page.stem / "summary.json").read_text())
    assert summary["particle_scores"]["against"] == "an empty image or junk"
    assert "particles no better than an empty image or junk" in text
    assert "images more likely junk" in text


def test_the_junk_gate_survives_a_resume(junk_run, tmp_path):
    """Stopped after the first epoch with fewer than half junk (the checkpoint carries its
    fraction, the next epoch's gate) and resumed: the same run as uninterrupted."""
    particles, config, result = junk_run
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    opened = next(r["epoch"] for r in rows[1:] if r["junk_fraction"] < 0.5)
    run = tmp_path / "run"
    fit(config, particles, run, stop_after=opened)
    assert (load_checkpoint(run / "checkpoint.pt")["extra"]["last_junk_fraction"]
            == pytest.approx(rows[opened - 1]["junk_fraction"]))
    fit(config, particles, run, resume=True)
    _assert_same_run(result.run_dir, run)
    assert ([r["junk_weighted"] for r in read_metrics(run / "metrics.jsonl")]
            == [r["junk_weighted"] for r in rows])


@pytest.mark.parametrize("whiten", [True, False])
def test_a_junk_class_that_never_takes_effect_leaves_the_empty_class_run(tmp_path, caplog,
                                                                        whiten):
    """At SNR 10 this tiny run's map never explains most images better than junk: the class
    is counted in every epoch but never weighs in, a warning says so (pointing to
    --whiten-noise when the run did not whiten), and the scores are those against an empty
    image alone."""
    import logging

    particles = _with_other_structure(tmp_path, snr=10.0)
    config = dataclasses.replace(_junk_config(epochs=5), data=dataclasses.replace(
        _junk_config(epochs=5).data, whiten_noise=whiten))
    with caplog.at_level(logging.INFO, logger="cryospin"):
        result = fit(config, particles, tmp_path / "run")
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert all(r["junk_fraction"] >= 0.5 and r["junk_weighted"] is False for r in rows[1:])
    assert "the junk class never took effect" in caplog.text
    # the hint to whiten the noise only when the run did not
    assert ("--whiten-noise" in caplog.text) is (not whiten)
    # the spectrum the run whitened with is saved (for the report), and only then
    assert (result.run_dir / "noise_spectrum.json").is_file() is whiten
    table, _ = read_star_tables(result.run_dir / "poses.star")
    scores = table["rlnLogLikeliContribution"].astype(float).to_numpy()
    np.testing.assert_allclose(scores, _final_scores(result, particles, config,
                                                     junk_class=False), atol=0.01)


def test_plain_run_records_a_convergence_check_not_a_resolution(uninterrupted):
    """A run without --halves ends with the FSC of map.mrc (backprojection) and
    map_decoder.mrc (trained volume), written and logged as a convergence check, pointing to
    --halves for a resolution (issue 16)."""
    import json

    from cryospin.evaluate.fsc import fsc

    run = uninterrupted.run_dir
    data = json.loads((run / "convergence_fsc.json").read_text())
    assert data["kind"] == "convergence check" and data["is_resolution"] is False
    assert "NOT a resolution" in data["note"] and "--halves" in data["note"]
    assert data["maps"] == ["map.mrc", "map_decoder.mrc"]
    assert not [k for k in data if "resolution" in k and k != "is_resolution"]
    final, apix = read_map(run / "map.mrc")
    trained, _ = read_map(run / "map_decoder.mrc")
    expected = fsc(np.array(final), np.array(trained), pixel_size_angstrom=apix)
    np.testing.assert_allclose(data["fsc"], expected.fsc, atol=1e-6)
    assert data["fsc_0.5_crossing_angstrom"] == pytest.approx(expected.resolution(0.5), rel=1e-6)
    log = (run / "run.log").read_text()
    (line,) = [x for x in log.splitlines() if "convergence check" in x]
    assert "NOT a resolution" in line and "cryospin reconstruct --halves" in line


def test_loss_decreases(uninterrupted):
    """Over the stage-2 epochs (one objective: the NLL of each particle's own pose; stage 1's
    winner-take-all loss over the heads is another). Measured: 139.8, then 129.8."""
    rows = read_metrics(uninterrupted.run_dir / "metrics.jsonl")
    stage2 = [r["loss"] for r in rows if r["stage"] == "autodecode"]
    assert len(stage2) == 2 and [r["stage"] for r in rows][0] == "autoencode"
    assert stage2[-1] < stage2[0], stage2


# ----------------------------------------------------------------------------- resume


def _assert_same_run(a: Path, b: Path) -> None:
    np.testing.assert_allclose(read_map(a / "map.mrc")[0], read_map(b / "map.mrc")[0],
                               rtol=0, atol=1e-6)
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    for key in ("rotations", "shifts_px"):
        torch.testing.assert_close(sa["pose_table"][key], sb["pose_table"][key],
                                   atol=1e-6, rtol=0)
    la = [(r["epoch"], r["stage"], r["loss"]) for r in read_metrics(a / "metrics.jsonl")]
    lb = [(r["epoch"], r["stage"], r["loss"]) for r in read_metrics(b / "metrics.jsonl")]
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    np.testing.assert_allclose([x[2] for x in la], [x[2] for x in lb], rtol=1e-6)


def test_resume_after_stage_one_equals_uninterrupted(uninterrupted, tiny, tmp_path):
    """Stopped at the end of stage 1 (the switch happens after resuming)."""
    run = tmp_path / "run"
    partial = fit(_tiny_config(), _particles(tiny), run, stop_after=1)
    assert not partial.finished and partial.epochs_completed == 1
    assert not (run / "map.mrc").exists()
    assert load_checkpoint(run / "checkpoint.pt")["stage"] == "autoencode"
    done = fit(_tiny_config(), _particles(tiny), run, resume=True)
    assert done.finished and done.epochs_completed == 3
    _assert_same_run(uninterrupted.run_dir, run)


@pytest.mark.parametrize("stop_after", [1, 2])
def test_old_format_checkpoint_resumes_equal_to_uninterrupted(uninterrupted, tiny, tmp_path,
                                                              stop_after):
    """A checkpoint as cryospin 0.1 wrote it (no ``data``, ``switch_record`` or
    ``extra.search_stopped_after``; the same format number) still resumes, in either stage,
    to the uninterrupted run (the typed ``rundir.Checkpoint`` reads it with defaults)."""
    run = tmp_path / "run"
    fit(_tiny_config(), _particles(tiny), run, stop_after=stop_after)
    state = load_checkpoint(run / "checkpoint.pt")
    for key in ("data", "switch_record"):
        del state[key]
    state["extra"] = {"elapsed_s": state["extra"]["elapsed_s"]}
    save_checkpoint(run / "checkpoint.pt", state)
    done = fit(_tiny_config(), _particles(tiny), run, resume=True)
    assert done.finished and done.epochs_completed == 3
    _assert_same_run(uninterrupted.run_dir, run)


def test_ctrl_c_keeps_checkpoint_and_resume_equals_uninterrupted(
    uninterrupted, tiny, tmp_path, monkeypatch
):
    """Ctrl-C in the middle of epoch 3: the epoch-2 checkpoint is used to finish the run."""
    run = tmp_path / "run"
    real_epoch = fit_module.autodecode_epoch

    def interrupted_in_epoch_3(*args, **kwargs):
        if kwargs["epoch"] == 3:
            def boom(images, loss):
                raise KeyboardInterrupt
            kwargs["progress"] = boom
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(fit_module, "autodecode_epoch", interrupted_in_epoch_3)
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        fit(_tiny_config(), _particles(tiny), run)
    assert info.value.last_epoch == 2
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    assert len(read_metrics(run / "metrics.jsonl")) == 2

    fit(_tiny_config(), _particles(tiny), run, resume=True)
    _assert_same_run(uninterrupted.run_dir, run)


def test_fp16_encoder_with_loss_scaling_and_cropped_input_resumes_exactly(tiny, tmp_path):
    """``precision fp16`` (the CUDA fallback) trains with a gradient scaler whose state is
    checkpointed; ``encoder_box_px`` feeds the trunk 8 px copies of the 16 px images. Stopped
    in stage 1 and resumed, the run equals the uninterrupted one."""
    cfg = _tiny_config(model={"precision": "fp16", "encoder_box_px": 8},
                       schedule={"epochs": 3, "switch_epoch": 2})
    ref = fit(cfg, _particles(tiny), tmp_path / "ref")
    assert ref.finished
    resolved = yaml.safe_load((ref.run_dir / "config.yaml").read_text())["resolved"]
    assert (resolved["precision"], resolved["encoder_box_px"]) == ("fp16", 8)
    assert load_config(ref.run_dir / "config.yaml") == cfg
    run = tmp_path / "run"
    fit(cfg, _particles(tiny), run, stop_after=1)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["optimizers"]["grad_scaler"]["scale"] > 0
    fit(cfg, _particles(tiny), run, resume=True)
    _assert_same_run(ref.run_dir, run)


def test_auto_precision_is_resolved_logged_and_recorded(tiny, tmp_path, caplog):
    caplog.set_level("INFO")
    result = fit(_tiny_config(model={"precision": "auto"}, schedule={"epochs": 1}),
                 _particles(tiny), tmp_path / "run")
    resolved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["resolved"]
    assert resolved["precision"] in ("fp32", "bf16")
    assert resolved["precision_reason"].startswith("auto: ")
    assert resolved["threads"] == 1 and resolved["cpu_capability"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("device "))
    assert f"precision {resolved['precision']}" in line and "1 threads" in line


def test_resume_may_change_the_precision(tiny, tmp_path):
    """A run may move to another machine: the stage-1 encoder continues in the new precision."""
    run = tmp_path / "run"
    fit(_tiny_config(schedule={"switch_epoch": 2}), _particles(tiny), run, stop_after=1)
    assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["precision"] == "fp32"
    done = fit(_tiny_config(model={"precision": "bf16"}, schedule={"switch_epoch": 2}),
               _particles(tiny), run, resume=True)
    assert done.finished
    assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["precision"] == "bf16"


def test_switch_from_the_last_stage1_epoch_needs_no_inference_pass(tiny, tmp_path, monkeypatch):
    """``schedule.switch_poses = last_epoch``: the pose table starts from the winners as trained
    on in the last stage-1 epoch (kept in that epoch's checkpoint for an exact resume), without
    the inference pass; ``inference`` still runs it."""
    calls = []
    for name in ("infer_best_poses", "infer_head_poses"):  # the two inference passes
        real = getattr(switch_module, name)

        def counted(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(switch_module, name, counted)
    cfg = _tiny_config(schedule={"switch_poses": "last_epoch", "epochs": 3, "switch_epoch": 2})
    run = tmp_path / "last"
    fit(cfg, _particles(tiny), run, stop_after=2)
    record = load_checkpoint(run / "checkpoint.pt")["switch_record"]
    assert record["rotations"].shape == (64, 3, 3)
    assert bool(torch.isfinite(record["loss"]).all()) and int(record["best_head"].min()) >= 0
    eye = torch.eye(3).expand(64, 3, 3)
    torch.testing.assert_close(record["rotations"] @ record["rotations"].transpose(-1, -2), eye,
                               rtol=0, atol=1e-5)
    fit(cfg, _particles(tiny), run, resume=True)
    assert calls == []
    switch = read_metrics(run / "metrics.jsonl")[2]["extra"]["switch"]
    assert switch["poses"] == "last_epoch"
    track = np.load(run / "pose_track.npz")  # epoch 3 starts from the recorded winners
    assert track["epochs"].tolist() == [1, 2, 3]

    ref = fit(_tiny_config(schedule={"switch_poses": "inference", "epochs": 3,
                                     "switch_epoch": 2}), _particles(tiny), tmp_path / "inf")
    assert len(calls) == 1 and ref.finished
    assert read_metrics(ref.run_dir / "metrics.jsonl")[2]["extra"]["switch"]["poses"] == \
        "inference"
    assert load_checkpoint(tmp_path / "inf" / "checkpoint.pt").get("switch_record") is None


def test_resume_rejects_a_changed_configuration(uninterrupted, tiny):
    changed = _tiny_config(model={"num_heads": 4}, schedule={"epochs": 4})
    with pytest.raises(CryospinError, match="model.num_heads"):
        fit(changed, _particles(tiny), uninterrupted.run_dir, resume=True)


# ----------------------------------------------------------------------------- failures


def test_nan_loss_stops_with_epoch_and_batch(tiny, tmp_path, monkeypatch):
    from cryospin.train import autodecode

    real = autodecode.pose_nll

    def nan_nll(*args, **kwargs):
        return real(*args, **kwargs) * float("nan")

    run = tmp_path / "run"
    fit(_tiny_config(), _particles(tiny), run, stop_after=1)
    monkeypatch.setattr(autodecode, "pose_nll", nan_nll)
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 1") as info:
        fit(_tiny_config(), _particles(tiny), run, resume=True)
    assert "\n" not in str(info.value)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1  # last good one kept


def test_used_output_folder_is_refused_before_training(uninterrupted, tiny):
    with pytest.raises(CryospinError, match="already holds a run"):
        fit(_tiny_config(), _particles(tiny), uninterrupted.run_dir)


# ----------------------------------------------------------------------------- CLI


def test_cli_reconstruct_and_resume(tiny, tmp_path, capsys):
    folder = tiny.folder
    run = tmp_path / "cli_run"
    common = ["--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "32",
              "--device", "cpu", "--threads", "1", "--no-progress", "--seed", "5"]
    status = cli_main(["reconstruct", str(folder / "particles.mrcs"), "--ctf",
                       str(folder / "ctf.pkl"), "-o", str(run), "--epochs", "1",
                       "--switch-epoch", "1", *common])
    assert status == 0
    cfg = load_config(run / "config.yaml")
    assert (cfg.model.num_heads, cfg.model.precision, cfg.run.seed) == (2, "fp32", 5)
    assert cfg.input.particles == str((folder / "particles.mrcs").resolve())

    # continue to a second epoch (the switch happens now)
    assert cli_main(["reconstruct", "--resume", str(run), "--epochs", "2"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["autoencode", "autodecode"]
    assert load_config(run / "config.yaml").schedule.epochs == 2

    # changing the model on resume is refused with one line
    assert cli_main(["reconstruct", "--resume", str(run), "--heads", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--heads" in err[0]


def test_cli_unwritable_output_fails_before_reading(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status = cli_main(["reconstruct", str(tmp_path / "missing.star"), "-o",
                       str(blocker / "run")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder" in err[0]


# ----------------------------------------------------------------------------- accuracy


def _best_lowres_correlation(
    rec: torch.Tensor, ref: torch.Tensor, *, radius: int = 5, num_rotations: int = 3000
) -> float:
    """Max over rotations (and the mirror) of the correlation of two maps' Hartley values on
    the shells ``1 ≤ |k| ≤ radius`` — a rotation- and hand-invariant similarity."""
    L = ref.shape[-1]
    h_rec, h_ref = hartley3(rec.double()), hartley3(ref.double())
    k = torch.arange(L, dtype=torch.float64) - L // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    r = (kx**2 + ky**2 + kz**2).sqrt()
    mask = (r >= 1) & (r <= radius)
    points = torch.stack([kx[mask], ky[mask], kz[mask]], -1)  # (Q, 3) xyz
    target = h_ref[mask]  # (Q,)
    G = random_rotations(num_rotations, generator=torch.Generator().manual_seed(0))
    best = -1.0
    for sign in (1.0, -1.0):  # H(-k) is the Hartley transform of the mirrored map
        q = sign * points @ G  # (R, Q, 3)
        grid = (q + L // 2) * (2.0 / (L - 1)) - 1.0
        samples = F.grid_sample(h_rec[None, None], grid.reshape(1, 1, 1, -1, 3),
                                align_corners=True).reshape(num_rotations, -1)  # (R, Q)
        corr = (samples * target).sum(-1) / (samples.norm(dim=-1) * target.norm())
        best = max(best, float(corr.max()))
    return best


@pytest.mark.slow
def test_reconstruction_improves_over_epochs(tmp_path):
    truth = make_dataset(tmp_path / "data", box_px=24, n=320, seed=2, snr=1.0,
                         max_shift_px=0.0)
    cfg = _tiny_config(
        model={"num_heads": 5, "width_multiplier": 0.25, "head_hidden": 64,
               "predict_shifts": False},
        optim={"batch_size": 64},
        schedule={"epochs": 6, "switch_epoch": 3},
    )
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, num_threads=2))
    result = fit(cfg, _particles(truth), tmp_path / "run")
    ref = truth.volume
    corr = [
        _best_lowres_correlation(torch.from_numpy(read_map(tmp_path / "run" /
                                                           f"map.{e:03d}.mrc")[0].copy()), ref)
        for e in range(1, 7)
    ]
    assert result.finished
    assert corr[-1] > corr[0] + 0.1, corr
    assert corr[-1] > 0.6, corr


def test_cli_ctrl_c_exits_130_with_resume_hint(tiny, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "autodecode_epoch", interrupted)
    folder = tiny.folder
    run = tmp_path / "run"
    status = cli_main(["reconstruct", str(folder / "particles.mrcs"), "--ctf",
                       str(folder / "ctf.pkl"), "-o", str(run), "--epochs", "2",
                       "--switch-epoch", "1", "--heads", "2", "--width", "0.125", "--no-bf16",
                       "--device", "cpu", "--threads", "1", "--no-progress"])
    assert status == 130
    err = capsys.readouterr().err
    assert f"--resume {run}" in err and "last complete epoch is 1" in err
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- data


def test_prepared_data_matches_the_images(tiny):
    from cryospin.forward.hartley import hartley2
    from cryospin.forward.lattice import disc_frequencies, disc_indices
    from cryospin.train.config import DataConfig
    from cryospin.train.data import prepare_data

    particles = _particles(tiny)
    data = prepare_data(particles, DataConfig(invert_contrast=True))
    raw = particles.images().double()
    scale = data.image_scale
    assert scale < 0  # inverted contrast
    torch.testing.assert_close(data.images.double(), raw * scale, rtol=1e-6, atol=1e-6)
    expected = hartley2(raw * scale).reshape(64, -1)[:, disc_indices(16)]
    torch.testing.assert_close(data.hartley.double(), expected, rtol=1e-5, atol=1e-4)
    ctf = compute_ctf(particles.ctf, 16, 4.0, frequencies=disc_frequencies(16).double())
    torch.testing.assert_close(data.ctf.double(), ctf, rtol=1e-5, atol=1e-6)
    assert torch.equal(data.frequencies[data.negation_index], -data.frequencies)
    assert data.radial_amplitude.shape == (9,) and bool((data.radial_amplitude > 0).all())
    # SNR 1: the corner (background) variance is the noise, about half the pixel variance
    assert 0.3 * 16**2 < data.noise_variance < 0.7 * 16**2


def test_batches_cover_every_particle_once():
    from cryospin.train.data import batch_indices

    g = torch.Generator().manual_seed(0)
    batches = list(batch_indices(65, 32, g))
    assert [len(b) for b in batches] == [32, 33]  # a lone last image joins the previous batch
    assert sorted(torch.cat(batches).tolist()) == list(range(65))
    again = list(batch_indices(65, 32, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_lazy_batches_equal_preloaded_batches(tiny):
    from cryospin.train.config import DataConfig
    from cryospin.train.data import prepare_data

    particles = _particles(tiny)
    eager = prepare_data(particles, DataConfig())
    lazy = prepare_data(particles, DataConfig(max_preload_gb=0))
    assert eager.preloaded and not lazy.preloaded
    assert lazy.noise_variance == eager.noise_variance
    assert torch.equal(lazy.radial_amplitude, eager.radial_amplitude)
    idx = torch.tensor([5, 0, 63, 17])
    a, b = eager.batch(idx), lazy.batch(idx)
    for name in ("indices", "images", "hartley", "ctf"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)


# ----------------------------------------------------------------------------- frequency marching


def test_sub_disc_is_a_closed_subset_of_the_training_disc():
    from cryospin.forward.lattice import disc_frequencies
    from cryospin.train.data import sub_disc

    full = disc_frequencies(16)  # (P, 2)
    disc = sub_disc(full, 16, 3.5)
    radius = disc.frequencies.double().norm(dim=-1)
    assert bool((radius <= 3.5).all())
    assert torch.equal(disc.frequencies, full[disc.columns])
    assert int(disc.columns.numel()) == int((full.double().norm(dim=-1) <= 3.5).sum())
    assert torch.equal(disc.frequencies[disc.negation_index], -disc.frequencies)


def test_gaussian_lowpass_keeps_the_mean_and_damps_high_frequencies():
    from cryospin.train.data import gaussian_lowpass

    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    out = gaussian_lowpass(images, 2.0)
    assert out.dtype == images.dtype and out.shape == images.shape
    torch.testing.assert_close(out.mean(dim=(-2, -1)), images.mean(dim=(-2, -1)))
    # the Nyquist checkerboard (|k| = 8√2) is damped by exp(-128 / 8)
    checker = (-1.0) ** (torch.arange(16)[:, None] + torch.arange(16)[None, :]).double()
    damped = gaussian_lowpass(checker[None], 2.0)
    torch.testing.assert_close(damped, checker[None] * math.exp(-128 / 8), rtol=1e-6, atol=1e-12)


def test_num_batches_matches_batch_indices():
    from cryospin.train.data import batch_indices, num_batches

    for n, b in [(65, 32), (64, 32), (1, 32), (33, 32), (100, 7), (5, 64)]:
        got = len(list(batch_indices(n, b, torch.Generator().manual_seed(0))))
        assert num_batches(n, b) == got, (n, b)


def test_stage1_loss_radius_grows_linearly_to_the_end_radius():
    from cryospin.train.schedule import stage1_loss_radius

    assert stage1_loss_radius(5, 10, None, 7.0) is None
    radii = [stage1_loss_radius(s, 5, 3.0, 7.0) for s in range(5)]
    assert radii == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert stage1_loss_radius(9, 5, 3.0, 7.0) == 7.0


def test_resume_with_marching_search_and_lr_decay_equals_uninterrupted(tiny, tmp_path):
    cfg = _tiny_config(schedule={"epochs": 4, "switch_epoch": 2, "loss_radius_start_px": 2.0,
                                 "search_epochs": 1},
                       model={"encoder_lowpass": True},
                       optim={"search_rotations": 64, "search_radius_px": 3.0,
                              "decoder_lr_final": 0.005, "search_refine_radius_px": 4.0})
    ref = fit(cfg, _particles(tiny), tmp_path / "ref")
    assert ref.finished
    run = tmp_path / "run"
    fit(cfg, _particles(tiny), run, stop_after=1)  # in stage 1
    fit(cfg, _particles(tiny), run, resume=True, stop_after=3)  # after the search epoch
    done = fit(cfg, _particles(tiny), run, resume=True)
    assert done.finished
    _assert_same_run(tmp_path / "ref", run)


# ----------------------------------------------------------------------------- global search


def test_super_fibonacci_rotations_are_rotations_and_cover_so3():
    from cryospin.rotations import geodesic_distance_deg
    from cryospin.train.autodecode import super_fibonacci_rotations

    grid = super_fibonacci_rotations(1024, dtype=torch.float64)  # (1024, 3, 3)
    eye = torch.eye(3, dtype=torch.float64).expand_as(grid)
    torch.testing.assert_close(grid @ grid.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    assert bool((torch.linalg.det(grid) > 0).all())
    # every random rotation has a grid point within the covering radius (~ 2x the spacing)
    probes = random_rotations(200, generator=torch.Generator().manual_seed(0))
    nearest = geodesic_distance_deg(probes[:, None], grid[None]).min(dim=1).values  # (200,)
    assert float(nearest.max()) < 25.0


def test_search_rotations_finds_the_true_grid_rotation(tiny):
    """Images rendered at grid rotations (with CTF and shifts) are matched exactly."""
    from cryospin.train.autodecode import RotationSearch, search_rotations
    from cryospin.train.config import DataConfig
    from cryospin.train.data import prepare_data

    particles = _particles(tiny)
    data = prepare_data(particles, DataConfig())
    search = RotationSearch.build(data, 256, 5.0)
    volume_ht = hartley3(tiny.volume).float()
    pick = torch.tensor([3, 100, 17, 250])
    idx = torch.arange(4)
    batch = data.batch(idx)
    shifts = torch.tensor([[0.5, -1.0], [0.0, 0.0], [1.5, 0.25], [-0.75, 0.5]])
    clean = render(volume_ht, search.rotations[pick], shifts, batch.ctf,
                   frequencies=data.frequencies, negation_index=data.negation_index)  # (4, P)
    batch = dataclasses.replace(batch, hartley=clean)
    rot, nll, no_shift = search_rotations(volume_ht, search, batch, data, shifts, chunk=100)
    torch.testing.assert_close(rot, search.rotations[pick])
    assert float(nll.abs().max()) < 1e-3 and no_shift is None


def test_joint_search_finds_grid_rotation_and_grid_shift(tiny):
    """With a shift grid, unknown grid shifts and grid rotations are both recovered exactly,
    whatever the images' current shifts."""
    from cryospin.train.autodecode import RotationSearch, search_rotations, shift_grid
    from cryospin.train.config import DataConfig
    from cryospin.train.data import prepare_data

    data = prepare_data(_particles(tiny), DataConfig())
    grid_t = shift_grid(3.0, 1.5)  # (25, 2): -3 .. 3 px in steps of 1.5
    assert grid_t.shape == (25, 2) and bool((grid_t == 0).all(dim=1).any())
    search = RotationSearch.build(data, 256, 5.0, shifts_px=grid_t)
    volume_ht = hartley3(tiny.volume).float()
    pick_r, pick_t = torch.tensor([3, 100, 17, 250]), torch.tensor([0, 7, 12, 24])
    batch = data.batch(torch.arange(4))
    clean = render(volume_ht, search.rotations[pick_r], grid_t[pick_t], batch.ctf,
                   frequencies=data.frequencies, negation_index=data.negation_index)
    batch = dataclasses.replace(batch, hartley=clean)
    wrong_current = torch.full((4, 2), 0.7)
    rot, nll, shift = search_rotations(volume_ht, search, batch, data, wrong_current, chunk=64)
    torch.testing.assert_close(rot, search.rotations[pick_r])
    torch.testing.assert_close(shift, grid_t[pick_t])
    assert float(nll.abs().max()) < 1e-3


def test_switch_epoch_zero_with_global_search(tiny, tmp_path):
    """switch_epoch 0: stage 2 from the untrained encoder's poses, with a search epoch first."""
    cfg = _tiny_config(schedule={"epochs": 2, "switch_epoch": 0, "search_epochs": 1},
                       optim={"search_rotations": 64, "search_radius_px": 3.0})
    result = fit(cfg, _particles(tiny), tmp_path / "run")
    assert result.finished and result.stage == "autodecode"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["autodecode", "autodecode"]
    assert "switch" in rows[0]["extra"]
    # the search epoch moves poses by grid jumps, far more than the local steps of epoch 2
    assert rows[0]["mean_pose_change_deg"] > rows[1]["mean_pose_change_deg"]


def test_stage2_decoder_lr_is_constant_through_search_then_decays_to_final():
    from cryospin.train.schedule import stage2_decoder_lr

    cfg = _tiny_config(schedule={"epochs": 10, "switch_epoch": 2, "search_epochs": 4},
                       optim={"decoder_lr_after_switch": 0.02, "decoder_lr_final": 0.002})
    lrs = [stage2_decoder_lr(cfg, e) for e in range(3, 11)]
    assert lrs[:4] == [0.02] * 4  # epochs 3..6 search at the full rate
    assert lrs[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    constant = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim,
                                                                  decoder_lr_final=None))
    assert {stage2_decoder_lr(constant, e) for e in range(3, 11)} == {
        constant.optim.decoder_lr_after_switch}


def test_stage2_pose_lrs_decay_like_the_volume_with_shift_lr_by_the_same_factor():
    from cryospin.train.schedule import stage2_pose_lrs

    cfg = _tiny_config(schedule={"epochs": 10, "switch_epoch": 2, "search_epochs": 4},
                       optim={"pose_lr": 0.05, "shift_lr": 0.1, "pose_lr_final": 0.005})
    lrs = [stage2_pose_lrs(cfg, e) for e in range(3, 11)]
    assert lrs[:4] == [(0.05, 0.1)] * 4  # the search epochs at the full rate
    assert lrs[-1][0] == pytest.approx(0.005) and lrs[-1][1] == pytest.approx(0.01)
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(lrs[3:], lrs[4:], strict=False))
    constant = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, pose_lr_final=None))
    assert {stage2_pose_lrs(constant, e) for e in range(3, 11)} == {(0.05, 0.1)}


def test_pose_table_learning_rates_follow_the_schedule_and_are_logged(tiny, tmp_path):
    cfg = _tiny_config(schedule={"epochs": 3, "switch_epoch": 0, "search_epochs": 1},
                       optim={"search_rotations": 64, "search_radius_px": 3.0,
                              "pose_lr": 0.04, "pose_lr_final": 0.01})
    fit(cfg, _particles(tiny), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["pose_lr"] for r in rows] == pytest.approx([0.04, 0.02, 0.01])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["pose_table"]["_extra_state"]["lr_rot"] == pytest.approx(0.01)


# ----------------------------------------------------------------------------- search early stop


def _early_stop_config(**schedule):
    """Stage 1 in epoch 1, up to 3 search epochs (2-4), then 1 local epoch; the search stops
    after its second epoch (3) unless every particle jumped then (fraction 1.0). Not after its
    first: from the 1-epoch encoder's poses every particle jumps in epoch 2."""
    return _tiny_config(
        schedule={"epochs": 5, "switch_epoch": 1, "search_epochs": 3, "search_min_epochs": 2,
                  "search_stop_fraction": 1.0, **schedule},
        optim={"search_rotations": 64, "search_radius_px": 3.0, "decoder_lr_final": 0.005,
               "pose_lr": 0.04, "pose_lr_final": 0.01},
    )


@pytest.fixture(scope="module")
def early_stopped(tiny, tmp_path_factory):
    """The reference run with the early stop: epochs 1-4 instead of 1-5, never interrupted."""
    return fit(_early_stop_config(), _particles(tiny), tmp_path_factory.mktemp("es") / "run")


def test_search_stops_early_and_the_run_ends_sooner(early_stopped):
    from cryospin.train.autodecode import JUMP_THRESHOLD_DEG

    assert early_stopped.finished and early_stopped.epochs_completed == 4
    run = early_stopped.run_dir
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[0].get("jump_fraction") is None  # stage 1
    assert all(0.0 <= r["jump_fraction"] <= 1.0 for r in rows[1:])
    assert rows[2]["jump_fraction"] < 1.0
    assert rows[2]["extra"]["search_stop"] == {
        "after_epoch": 3, "jump_fraction": rows[2]["jump_fraction"],
        "threshold_deg": JUMP_THRESHOLD_DEG, "stop_fraction": 1.0, "local_epochs": 1,
        "rule": "few", "previous_jump_fraction": rows[1]["jump_fraction"],
        "loss_drop_nats": rows[1]["loss"] - rows[2]["loss"]}
    assert ["search_stop" in r["extra"] for r in rows] == [False, False, True, False]
    # the decay starts after epoch 3 and reaches its end at epoch 4, the last
    assert [r["decoder_lr"] for r in rows[1:]] == pytest.approx([0.02, 0.02, 0.005])
    assert [r["pose_lr"] for r in rows[1:]] == pytest.approx([0.04, 0.04, 0.01])
    assert load_checkpoint(run / "checkpoint.pt")["extra"]["search_stopped_after"] == 3
    assert (run / "map.mrc").is_file() and not (run / "map.005.mrc").exists()


def test_early_stop_with_stop_after_and_resume_equals_uninterrupted(
    early_stopped, tiny, tmp_path, monkeypatch, caplog
):
    """Stopped in stage 1, resumed through the stopping epoch (whose checkpoint carries the
    stop), resumed again to the end: the same run. The progress display (its epoch count, the
    ETA's plan) follows the shorter run."""
    run = tmp_path / "run"
    cfg = _early_stop_config()
    fit(cfg, _particles(tiny), run, stop_after=1)
    passes = []  # (epoch, shown last epoch, the ETA plan's last epoch, phase, images)
    ahead = []  # (backprojected images still ahead in the plan, the re-made volume measured)
    real_progress = fit_module._epoch_progress

    def spy(feedback, clock, epoch, images, early):
        passes.append((epoch, clock.end, clock.plan.last_epoch, clock.plan.phase(epoch),
                       images))
        ahead.append((clock.plan.remaining_images(epoch, 0, images).get(BACKPROJECT),
                      BACKPROJECT in clock.totals))
        return real_progress(feedback, clock, epoch, images, early)

    monkeypatch.setattr(fit_module, "_epoch_progress", spy)
    caplog.set_level("INFO", logger="cryospin.train.fit")
    done = fit(cfg, _particles(tiny), run, resume=True)  # epochs 2-4, the search stops at 3
    assert done.finished and done.epochs_completed == 4
    assert passes == [(2, 5, 5, "search", 64), (3, 5, 5, "search", 64),
                      (4, 4, 4, "local", 64)]  # planned epochs 2-5, then 2-4
    # the ETA's backprojections (C1, 64 particles): the volumes re-made at the start of the
    # planned search epochs 3 and 4 (64 each), after the search (64) and the final map with the
    # scores (64 * 1.25) ahead in epoch 2; in epoch 3 (its own made) epoch 4's, the one after
    # the search and the final map, their rate measured; in epoch 4 (the search stopped after
    # 3, so epoch 4 began with the one after the search) the final map
    assert cfg.optim.rebackproject_after_search and cfg.optim.rebackproject_during_search
    assert ahead == [(2 * 64 + 64 + 80, False), (64 + 64 + 80, True), (80, True)]
    assert any(r.getMessage().startswith("global search done after epoch 3: ")
               and "1 local epochs follow" in r.getMessage() for r in caplog.records)
    _assert_same_run(early_stopped.run_dir, run)

    run2 = tmp_path / "run2"
    fit(cfg, _particles(tiny), run2, stop_after=3)  # the stop decided, the local epoch not run
    assert load_checkpoint(run2 / "checkpoint.pt")["extra"]["search_stopped_after"] == 3
    done = fit(cfg, _particles(tiny), run2, resume=True)
    assert done.finished and done.epochs_completed == 4
    assert passes[-1] == (4, 4, 4, "local", 64)
    _assert_same_run(early_stopped.run_dir, run2)


def test_the_plateau_and_settled_rules_compare_with_the_previous_search_epoch_after_a_resume(
    early_stopped, tiny, tmp_path, monkeypatch
):
    """The early stop is asked after every search epoch with the search epoch before's jump
    fraction and the fall of the mean loss since it (none before the first), which a
    checkpoint between them carries."""
    run = tmp_path / "run"
    cfg = _early_stop_config(search_plateau_fraction=0.5, search_settled_nats=1e-9)
    fit(cfg, _particles(tiny), run, stop_after=2)  # the first search epoch done
    first = read_metrics(run / "metrics.jsonl")[1]
    extra = load_checkpoint(run / "checkpoint.pt")["extra"]
    assert (extra["last_jump_fraction"], extra["last_search_loss"]) == (
        first["jump_fraction"], first["loss"])
    calls = []
    real = fit_module.search_stops

    def spy(schedule, epoch, jump_fraction, previous_fraction=None, loss_drop_nats=None):
        calls.append((epoch, jump_fraction, previous_fraction, loss_drop_nats))
        return real(schedule, epoch, jump_fraction, previous_fraction, loss_drop_nats)

    monkeypatch.setattr(fit_module, "search_stops", spy)
    done = fit(cfg, _particles(tiny), run, resume=True)
    rows = read_metrics(run / "metrics.jsonl")
    drop = first["loss"] - rows[2]["loss"]
    assert done.finished and calls == [(3, rows[2]["jump_fraction"], first["jump_fraction"],
                                        drop)]
    stop = rows[2]["extra"]["search_stop"]
    assert stop["previous_jump_fraction"] == first["jump_fraction"]
    assert stop["loss_drop_nats"] == drop
    calls.clear()
    fit(cfg, _particles(tiny), tmp_path / "new")  # uninterrupted: the same questions
    assert calls == [(2, first["jump_fraction"], None, None),
                     (3, rows[2]["jump_fraction"], first["jump_fraction"], drop)]
    # a stage-1 checkpoint has no search epoch to remember
    fit(cfg, _particles(tiny), tmp_path / "s1", stop_after=1)
    extra = load_checkpoint(tmp_path / "s1" / "checkpoint.pt")["extra"]
    assert "last_jump_fraction" not in extra and "last_search_loss" not in extra


def test_the_settled_rule_stops_a_search_whose_loss_no_longer_falls(tiny, tmp_path):
    """With every particle jumping (no 2 % or plateau stop possible) the settled rule ends the
    search after its second epoch when its loss fell by less than the threshold, and says so
    in metrics.jsonl and the log."""
    never = {"search_stop_fraction": 0.0, "search_plateau_fraction": 0.0}
    plain = fit(_early_stop_config(**never, search_settled_nats=0.0), _particles(tiny),
                tmp_path / "plain")
    rows = read_metrics(plain.run_dir / "metrics.jsonl")
    assert plain.epochs_completed == 5  # no rule on: all 3 search epochs and the local one
    drop = rows[1]["loss"] - rows[2]["loss"]
    settled = fit(_early_stop_config(**never, search_settled_nats=drop + 1.0), _particles(tiny),
                  tmp_path / "settled")
    got = read_metrics(settled.run_dir / "metrics.jsonl")
    assert settled.epochs_completed == 4 and [r["loss"] for r in got[:3]] == [
        r["loss"] for r in rows[:3]]  # the same run up to the stop
    stop = got[2]["extra"]["search_stop"]
    assert (stop["after_epoch"], stop["rule"], stop["loss_drop_nats"],
            stop["settled_nats"]) == (3, "settled", drop, drop + 1.0)
    message = (f"the fit no longer improves: the mean loss fell by {drop:.2g} < "
               f"{drop + 1.0:g} nats per image")
    assert message in (settled.run_dir / "run.log").read_text()
    data = load_run(settled.run_dir)  # the report's epochs row says why the search stopped
    rows_html = dict(run_summary_rows(run_summary(data, num_poses=64, box_px=16,
                                                  pixel_size_angstrom=4.0), data))
    assert rows_html["epochs"] == (
        f"4 (of up to 5: the global search stopped early after epoch 3: "
        f"{100 * got[2]['jump_fraction']:.1f} % of the particles jumped > 20° ({message}))")
    kept = fit(_early_stop_config(**never, search_settled_nats=max(drop - 1.0, 0.0)),
               _particles(tiny), tmp_path / "kept")
    assert kept.epochs_completed == 5  # a loss that fell by more: the search goes on


def test_resume_with_more_epochs_after_an_early_stop_adds_local_epochs(early_stopped, tiny,
                                                                      tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(early_stopped.run_dir, run)
    longer = _early_stop_config(epochs=6)  # 2 local epochs after the stop at epoch 3
    done = fit(longer, _particles(tiny), run, resume=True)
    assert done.finished and done.epochs_completed == 5
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[4]["pose_lr"] == pytest.approx(0.01)  # the decay now ends at epoch 5
    # a checkpoint beyond the shortened run's last epoch is refused, naming the stop
    with pytest.raises(CryospinError, match="the global search stopped after epoch 3"):
        fit(_early_stop_config(epochs=4), _particles(tiny), run, resume=True)


def test_cli_reconstruct_star_writes_every_input_column_back(tiny, tmp_path):
    """A RELION 3.1 star with the columns RELION needs to re-extract, polish or join (micrograph,
    coordinates, groups, classes, CTF scale) and a --ind subset: poses.star holds the selected
    rows with every input column in its order and text, the optics table as it was, the image
    paths as the input wrote them (relative to the RELION project, not the run folder); only
    the poses are new."""
    ps = _particles(tiny)
    n = len(ps)
    stack_rel = "Extract/job007/particles.mrcs"
    (tmp_path / stack_rel).parent.mkdir(parents=True)
    write_stack(tmp_path / stack_rel, ps.images().numpy(), 4.0)
    rng = np.random.default_rng(0)
    cols = ["rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName",
            "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor",
            "rlnCtfScalefactor", "rlnPhaseShift", "rlnGroupNumber", "rlnClassNumber",
            "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    lines = ["# version 30001", "", "data_optics", "", "loop_",
             "_rlnOpticsGroupName #1", "_rlnOpticsGroup #2", "_rlnVoltage #3",
             "_rlnSphericalAberration #4", "_rlnAmplitudeContrast #5", "_rlnImagePixelSize #6",
             "_rlnImageSize #7", "_rlnImageDimensionality #8",
             "_rlnMicrographOriginalPixelSize #9",
             "opticsGroup1 1 300.000000 2.700000 0.100000 4.000000 16 2 1.000000", "", "",
             "# version 30001", "", "data_particles", "", "loop_"]
    lines += [f"_{c} #{k}" for k, c in enumerate(cols, start=1)]
    for i in range(n):
        lines.append(" ".join([
            f"{rng.uniform(0, 4000):.6f}", f"{rng.uniform(0, 4000):.6f}",
            f"{i + 1:06d}@{stack_rel}", f"MotionCorr/job002/mic_{i % 4:03d}.mrc", "1",
            f"{float(ps.ctf.defocus_u_angstrom[i]):.6f}",
            f"{float(ps.ctf.defocus_v_angstrom[i]):.6f}",
            f"{float(ps.ctf.defocus_angle_deg[i]):.6f}", "0.000000", "1.000000", "0.000000",
            str(1 + i % 4), str(1 + i % 3), "0.000000", "0.000000", "0.000000", "0.000000",
            "0.000000"]))
    star = tmp_path / "Select" / "job009" / "particles.star"
    star.parent.mkdir(parents=True)
    star.write_text("\n".join(lines) + "\n")
    ind = np.random.default_rng(1).permutation(n)[:48]
    np.save(tmp_path / "ind.npy", ind)
    run = tmp_path / "run"
    common = ["--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "32",
              "--device", "cpu", "--threads", "1", "--no-progress", "--seed", "5"]
    status = cli_main(["reconstruct", str(star), "--datadir", str(tmp_path), "--ind",
                       str(tmp_path / "ind.npy"), "-o", str(run), "--epochs", "1",
                       "--switch-epoch", "1", *common])
    assert status == 0

    inp_p, inp_o = read_star_tables(star, as_text=True)
    out_p, out_o = read_star_tables(run / "poses.star", as_text=True)
    assert list(out_p.columns) == [*cols, "rlnLogLikeliContribution"]  # + the run's scores
    poses = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"}
    for col in cols:
        if col not in poses:
            assert out_p[col].tolist() == inp_p[col].iloc[ind].tolist(), col
    assert out_p["rlnImageName"].iloc[0] == f"{ind[0] + 1:06d}@{stack_rel}"
    assert out_o.to_dict("list") == inp_o.to_dict("list")
    # the pose columns hold the run's final poses (those of poses.pkl)
    back = load_particles(run / "poses.star", datadir=tmp_path, metadata_only=True)
    rot_pkl, shift_pkl = read_cryodrgn_poses(run / "poses.pkl", 16)
    torch.testing.assert_close(back.rotations, rot_pkl, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.shifts_px, shift_pkl, atol=1e-6, rtol=0)
    assert not (run / "poses.cs").exists()  # only for .cs inputs
    # selected.pkl indexes the input star (through --ind): --ind of it picks those particles
    scores = out_p["rlnLogLikeliContribution"].astype(float).to_numpy()
    np.testing.assert_array_equal(load_indices(run / "selected.pkl"), ind[scores > 0])


def test_cli_reconstruct_cs_writes_poses_cs_and_relative_to(tiny, tmp_path):
    """A cryoSPARC .cs input: poses.cs is its rows with the run's poses (for cryoSPARC's
    import); --relative-to rebases poses.star's image paths onto the given folder."""
    ps = _particles(tiny)
    n = len(ps)
    stack = tmp_path / "J5" / "extract" / "particles.mrcs"
    stack.parent.mkdir(parents=True)
    write_stack(stack, ps.images().numpy(), 4.0)
    fields = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"),
              ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
              ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    table = np.zeros(n, dtype=fields)
    table["uid"] = np.arange(n) + 10**12
    table["blob/path"] = "J5/extract/particles.mrcs"
    table["blob/idx"] = np.arange(n)
    table["blob/shape"] = 16
    table["blob/psize_A"] = 4.0
    table["ctf/accel_kv"], table["ctf/cs_mm"], table["ctf/amp_contrast"] = 300, 2.7, 0.1
    table["ctf/df1_A"] = ps.ctf.defocus_u_angstrom.numpy()
    table["ctf/df2_A"] = ps.ctf.defocus_v_angstrom.numpy()
    cs = tmp_path / "P1_J6_particles.cs"
    with open(cs, "wb") as fh:
        np.save(fh, table)
    run = tmp_path / "run"
    common = ["--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "32",
              "--device", "cpu", "--threads", "1", "--no-progress", "--seed", "5"]
    status = cli_main(["reconstruct", str(cs), "-o", str(run), "--relative-to", str(run),
                       "--epochs", "1", "--switch-epoch", "1", *common])
    assert status == 0
    assert load_config(run / "config.yaml").input.relative_to == str(run.resolve())
    names = read_star_tables(run / "poses.star", as_text=True)[0]["rlnImageName"].tolist()
    assert names[:2] == ["000001@../J5/extract/particles.mrcs",
                         "000002@../J5/extract/particles.mrcs"]
    rot_pkl, shift_pkl = read_cryodrgn_poses(run / "poses.pkl", 16)
    back = read_cryosparc(run / "poses.cs", metadata_only=True)  # paths: cryoSPARC project
    torch.testing.assert_close(back.rotations, rot_pkl, atol=2e-6, rtol=0)
    torch.testing.assert_close(back.shifts_px, shift_pkl, atol=1e-6, rtol=0)
    out = np.load(run / "poses.cs")
    np.testing.assert_array_equal(out["uid"], table["uid"])
    # the particles' scores, as in poses.star (float32, as cryoSPARC stores its numbers)
    scores = read_star_tables(run / "poses.star")[0]["rlnLogLikeliContribution"].to_numpy()
    assert out.dtype["cryospin/score"] == np.dtype("<f4")
    np.testing.assert_allclose(out["cryospin/score"], scores, rtol=1e-6, atol=1e-3)


def test_the_encoder_lr_decays_to_its_final_value_at_the_switch_and_resumes(tiny, tmp_path):
    """``optim.encoder_lr_final``: the encoder's lr as set for each stage-1 step (the
    checkpoint's optimiser keeps the last), the same after a stop inside stage 1 and a
    resume."""
    from cryospin.train.schedule import stage1_encoder_lr

    cfg = _tiny_config(schedule={"switch_steps": 5, "epochs": 3, "switch_epoch": 1,
                                 "switch_poses": "last_epoch"},
                       optim={"encoder_lr": 1e-3, "encoder_lr_final": 1e-4,
                              "encoder_lr_decay_start": 0.2})
    ref = tmp_path / "ref"
    fit(cfg, _particles(tiny), ref)
    rows = read_metrics(ref / "metrics.jsonl")  # the lr of each epoch's last step
    assert [r["encoder_lr"] for r in rows[:3]] == pytest.approx(
        [stage1_encoder_lr(s, 5, 1e-3, 1e-4, 0.2) for s in (1, 3, 4)], rel=1e-12)
    assert [r["encoder_lr"] for r in rows[3:]] == [None, None]  # stage 2: no encoder
    run = tmp_path / "run"
    for epoch, last_step in ((2, 3), (3, 4)):  # 2 batches an epoch, the third cut after one
        fit(cfg, _particles(tiny), run, stop_after=epoch, resume=epoch > 2)
        state = load_checkpoint(run / "checkpoint.pt")
        lr = state["optimizers"]["encoder"]["param_groups"][0]["lr"]
        assert lr == pytest.approx(stage1_encoder_lr(last_step, 5, 1e-3, 1e-4, 0.2), rel=1e-12)
    assert lr == pytest.approx(1e-4, rel=1e-12)  # the last stage-1 step: the final lr
    fit(cfg, _particles(tiny), run, resume=True)
    _assert_same_run(ref, run)


def test_step_budget_switches_after_exactly_n_steps_and_resumes_mid_stage(tiny, tmp_path,
                                                                          monkeypatch):
    """``schedule.switch_steps = 5`` with 2 batches per epoch (64 particles, batch 32): stage 1
    runs 2 + 2 + 1 batches (the third epoch cut after one), the ``epochs - switch_epoch = 2``
    stage-2 epochs follow, and the switch starts the particles the cut epoch did not visit from
    an inference pass. Stopped inside stage 1 and resumed, the run equals the uninterrupted
    one."""
    cfg = _tiny_config(schedule={"switch_steps": 5, "epochs": 3, "switch_epoch": 1,
                                 "switch_poses": "last_epoch"})
    filled = []
    real = switch_module.infer_best_poses

    def counted(*args, **kwargs):
        filled.append(int(kwargs["indices"].numel()))
        return real(*args, **kwargs)

    monkeypatch.setattr(switch_module, "infer_best_poses", counted)
    ref = fit(cfg, _particles(tiny), tmp_path / "ref")
    assert ref.finished and ref.epochs_completed == 5
    rows = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["autoencode"] * 3 + ["autodecode"] * 2
    assert [r["num_images"] for r in rows[:3]] == [64, 64, 32]
    assert filled == [32]  # the 32 particles the cut epoch did not visit
    assert all(len(r["head_spread_deg"]) == 3 for r in rows[:3])
    assert rows[3]["head_spread_deg"] is None

    run = tmp_path / "run"
    fit(cfg, _particles(tiny), run, stop_after=2)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["stage"] == "autoencode" and state["config"]["schedule"]["switch_steps"] == 5
    steps = {int(s["step"]) for s in state["optimizers"]["encoder"]["state"].values()}
    assert steps == {4}  # Adam steps of the encoder after two full epochs
    fit(cfg, _particles(tiny), run, resume=True)
    _assert_same_run(tmp_path / "ref", run)
