"""The global search's early stop: the pure epoch plan (cryospin.train.schedule), the
learning-rate decay it moves, its configuration and flags, and the jump fraction it reads."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.train.config import ScheduleConfig, build_config
from cryospin.train.schedule import (
    decay_fraction,
    final_epoch,
    impose_epoch,
    is_search_epoch,
    last_search_epoch,
    search_stops,
    stage1_batches,
    stage2_decoder_lr,
    stage2_pose_lrs,
    with_step_budget,
)

# the default preset's shape: 1 stage-1 epoch, up to 8 search epochs, 3 local epochs
SCHEDULE = ScheduleConfig(epochs=12, switch_epoch=1, search_epochs=8, search_min_epochs=4,
                          search_stop_fraction=0.02)


def _config(schedule: ScheduleConfig = SCHEDULE):
    config = build_config("default", {"optim": {"decoder_lr_after_switch": 0.02,
                                                "decoder_lr_final": 0.002, "pose_lr": 0.05,
                                                "shift_lr": 0.1, "pose_lr_final": 0.005}})
    return dataclasses.replace(config, schedule=schedule)


def _old_stage2_decay(s: ScheduleConfig, epoch: int, start: float, final: float | None) -> float:
    """The decay before the early stop existed (cryospin 0.1), verbatim."""
    if final is None:
        return start
    first = s.switch_epoch + s.search_epochs
    span = s.epochs - first
    if span <= 0 or epoch <= first:
        return start
    frac = min((epoch - first) / span, 1.0)
    return start * (final / start) ** frac


# ----------------------------------------------------------------------------- the plan


def test_an_early_stop_skips_the_remaining_search_epochs_and_keeps_the_local_ones():
    assert (last_search_epoch(SCHEDULE, None), final_epoch(SCHEDULE, None)) == (9, 12)
    assert (last_search_epoch(SCHEDULE, 6), final_epoch(SCHEDULE, 6)) == (6, 9)
    assert [e for e in range(1, 13) if is_search_epoch(SCHEDULE, e, None)] == list(range(2, 10))
    assert [e for e in range(1, 13) if is_search_epoch(SCHEDULE, e, 6)] == [2, 3, 4, 5, 6]
    # epochs short of the search: no local epochs, the run ends with the stop
    short = dataclasses.replace(SCHEDULE, epochs=7)
    assert final_epoch(short, None) == 7 and final_epoch(short, 5) == 5


def test_the_symmetry_step_follows_the_search_or_its_minimum_epochs():
    after = dataclasses.replace(SCHEDULE, impose_symmetry="after_search")
    during = dataclasses.replace(SCHEDULE, impose_symmetry="during_search")
    # after the 8 search epochs (2..9), or after an early stop at 6
    assert (impose_epoch(after, None), impose_epoch(after, 6)) == (10, 7)
    # after the minimum 4 (2..5): the search epochs 6..9 run on the symmetric map
    assert (impose_epoch(during, None), impose_epoch(during, 5)) == (6, 6)
    # no minimum: the whole search; no search at all: right after the switch
    assert impose_epoch(dataclasses.replace(during, search_min_epochs=None), None) == 10
    assert impose_epoch(dataclasses.replace(during, search_epochs=0,
                                            search_min_epochs=None), None) == 2


def test_the_search_never_stops_before_its_minimum_nor_at_its_last_epoch():
    # search epoch s is epoch 1 + s; min 4: the first possible stop is after epoch 5
    assert [e for e in range(2, 10) if search_stops(SCHEDULE, e, 0.0)] == [5, 6, 7, 8]
    assert search_stops(SCHEDULE, 5, 0.0199) == "few"
    assert search_stops(SCHEDULE, 5, 0.02) is None  # strict
    assert not search_stops(SCHEDULE, 5, None) and not search_stops(SCHEDULE, 5, math.nan)
    off = dataclasses.replace(SCHEDULE, search_min_epochs=None)
    assert not any(search_stops(off, e, 0.0) for e in range(1, 13))
    never = dataclasses.replace(SCHEDULE, search_stop_fraction=0.0)
    assert not any(search_stops(never, e, 0.0) for e in range(1, 13))


def test_the_plateau_rule_stops_a_search_whose_jumps_no_longer_fall():
    plateau = dataclasses.replace(SCHEDULE, search_plateau_fraction=0.05)
    # the 60,000-particle spike's search epochs 3-8 (2.9 .. 2.7 %), above the 2 % rule
    assert not search_stops(SCHEDULE, 5, 0.0281, 0.0295)  # the rule off (0): as before
    assert search_stops(plateau, 5, 0.0281, 0.0295) == "plateau"
    assert search_stops(plateau, 5, 0.04, 0.03) == "plateau"  # rising counts as not falling
    # falling by a quarter or more, or at or above the plateau fraction: the search goes on
    assert not search_stops(plateau, 5, 3 / 128, 1 / 32)  # exactly 25 % less (dyadic)
    assert search_stops(plateau, 5, 3 / 128 + 1e-9, 1 / 32)
    assert not search_stops(plateau, 5, 0.05, 0.05) and search_stops(plateau, 5, 0.0499, 0.05)
    # the same minimum and last epoch as the 2 % rule; no previous fraction, no plateau
    assert [e for e in range(2, 10) if search_stops(plateau, e, 0.03, 0.03)] == [5, 6, 7, 8]
    assert not search_stops(plateau, 5, 0.03, None)
    assert not search_stops(plateau, 5, 0.03, math.nan)
    assert not search_stops(plateau, 5, None, 0.03)
    assert not search_stops(dataclasses.replace(plateau, search_min_epochs=None), 5, 0.03, 0.03)
    # the 2 % rule needs no previous fraction, and is the one named when both hold
    assert search_stops(plateau, 5, 0.01, None) == "few"
    assert search_stops(plateau, 5, 0.019, 0.019) == "few"


def test_the_settled_rule_stops_a_search_whose_fit_no_longer_improves():
    settled = dataclasses.replace(SCHEDULE, search_settled_nats=1.0)
    # the D7 ring in C1 at 64 px: 45 % jumping between exact copies, the loss 0.47 nats lower
    assert not search_stops(SCHEDULE, 5, 0.452, 0.542, 0.47)  # the rule off (0): as before
    assert search_stops(settled, 5, 0.452, 0.542, 0.47) == "settled"
    assert not search_stops(settled, 5, 0.452, 0.542, 1.0)  # strict
    assert search_stops(settled, 5, 0.452, 0.542, 0.999) == "settled"
    assert search_stops(settled, 5, 0.452, 0.542, -2.0) == "settled"  # a loss that rose
    # no loss to compare with (the first search epoch, or a NaN loss): never
    for drop in (None, math.nan, math.inf, -math.inf):
        assert not search_stops(settled, 5, 0.452, 0.542, drop)
    # the same minimum and last epoch as the other rules; the jump fraction still needed
    assert [e for e in range(2, 10) if search_stops(settled, e, 0.4, 0.4, 0.0)] == [5, 6, 7, 8]
    assert not search_stops(settled, 5, None, 0.4, 0.0)
    assert not search_stops(dataclasses.replace(settled, search_min_epochs=None), 5, 0.4, 0.4,
                            0.0)
    # the 2 % and plateau rules are named first when they hold too
    rules = dataclasses.replace(settled, search_plateau_fraction=0.05)
    assert search_stops(rules, 5, 0.01, 0.4, 0.0) == "few"
    assert search_stops(rules, 5, 0.03, 0.03, 0.0) == "plateau"
    assert search_stops(rules, 5, 0.03, None, 0.0) == "settled"


def _first_stop(schedule: ScheduleConfig, jumps: list[float],
                losses: list[float] | None = None) -> int | None:
    """The epoch after which the search stops, given each search epoch's jump fraction (and
    mean loss, nats per image)."""
    return _first_stop_rule(schedule, jumps, losses)[0]


def _first_stop_rule(schedule: ScheduleConfig, jumps: list[float],
                     losses: list[float] | None = None) -> tuple[int | None, str | None]:
    """:func:`_first_stop` and the rule that fired (None, None: the search ran out)."""
    previous = previous_loss = None
    for s, fraction in enumerate(jumps, start=1):
        epoch = schedule.switch_epoch + s
        loss = None if losses is None else losses[s - 1]
        drop = None if loss is None or previous_loss is None else previous_loss - loss
        rule = search_stops(schedule, epoch, fraction, previous, drop)
        if rule:
            return epoch, rule
        previous, previous_loss = fraction, loss
    return None, None


# jump fractions per search epoch of measured runs (metrics.jsonl; benchmarks/RESULTS.md, "The
# search's plateau rule"): the `default` preset on the demo's spike (1,000 particles, 32 px,
# seeds 0-2) and on the 48 px spike (5,000, seeds 0-1); search only on 6VYB at 60,000
MEASURED_DEFAULT = {
    "demo seed 0": [0.955, 0.367, 0.248, 0.12, 0.093, 0.081, 0.1, 0.076],
    "demo seed 1": [0.974, 0.439, 0.207, 0.15, 0.101, 0.09, 0.028, 0.018],
    "demo seed 2": [0.944, 0.287, 0.14, 0.083, 0.065, 0.114, 0.109, 0.053],
    "48 px seed 0": [0.9824, 0.6668, 0.5122, 0.2054, 0.0304, 0.0136],
    "48 px seed 1": [0.9846, 0.4264, 0.1678, 0.1752, 0.3154, 0.0672, 0.0194],
}
SPIKE_60000_SEARCH_ONLY = [0.9975, 0.1787, 0.0295, 0.0281, 0.027, 0.0279, 0.0268, 0.0275]


def _with_encoder_epoch() -> ScheduleConfig:
    """The ``default`` preset's schedule with the one stage-1 epoch it had until 2026-12-07,
    with which the sequences below were measured (their search epochs start at epoch 2)."""
    return dataclasses.replace(build_config("default").schedule, switch_epoch=1)


def test_the_plateau_rule_on_measured_runs_stops_only_the_flipping_search():
    default = _with_encoder_epoch()
    before = dataclasses.replace(default, search_plateau_fraction=0.0)  # the 2 % rule alone
    for name, jumps in MEASURED_DEFAULT.items():
        assert _first_stop(default, jumps) == _first_stop(before, jumps), name
    # up to 12 search epochs since 2026-12-07 (8 before): demo seed 1's 1.8 % now stops it
    assert [_first_stop(default, j) for j in MEASURED_DEFAULT.values()] == [
        None, 9, None, 7, 8]
    search_only = dataclasses.replace(default, switch_epoch=0)
    assert _first_stop(dataclasses.replace(search_only, search_plateau_fraction=0.0),
                       SPIKE_60000_SEARCH_ONLY) is None  # all 8 search epochs ran
    assert _first_stop(search_only, SPIKE_60000_SEARCH_ONLY) == 4  # 2.81 % after 2.95 %


# each search epoch's jump fraction and mean loss (nats per image) of measured `default` runs
# (metrics.jsonl; benchmarks/RESULTS.md "A search that stops when the fit stops improving"),
# their search's last epoch under the preset of 2026-12-07 (up to 12 search epochs, plateau
# below 4 %, settled below 1 nat) and under the one before (up to 8, plateau below 5 %, no
# settled rule). 64 px and 128 px: 20,000 particles, SNR 0.1; 48 px: the demo's spike (5,000,
# SNR 0.1, seed 0); 32 px: the demo test's size (1,000 spike particles, SNR 1), run with
# --search-epochs 12 --epochs 16 and the new rules.
MEASURED_WITH_LOSSES = {
    "spike 64 px": ([0.9658, 0.5873, 0.2333, 0.0066],
                    [1550.944, 1516.297, 1507.408, 1508.284], (5, "few"), (5, "few")),
    "ADK 64 px": ([0.9478, 0.2243, 0.0001, 0.0001],
                  [1498.866, 1479.075, 1477.942, 1479.812], (5, "few"), (5, "few")),
    "coloured spike 64 px": ([0.9855, 0.3122, 0.0191, 0.0087],
                             [1521.152, 1509.289, 1507.621, 1506.981], (5, "few"), (5, "few")),
    "coloured spike 128 px": ([0.965, 0.4617, 0.4673, 0.229, 0.0095],
                              [6295.921, 6263.323, 6247.883, 6240.787, 6241.655], (6, "few"),
                              (6, "few")),
    "demo 48 px": ([0.9602, 0.627, 0.4882, 0.1624, 0.0076],
                   [871.539, 846.496, 834.269, 829.802, 828.473], (6, "few"), (6, "few")),
    "D7 ring in C1, 64 px": ([0.9506, 0.6381, 0.542, 0.452, 0.4294, 0.4102, 0.3967, 0.3934],
                             [1511.652, 1503.361, 1502.196, 1501.732, 1501.521, 1501.245,
                              1501.172, 1501.04], (5, "settled"), (None, None)),
    "32 px seed 3": ([0.963, 0.428, 0.2086, 0.1349, 0.0571, 0.0772, 0.0894, 0.124, 0.12,
                      0.056, 0.024, 0.015],
                     [596.193, 509.837, 469.727, 445.767, 430.931, 425.782, 421.618, 416.74,
                      411.496, 406.164, 404.252, 402.807], (None, None), (None, None)),
    "32 px seed 11": ([0.959, 0.528, 0.1302, 0.0663, 0.052, 0.048, 0.109, 0.28, 0.208, 0.028,
                       0.004],
                      [579.815, 500.23, 443.894, 427.755, 417.866, 412.545, 403.493, 393.94,
                       381.575, 376.704, 375.47], (12, "few"), (7, "plateau")),
}


def test_the_settled_rule_and_the_longer_search_on_measured_runs():
    default = _with_encoder_epoch()
    before = dataclasses.replace(default, search_epochs=8, epochs=12,
                                 search_plateau_fraction=0.05, search_settled_nats=0.0)
    for name, (jumps, losses, now, then) in MEASURED_WITH_LOSSES.items():
        assert _first_stop_rule(default, jumps, losses) == now, name
        assert _first_stop_rule(before, jumps[:8], losses[:8]) == then, name


def test_without_an_early_stop_the_learning_rates_are_bit_identical_to_the_old_decay():
    o = _config().optim
    for schedule in (SCHEDULE, dataclasses.replace(SCHEDULE, search_min_epochs=None),
                     ScheduleConfig(epochs=10, switch_epoch=2, search_epochs=4),
                     ScheduleConfig(epochs=5, switch_epoch=1, search_epochs=8),
                     ScheduleConfig(epochs=6, switch_epoch=0, search_epochs=0)):
        config = _config(schedule)
        for epoch in range(schedule.switch_epoch + 1, schedule.epochs + 3):
            assert stage2_decoder_lr(config, epoch) == _old_stage2_decay(
                schedule, epoch, o.decoder_lr_after_switch, o.decoder_lr_final)
            assert stage2_decoder_lr(config, epoch, None) == stage2_decoder_lr(config, epoch)
            rot, shift = stage2_pose_lrs(config, epoch)
            old = _old_stage2_decay(schedule, epoch, o.pose_lr, o.pose_lr_final)
            assert rot == old and shift == o.shift_lr * (old / o.pose_lr)


def test_after_an_early_stop_the_decay_starts_after_the_last_search_epoch_and_ends_at_the_last():
    config = _config()
    stopped = [stage2_decoder_lr(config, e, 6) for e in range(2, 10)]  # epochs 2 .. 9
    assert stopped[:5] == [0.02] * 5  # search epochs 2 .. 6 at the full rate
    assert stopped[-1] == pytest.approx(0.002)  # the final rate at the new last epoch, 9
    assert all(a > b for a, b in zip(stopped[4:], stopped[5:], strict=False))
    # the same curve as without the stop, 3 epochs earlier
    assert stopped[5:] == [stage2_decoder_lr(config, e) for e in (10, 11, 12)]
    assert [stage2_pose_lrs(config, e, 6) for e in (7, 8, 9)] == [
        stage2_pose_lrs(config, e) for e in (10, 11, 12)]
    assert decay_fraction(SCHEDULE, 6, 6) == 0.0 and decay_fraction(SCHEDULE, 9, 6) == 1.0


# ----------------------------------------------------------------------------- configuration


def test_early_stop_settings_are_validated_with_clear_messages():
    with pytest.raises(InputError, match=r"search_min_epochs must be between 1 and "
                                         r"schedule.search_epochs \(3\), got 5"):
        build_config("default", {"schedule": {"search_epochs": 3, "search_min_epochs": 5}})
    with pytest.raises(InputError, match="search_min_epochs must be between 1"):
        build_config("default", {"schedule": {"search_min_epochs": 0}})
    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match=r"search_stop_fraction must be in \[0, 1\]"):
            build_config("default", {"schedule": {"search_stop_fraction": bad}})
        with pytest.raises(InputError, match=r"search_plateau_fraction must be in \[0, 1\]"):
            build_config("default", {"schedule": {"search_plateau_fraction": bad}})
    with pytest.raises(InputError, match=r"search_settled_nats must be >= 0, got -0.5"):
        build_config("default", {"schedule": {"search_settled_nats": -0.5}})
    with pytest.raises(InputError, match=r"search_settled_nats must be a finite number"):
        build_config("default", {"schedule": {"search_settled_nats": math.nan}})
    assert build_config("default", {"schedule": {"search_stop_fraction": 1}}).schedule \
        .search_stop_fraction == 1.0


def test_presets_and_the_preset_minimum_above_a_shorter_search():
    default = build_config("default").schedule
    assert (default.epochs, default.search_epochs, default.search_min_epochs,
            default.search_stop_fraction, default.search_plateau_fraction,
            default.search_settled_nats) == (16, 12, 4, 0.02, 0.04, 1.0)
    # a command line's shorter search drops the preset's minimum (no early stop possible)
    assert build_config("default", {"schedule": {"search_epochs": 2}}).schedule \
        .search_min_epochs is None
    assert build_config("default", {"schedule": {"search_epochs": 6}}).schedule \
        .search_min_epochs == 4
    amortized = build_config("default", {"schedule": {"method": "amortized"}}).schedule
    assert (amortized.search_epochs, amortized.search_min_epochs) == (0, None)
    for name in ("paper-synthetic", "paper-real"):  # no search, nothing to stop
        s = build_config(name).schedule
        assert (s.search_epochs, s.search_min_epochs) == (0, None)
    assert ScheduleConfig().search_min_epochs is None  # built-in default: no early stop
    assert ScheduleConfig().search_plateau_fraction == 0.0
    assert ScheduleConfig().search_settled_nats == 0.0


def test_early_stop_flags_reach_the_config():
    from cryospin.cli import reconstruct as cli
    from cryospin.cli.flags import reconstruct as flags

    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", "--search-min-epochs", "2",
                              "--search-stop-fraction", "0.05",
                              "--search-plateau-fraction", "0.1",
                              "--search-settled-nats", "0.5"])
    s = build_config("default", cli._overrides(args)).schedule
    assert (s.search_epochs, s.search_min_epochs, s.search_stop_fraction,
            s.search_plateau_fraction, s.search_settled_nats) == (12, 2, 0.05, 0.1, 0.5)


# ----------------------------------------------------------------------------- jump fraction


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 simulated particles, 16 px, prepared for training."""
    from cryospin.io.particles import load_particles
    from cryospin.simulate import simulate_dataset
    from cryospin.train.config import DataConfig
    from cryospin.train.data import prepare_data

    folder = tmp_path_factory.mktemp("sim")
    simulate_dataset("bundled:6vyb", folder, n_particles=40, box_px=16,
                     pixel_size_angstrom=16.0, snr=1.0, seed=2)
    return prepare_data(load_particles(folder / "particles.star"), DataConfig())


@pytest.mark.parametrize("moved", [0, 5, 23])
def test_jump_fraction_counts_the_rows_moved_beyond_the_threshold(data, monkeypatch, moved):
    """40 particles; ``moved`` of them are turned by 90 deg during the epoch, 7 others by
    10 deg (local refinement): jump_fraction = moved / 40."""
    from cryospin.pose import PoseTable
    from cryospin.rotations import random_rotations, so3_exp
    from cryospin.train import autodecode
    from cryospin.volume import HartleyVolume

    g = torch.Generator().manual_seed(0)
    volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu(), generator=g)
    table = PoseTable(random_rotations(40, generator=g), None, lr_rot=0.05, lr_shift=0.05)
    jump = set(range(moved))
    small = set(range(30, 37))
    turn_90 = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2]))
    turn_10 = so3_exp(torch.tensor([math.radians(10.0), 0.0, 0.0]))

    def fake_refine(pose_table, volume_ht, batch, data, **kwargs):
        rotations = pose_table.rotations
        for row in batch.indices.tolist():
            if row in jump:
                rotations[row] = rotations[row] @ turn_90.to(rotations)
            elif row in small:
                rotations[row] = rotations[row] @ turn_10.to(rotations)

    monkeypatch.setattr(autodecode, "refine_poses", fake_refine)
    optimizer = torch.optim.Adam(volume.parameters(), lr=1e-3)
    stats = autodecode.autodecode_epoch(
        volume, table, data, optimizer, batch_size=16, pose_steps=0, refine_shifts=False,
        generator=torch.Generator().manual_seed(1), epoch=2)
    assert stats.num_images == 40
    assert stats.jump_fraction == moved / 40


# ----------------------------------------------------------------------------- readers


def test_metrics_readers_find_the_stop_and_old_files_read_as_not_stopped(tmp_path):
    from cryospin.rundir import EpochMetrics, append_metrics, read_metrics, search_stopped_after
    from cryospin.train.setup import run_status

    def line(epoch: int, **extra) -> EpochMetrics:
        return EpochMetrics(epoch=epoch, stage="autodecode", loss=1.0, num_images=4,
                            wall_time_s=1.0, images_per_s=4.0, extra=extra)

    half = tmp_path / "half_A"
    half.mkdir()
    for epoch in range(1, 10):  # the default schedule, stopped after epoch 6: 9 epochs
        stop = {"search_stop": {"after_epoch": 6}} if epoch == 6 else {}
        append_metrics(half / "metrics.jsonl", line(epoch, **stop))
    (half / "checkpoint.pt").write_bytes(b"")
    for name in ("map.mrc", "poses.star"):  # written after the checkpoint
        (half / name).write_bytes(b"")
    assert search_stopped_after(read_metrics(half / "metrics.jsonl")) == 6
    assert run_status(half, SCHEDULE) == ("finished", 9)  # not "partial": 9 < 12 epochs
    old = [{"epoch": 1, "stage": "autoencode"}, {"epoch": 2, "extra": {"switch": {}}}]
    assert search_stopped_after(old) is None


# --------------------------------------------------------------- stage 1's step budget


@pytest.mark.parametrize(("steps", "per_epoch", "stage1", "last"),
                         [(10, 4, 3, 2), (8, 4, 2, None), (1, 4, 1, 1), (3, 10, 1, 3),
                          (10_000, 625, 16, None), (10_000, 313, 32, 297)])
def test_step_budget_becomes_whole_epochs_and_a_cut_last_one(
    steps: int, per_epoch: int, stage1: int, last: int | None,
) -> None:
    given = ScheduleConfig(epochs=20, switch_epoch=7, switch_steps=steps)
    s = with_step_budget(given, per_epoch)
    assert s.switch_epoch == stage1 and s.epochs == stage1 + 13  # 13 stage-2 epochs kept
    counts = [stage1_batches(s, e, per_epoch) for e in range(1, stage1 + 1)]
    assert counts[:-1] == [None] * (stage1 - 1) and counts[-1] == last
    total = sum(per_epoch if c is None else c for c in counts)
    assert total == steps  # exactly the budget
    assert with_step_budget(ScheduleConfig(), per_epoch) == ScheduleConfig()
    assert stage1_batches(ScheduleConfig(), 1, per_epoch) is None


def test_search_stop_records_and_messages_say_which_rule_stopped_the_search():
    from cryospin.train.metrics import search_stop_message, search_stop_record

    rules = dataclasses.replace(SCHEDULE, search_plateau_fraction=0.05)
    plateau = search_stop_record(5, 0.028, 0.0296, rule=search_stops(rules, 5, 0.028, 0.0296),
                                 threshold_deg=20.0, stop_fraction=0.02, local_epochs=4)
    assert (plateau["rule"], plateau["previous_jump_fraction"]) == ("plateau", 0.0296)
    few = search_stop_record(5, 0.01, None, rule=search_stops(rules, 5, 0.01, None),
                             threshold_deg=20.0, stop_fraction=0.02, local_epochs=3)
    assert few["rule"] == "few" and "previous_jump_fraction" not in few
    assert [search_stop_message(r) for r in (plateau, few)] == [
        "global search done after epoch 5: 2.8 % of particles jumped > 20 deg (no longer "
        "falling: 3.0 % in the search epoch before); 4 local epochs follow",
        "global search done after epoch 5: 1.0 % of particles jumped > 20 deg (< 2 %); 3 "
        "local epochs follow"]
    settled = dataclasses.replace(SCHEDULE, search_settled_nats=1.0)
    record = search_stop_record(5, 0.452, 0.542, rule=search_stops(settled, 5, 0.452, 0.542,
                                                                   0.464),
                                threshold_deg=20.0, stop_fraction=0.02, local_epochs=3,
                                loss_drop_nats=0.464, settled_nats=1.0)
    assert (record["rule"], record["loss_drop_nats"], record["settled_nats"]) == (
        "settled", 0.464, 1.0)
    assert search_stop_message(record) == (
        "global search done after epoch 5: 45.2 % of particles jumped > 20 deg (the fit no "
        "longer improves: the mean loss fell by 0.46 < 1 nats per image); 3 local epochs follow")
    rose = {**record, "loss_drop_nats": -1.87}
    assert search_stop_message(rose).endswith(  # type: ignore[arg-type]
        "(the fit no longer improves: the mean loss rose by 1.9 (a fall of 1 needed) nats per "
        "image); 3 local epochs follow")
    # a record of cryospin <= 0.2 (no rule): the 2 % wording
    old = {k: v for k, v in few.items() if k != "rule"}
    assert search_stop_message(old) == search_stop_message(few)  # type: ignore[arg-type]


def test_the_encoder_lr_is_constant_then_linear_to_its_final_value_at_the_last_step():
    from cryospin.train.schedule import encoder_lr_schedule, stage1_encoder_lr

    lrs = [stage1_encoder_lr(s, 101, 1e-4, 1e-5, 0.5) for s in range(103)]
    assert lrs[:51] == [1e-4] * 51  # steps 0 .. 50.5 (= 0.5 x 101)
    assert lrs[100] == pytest.approx(1e-5, rel=1e-12) and lrs[101:] == [1e-5] * 2
    assert all(a > b for a, b in zip(lrs[50:101], lrs[51:101], strict=False))
    steps = np.diff(lrs[51:101])
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)  # linear
    assert stage1_encoder_lr(0, 10, 1e-4, 1e-5, 0.0) == 1e-4  # decays from the first step
    assert stage1_encoder_lr(9, 10, 1e-4, 1e-5, 0.0) == pytest.approx(1e-5, rel=1e-12)
    assert stage1_encoder_lr(0, 1, 1e-4, 1e-5, 0.5) == 1e-4  # one step: nothing to decay
    # per batch of an epoch, over a step budget or whole epochs
    config = build_config("default", {"optim": {"encoder_lr_final": 1e-5,
                                                "encoder_lr_decay_start": 0.5}})
    budget = dataclasses.replace(config, schedule=with_step_budget(
        dataclasses.replace(config.schedule, switch_steps=25), 10))  # epochs 1-3, 10+10+5
    got = [encoder_lr_schedule(budget, 10, e)(b) for e in (1, 2, 3) for b in range(1, 11)]
    assert got[:25] == [stage1_encoder_lr(s, 25, 1e-4, 1e-5, 0.5) for s in range(25)]
    epochs = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule,
                                                                      switch_epoch=2))
    assert encoder_lr_schedule(epochs, 10, 2)(10) == pytest.approx(1e-5, rel=1e-12)
    assert encoder_lr_schedule(build_config("default"), 10, 1) is None  # constant


def test_encoder_lr_decay_settings_are_validated_and_reach_the_config():
    from cryospin.cli import reconstruct as cli
    from cryospin.cli.flags import reconstruct as flags

    for key, bad, match in (("encoder_lr_final", 0.0, "encoder_lr_final must be > 0"),
                            ("encoder_lr_decay_start", 1.0,
                             r"encoder_lr_decay_start must be in \[0, 1\)"),
                            ("encoder_lr_decay_start", -0.1, "encoder_lr_decay_start")):
        with pytest.raises(InputError, match=match):
            build_config("default", {"optim": {key: bad}})
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", "--encoder-lr-final", "2e-5",
                              "--encoder-lr-decay-start", "0.25"])
    o = build_config("default", cli._overrides(args)).optim
    assert (o.encoder_lr_final, o.encoder_lr_decay_start) == (2e-5, 0.25)


def test_a_fixed_stage1_disc_keeps_its_radius_at_every_step_and_needs_a_start():
    """``loss_radius_start_px == loss_radius_end_px``: every stage-1 batch uses that radius
    (over a step budget with a cut last epoch too); the end alone is refused; the flags in
    cycles per box reach the config."""
    from cryospin.cli import reconstruct as cli
    from cryospin.cli.flags import reconstruct as flags
    from cryospin.train.schedule import loss_radius_schedule

    config = build_config("default", {"schedule": {"loss_radius_start_px": 10.0,
                                                   "loss_radius_end_px": 10.0}})
    budget = dataclasses.replace(config, schedule=with_step_budget(
        dataclasses.replace(config.schedule, switch_steps=25), 10))  # epochs 1-3, 10+10+5
    radii = [loss_radius_schedule(budget, 64, 10, e)(b) for e in (1, 2, 3) for b in range(1, 11)]
    assert radii == [10.0] * 30
    # the end above the training disc (31 cycles at 64 px) is the disc
    wide = build_config("default", {"schedule": {"loss_radius_start_px": 4.0,
                                                 "loss_radius_end_px": 50.0}})
    assert loss_radius_schedule(wide, 64, 10, 1)(10) == 31.0
    with pytest.raises(InputError, match="loss_radius_end_px needs schedule.loss_radius_start_px"):
        build_config("default", {"schedule": {"loss_radius_end_px": 10.0}})
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", "--loss-radius-start", "10",
                              "--loss-radius-end", "10"])
    s = build_config("default", cli._overrides(args)).schedule
    assert (s.loss_radius_start_px, s.loss_radius_end_px) == (10.0, 10.0)
