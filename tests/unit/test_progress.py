"""The ETA arithmetic of a run (cryospin.train.progress), checked against hand-computed cases:
the phase of every epoch (also after an early stop of the global search), the images left by
phase, rates measured or estimated from the relative speeds, and the formatting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryospin.train.config import ScheduleConfig
from cryospin.train.progress import (
    AUTOENCODE,
    BACKPROJECT,
    LOCAL,
    SEARCH,
    RunEstimate,
    RunPlan,
    add_sample,
    backprojection_images,
    estimate_rates,
    eta_s,
    format_duration,
    format_run_eta,
    insertion_weight,
    lowpass_weight,
    phase_totals,
    progress_line,
    relative_speed,
    run_eta_s,
)
from cryospin.train.schedule import earliest_search_stop

# relative speeds for hand arithmetic (the run's come from relative_speed(box_px))
SPEEDS = {AUTOENCODE: 1.0, SEARCH: 1.0, LOCAL: 2.0}

# the default preset's shape: 1 stage-1 epoch, up to 8 search epochs, 3 local epochs
SCHEDULE = ScheduleConfig(epochs=12, switch_epoch=1, search_epochs=8, search_min_epochs=4,
                          search_stop_fraction=0.02)


def test_phases_of_the_default_schedule_and_after_an_early_stop():
    plan = RunPlan.from_schedule(SCHEDULE, switch_epoch=1, search_stopped_after=None)
    assert (plan.switch_epoch, plan.last_search_epoch, plan.last_epoch) == (1, 9, 12)
    assert [plan.phase(e) for e in range(1, 13)] == (
        [AUTOENCODE] + [SEARCH] * 8 + [LOCAL] * 3)
    # the search stopped after epoch 5: the 3 local epochs follow at once, the run ends at 8
    stopped = RunPlan.from_schedule(SCHEDULE, switch_epoch=1, search_stopped_after=5)
    assert (stopped.last_search_epoch, stopped.last_epoch) == (5, 8)
    assert [stopped.phase(e) for e in range(1, 9)] == (
        [AUTOENCODE] + [SEARCH] * 4 + [LOCAL] * 3)
    # --stop-after: this invocation ends earlier; a method that never switches: all stage 1
    assert RunPlan.from_schedule(SCHEDULE, switch_epoch=1, search_stopped_after=None,
                                 last_epoch=3).last_epoch == 3
    never = RunPlan(switch_epoch=12, last_search_epoch=12, last_epoch=12)
    assert {never.phase(e) for e in range(1, 13)} == {AUTOENCODE}


def test_remaining_images_by_phase():
    plan = RunPlan(switch_epoch=1, last_search_epoch=4, last_epoch=6)
    assert plan.remaining_images(1, 25, 100) == {AUTOENCODE: 75, SEARCH: 300, LOCAL: 200}
    assert plan.remaining_images(4, 100, 100) == {LOCAL: 200}  # epoch 4 just finished
    assert plan.remaining_images(6, 40, 100) == {LOCAL: 60}
    assert plan.remaining_images(6, 100, 100) == {}


def test_eta_in_stage_1_estimates_the_later_stages_from_the_relative_speeds():
    """Epoch 1 of 6 (1 stage-1, 3 search, 2 local), 25 of 100 images in 5 s: 5 images/s.
    Unmeasured: search at 5 * 1 = 5, local at 5 * 2 = 10 images/s.
    75/5 + 300/5 + 200/10 = 15 + 60 + 20 s."""
    plan = RunPlan(switch_epoch=1, last_search_epoch=4, last_epoch=6)
    totals = add_sample({}, AUTOENCODE, 25, 5.0)
    assert estimate_rates(totals, AUTOENCODE, SPEEDS) == {AUTOENCODE: 5.0, SEARCH: 5.0,
                                                          LOCAL: 10.0}
    assert run_eta_s(plan, 1, 25, 100, totals, SPEEDS) == pytest.approx(15 + 60 + 20)
    assert run_eta_s(plan, 1, 25, 100, totals, {AUTOENCODE: 1.0, SEARCH: 1.0, LOCAL: 1.0}) == \
        pytest.approx(575 / 5)


def test_relative_speeds_follow_the_box():
    """Search 1.6x stage 1 at every box; local 1.6 * 64 / L: as fast as a search epoch at
    64 px, twice as fast at 32 px, half as fast at 128 px; a C1 backprojection 3.6 * 64 / L."""
    assert relative_speed(64) == {AUTOENCODE: 1.0, SEARCH: 1.6, LOCAL: 1.6, BACKPROJECT: 3.6}
    assert relative_speed(32)[LOCAL] == pytest.approx(3.2)
    assert relative_speed(128)[LOCAL] == pytest.approx(0.8)
    assert relative_speed(128)[BACKPROJECT] == pytest.approx(1.8)


@pytest.mark.parametrize(("box_px", "stage1", "search", "local"), [
    (32, 357.0, 870.0, 2027.0),    # the demo test's size, 1,000 particles (slowest run)
    (64, 509.0, 863.0, 855.0),     # D7 imposed, 20,000 (the slowest local epochs measured)
    (64, 514.0, 1018.0, 1205.0),   # the white spike, 20,000
    (128, 242.0, 560.0, 294.0),    # the coloured spike, 20,000
])
def test_the_estimates_err_on_the_long_side(box_px, stage1, search, local):
    """The ``default`` runs' measured images/s (relative_speed's docstring; the median of each
    phase's epochs in metrics.jsonl): a phase not yet run is estimated no faster than it ran
    (D7's local epochs: within 3 %)."""
    speeds = relative_speed(box_px)
    in_stage1 = estimate_rates({AUTOENCODE: (stage1, 1.0)}, AUTOENCODE, speeds)
    assert in_stage1[SEARCH] <= search and in_stage1[LOCAL] <= local
    in_search = estimate_rates({AUTOENCODE: (stage1, 1.0), SEARCH: (search, 1.0)}, SEARCH,
                               speeds)
    assert in_search[LOCAL] <= 1.03 * local


@pytest.mark.parametrize(("box_px", "stage1", "backprojection"), [
    (32, 375.7, 1000 / 0.192),   # the demo test's size, 1,000 particles, one thread
    (64, 505.8, 20_000 / 9.4),   # the fastest re-made volume measured at 64 px (coloured ADK)
    (64, 533.0, 20_000 / 9.1),   # the 30 % empty set
    (128, 242.3, 20_000 / 43.9),  # the coloured spike
])
def test_the_backprojection_estimate_errs_on_the_long_side(box_px, stage1, backprojection):
    """The re-made volume's images/s (``rebackproject`` records of ``default`` runs, C1)
    against the estimate from the first epoch's stage-1 rate: never faster than measured."""
    rates = estimate_rates({AUTOENCODE: (stage1, 1.0)}, AUTOENCODE, relative_speed(box_px))
    assert rates[BACKPROJECT] <= backprojection


def test_insertion_weight_counts_the_transforms_once():
    """One insertion: one C1 backprojection. D7 (7 insertions per image) measured 36.1 s
    against 8.6 s for C1 (20,000 images, 64 px): 4.2 times; the weight no shorter and within
    10 %."""
    assert insertion_weight(1) == 1.0
    assert 36.1 / 8.6 <= insertion_weight(7) <= 1.1 * 36.1 / 8.6


def test_the_plan_counts_the_backprojections_still_ahead():
    """100 particles, 3 insertions each in the final map (weight 2.2), plus 0.25 per particle
    for the scores: 245 C1 images; the re-made volume inserts each image once: 100. It starts
    epoch 5 (after the last search epoch, 4): ahead up to epoch 4, gone from epoch 5 on."""
    assert backprojection_images(100, 3, rebackproject=True, final=True) == pytest.approx(
        (100.0, 245.0))
    assert backprojection_images(100, 3, rebackproject=False, final=False) == (0.0, 0.0)
    plan = RunPlan.from_schedule(
        ScheduleConfig(epochs=6, switch_epoch=1, search_epochs=3), switch_epoch=1,
        search_stopped_after=None, particles=100, insertions=3, rebackproject=True)
    assert (plan.rebackproject_images, plan.final_images) == pytest.approx((100.0, 245.0))
    assert plan.remaining_images(4, 50, 100)[BACKPROJECT] == pytest.approx(100 + 245)
    assert plan.remaining_images(5, 0, 100) == pytest.approx({LOCAL: 200, BACKPROJECT: 245})
    assert plan.remaining_images(6, 100, 100) == pytest.approx({BACKPROJECT: 245})
    # --stop-after 3: neither comes in this invocation; --stop-after 5: the re-made one only
    early = RunPlan.from_schedule(
        ScheduleConfig(epochs=6, switch_epoch=1, search_epochs=3), switch_epoch=1,
        search_stopped_after=None, last_epoch=3, particles=100, insertions=3,
        rebackproject=True)
    assert BACKPROJECT not in early.remaining_images(2, 0, 100)
    mid = RunPlan.from_schedule(
        ScheduleConfig(epochs=6, switch_epoch=1, search_epochs=3), switch_epoch=1,
        search_stopped_after=None, last_epoch=5, particles=100, insertions=3,
        rebackproject=True)
    assert mid.remaining_images(2, 0, 100)[BACKPROJECT] == 100
    # no search epoch (or the option off): no re-made volume; the final map still comes
    for schedule, on in ((ScheduleConfig(epochs=6, switch_epoch=1, search_epochs=0), True),
                         (ScheduleConfig(epochs=6, switch_epoch=1, search_epochs=3), False)):
        plain = RunPlan.from_schedule(schedule, switch_epoch=1, search_stopped_after=None,
                                      particles=100, insertions=3, rebackproject=on)
        assert plain.remaining_images(1, 0, 100)[BACKPROJECT] == pytest.approx(245)


def test_the_plan_counts_the_volumes_re_made_during_the_search_still_ahead():
    """``rebackproject_during_search``: one C1 backprojection of every particle at the start of
    each search epoch from the second. Stage 1 in epoch 1, search epochs 2-5, local 6-7: the
    re-makes start epochs 3, 4 and 5 (the after-search one epoch 6). During epoch 2 all four
    are ahead; during epoch 4 (its own done) the one of epoch 5 and the after-search one;
    during epoch 5 only the latter. After an early stop (after epoch 3: last search epoch 3)
    only epoch 3's; ``--stop-after 4``: epochs 3 and 4's."""
    schedule = ScheduleConfig(epochs=7, switch_epoch=1, search_epochs=4)

    def plan(**kwargs):
        return RunPlan.from_schedule(schedule, switch_epoch=1, particles=100, insertions=1,
                                     rebackproject=True, rebackproject_during_search=True,
                                     **{"search_stopped_after": None, **kwargs})

    full = plan()
    assert full.search_rebackproject_images == 100.0
    final = 125.0  # the final map (one insertion) and the scores
    assert full.remaining_images(2, 0, 100)[BACKPROJECT] == pytest.approx(4 * 100 + final)
    assert full.remaining_images(4, 50, 100)[BACKPROJECT] == pytest.approx(2 * 100 + final)
    assert full.remaining_images(5, 0, 100)[BACKPROJECT] == pytest.approx(100 + final)
    assert full.remaining_images(6, 0, 100)[BACKPROJECT] == pytest.approx(final)
    stopped = plan(search_stopped_after=3)  # last search epoch 3, the run ends at epoch 5
    assert stopped.remaining_images(2, 0, 100)[BACKPROJECT] == pytest.approx(2 * 100 + final)
    cut = plan(last_epoch=4)  # --stop-after 4: neither the after-search one nor the final map
    assert cut.remaining_images(2, 0, 100)[BACKPROJECT] == pytest.approx(2 * 100)
    off = RunPlan.from_schedule(schedule, switch_epoch=1, search_stopped_after=None,
                                particles=100, insertions=1, rebackproject=True)
    assert off.remaining_images(2, 0, 100)[BACKPROJECT] == pytest.approx(100 + final)
    single = RunPlan.from_schedule(ScheduleConfig(epochs=4, switch_epoch=1, search_epochs=1),
                                   switch_epoch=1, search_stopped_after=None, particles=100,
                                   insertions=1, rebackproject_during_search=True)
    assert single.remaining_images(1, 0, 100)[BACKPROJECT] == pytest.approx(final)


def test_eta_adds_the_backprojections_at_their_measured_or_estimated_rate():
    """Epoch 1 of 4 (1 stage-1, 2 search, 1 local), 100 particles, C1: 100 C1 images for the
    re-made volume, 125 for the final map and scores. Stage 1 at 5 images/s, a backprojection
    estimated 4x that (20/s): 75/5 + 200/5 + 100/10 + 225/20 s. Once the re-made volume has run
    (100 images in 2 s: 50/s), the final map's 125 take 2.5 s."""
    speeds = {**SPEEDS, BACKPROJECT: 4.0}
    schedule = ScheduleConfig(epochs=4, switch_epoch=1, search_epochs=2)
    plan = RunPlan.from_schedule(schedule, switch_epoch=1, search_stopped_after=None,
                                 particles=100, insertions=1, rebackproject=True)
    totals = add_sample({}, AUTOENCODE, 25, 5.0)
    assert run_eta_s(plan, 1, 25, 100, totals, speeds) == pytest.approx(
        75 / 5 + 200 / 5 + 100 / 10 + 225 / 20)
    after = add_sample(add_sample(totals, SEARCH, 200, 40.0), BACKPROJECT, 100, 2.0)
    assert run_eta_s(plan, 4, 0, 100, after, speeds) == pytest.approx(100 / 10 + 125 / 50)


def test_a_rebackproject_record_in_metrics_gives_the_backprojection_rate():
    """``extra.rebackproject`` of the epoch it started: its images (one insertion each, any
    group) over its seconds; a record without a positive time is skipped."""
    plan = RunPlan(switch_epoch=1, last_search_epoch=2, last_epoch=4)
    rows = [{"epoch": 3, "stage": "autodecode", "num_images": 100, "wall_time_s": 10.0,
             "extra": {"rebackproject": {"images": 100, "group": "D7", "seconds": 2.0}}},
            {"epoch": 4, "stage": "autodecode", "num_images": 100, "wall_time_s": 10.0,
             "extra": {"rebackproject": {"images": 100, "group": "C1", "seconds": 0.0}}}]
    assert phase_totals(rows, plan, 64) == {LOCAL: (200.0, 20.0), BACKPROJECT: (100.0, 2.0)}


def test_eta_uses_the_measured_rate_of_every_phase_that_ran():
    """Resumed in epoch 2 (search): metrics.jsonl has epoch 1 at 5 images/s; epoch 2 so far
    50 images in 5 s (10 images/s); local, unmeasured, from the current phase: 10 * 2/1 =
    20. (50 + 200)/10 + 200/20 = 25 + 10 s."""
    plan = RunPlan(switch_epoch=1, last_search_epoch=4, last_epoch=6)
    rows = [{"epoch": 1, "stage": "autoencode", "num_images": 100, "wall_time_s": 20.0}]
    totals = phase_totals(rows, plan, 64)
    assert totals == {AUTOENCODE: (100.0, 20.0)}
    live = add_sample(totals, SEARCH, 50, 5.0)
    assert estimate_rates(live, SEARCH, SPEEDS) == {AUTOENCODE: 5.0, SEARCH: 10.0,
                                                     LOCAL: 20.0}
    assert run_eta_s(plan, 2, 50, 100, live, SPEEDS) == pytest.approx(25 + 10)
    # several epochs of a phase: images and time add up (two search epochs at 10 and 20 /s)
    rows += [{"epoch": 2, "stage": "autodecode", "num_images": 100, "wall_time_s": 10.0},
             {"epoch": 3, "stage": "autodecode", "num_images": 100, "wall_time_s": 5.0},
             {"epoch": 5, "stage": "autodecode", "num_images": 100, "wall_time_s": 2.0},
             {"epoch": 6, "stage": "autodecode", "num_images": 100, "wall_time_s": None}]
    assert phase_totals(rows, plan, 64) == {AUTOENCODE: (100.0, 20.0), SEARCH: (200.0, 15.0),
                                        LOCAL: (100.0, 2.0)}


def test_eta_after_an_early_stop_of_the_search_counts_only_the_shortened_run():
    """Default schedule, search stopped after epoch 5, in epoch 6 (local) with nothing done
    yet: 3 local epochs * 100 images at 20 images/s (stage 1's 10 * 2) = 15 s. Without the
    stop, epoch 6 would be a search epoch and 4 search epochs at the measured 10 images/s and 3
    local ones at 10 * 2/1 = 20 images/s would remain: 40 + 15 s."""
    rows = [{"epoch": 1, "stage": "autoencode", "num_images": 100, "wall_time_s": 10.0}] + [
        {"epoch": e, "stage": "autodecode", "num_images": 100, "wall_time_s": 10.0}
        for e in range(2, 6)]
    stopped = RunPlan.from_schedule(SCHEDULE, switch_epoch=1, search_stopped_after=5)
    totals = phase_totals(rows, stopped, 64)
    assert totals == {AUTOENCODE: (100.0, 10.0), SEARCH: (400.0, 40.0)}
    # nothing local measured: from the first measured phase, 10 * 2/1 = 20 images/s
    assert run_eta_s(stopped, 6, 0, 100, totals, SPEEDS) == pytest.approx(300 / 20)
    running = RunPlan.from_schedule(SCHEDULE, switch_epoch=1, search_stopped_after=None)
    assert run_eta_s(running, 6, 0, 100, totals, SPEEDS) == pytest.approx(400 / 10 + 300 / 20)


def test_unknown_rates_give_no_eta():
    plan = RunPlan(switch_epoch=1, last_search_epoch=4, last_epoch=6)
    assert estimate_rates({}, AUTOENCODE, SPEEDS) == {}
    assert run_eta_s(plan, 1, 0, 100, {}, SPEEDS) is None
    assert eta_s({SEARCH: 10}, {AUTOENCODE: 1.0}) is None
    assert eta_s({}, {}) == 0.0


def test_format_duration():
    assert [format_duration(s) for s in (0, 0.4, 59.4, 65, 600, 3725, 36000)] == [
        "0 s", "0 s", "59 s", "1 min 05 s", "10 min 00 s", "1 h 02 min", "10 h 00 min"]
    assert format_duration(None) == "?" and format_duration(math.nan) == "?"
    assert format_duration(math.inf) == "?"


def test_progress_line():
    """1,280 of 5,000 images in 20 s: 64 images/s, 3,720 left = 58 s."""
    line = progress_line("epoch 3/12 (stage 2, search)", 1280, 5000, 20.0, what="epoch",
                         run_eta=RunEstimate(750.0), with_run_eta=True)
    assert line == ("epoch 3/12 (stage 2, search): 1,280/5,000 images (26 %), 64.0 images/s, "
                    "ETA epoch 58 s, run 12 min 30 s")
    early = progress_line("epoch 3/12 (stage 2, search)", 1280, 5000, 20.0, what="epoch",
                          run_eta=RunEstimate(750.0, 430.0, 5), with_run_eta=True)
    assert early.endswith("run 12 min 30 s (7 min 10 s if the search stops after epoch 5)")
    assert progress_line("switch: inference pass", 0, 64, 1.0).endswith("ETA pass ?")
    assert progress_line("epoch 1/3 (stage 1)", 32, 64, 2.0, what="epoch", run_eta=None,
                         with_run_eta=True).endswith("ETA epoch 2 s, run ?")


@pytest.mark.parametrize(("box_px", "radius_px", "inserted"), [
    (128, 18, 1289), (64, 18, 1289), (48, 18, 1289), (32, 2, 57)])
def test_a_low_pass_backprojection_weighs_by_the_frequencies_it_inserts(box_px, radius_px,
                                                                         inserted):
    """``0.15 + 0.85 · f``, ``f`` the share of the box's pixels within ``radius + 0.5 + √3``
    (shell 18: |k| <= 20.23, 1,289 pixels whatever the box that holds the disc; shell 2:
    |k| <= 4.23, 57 pixels; counted here by brute force); None: a whole backprojection."""
    k = np.arange(box_px) - box_px // 2
    reach_sq = (radius_px + 0.5 + np.sqrt(3)) ** 2
    count = int(((k[:, None] ** 2 + k[None, :] ** 2) <= reach_sq).sum())
    assert count == inserted
    assert lowpass_weight(box_px, radius_px) == pytest.approx(
        0.15 + 0.85 * inserted / box_px**2, rel=1e-12)
    assert lowpass_weight(box_px, None) == 1.0


def test_a_low_pass_re_make_counts_by_its_weight():
    """The plan's re-makes during the search and a metrics record's images are weighted by
    :func:`lowpass_weight`: 100 particles at 128 px, shell 18 (weight ~0.217) per search
    epoch; a record of 100 images in 2 s with ``radius_px`` 18 is ~21.7 C1 images."""
    weight = lowpass_weight(128, 18)
    assert 0.2 < weight < 0.25
    schedule = ScheduleConfig(epochs=7, switch_epoch=1, search_epochs=4)
    plan = RunPlan.from_schedule(schedule, switch_epoch=1, search_stopped_after=None,
                                 particles=100, insertions=1, rebackproject=True,
                                 rebackproject_during_search=True,
                                 search_rebackproject_weight=weight)
    assert plan.search_rebackproject_images == pytest.approx(100 * weight)
    assert plan.remaining_images(2, 0, 100)[BACKPROJECT] == pytest.approx(
        3 * 100 * weight + 100 + 125)
    rows = [{"epoch": 3, "stage": "autodecode", "num_images": 100, "wall_time_s": 10.0,
             "extra": {"rebackproject": {"images": 100, "group": "C1", "seconds": 2.0,
                                         "during_search": True, "radius_px": 18}}}]
    assert phase_totals(rows, plan, 128)[BACKPROJECT] == pytest.approx((100 * weight, 2.0))


def test_format_run_eta_shows_an_earlier_end_only_when_there_is_one():
    assert format_run_eta(RunEstimate(700.0, 400.0, 5)) == (
        "11 min 40 s (6 min 40 s if the search stops after epoch 5)")
    assert format_run_eta(RunEstimate(700.0)) == "11 min 40 s"
    assert format_run_eta(RunEstimate(700.0, 700.0, 5)) == "11 min 40 s"  # no earlier end
    assert format_run_eta(RunEstimate(4.2, 3.8, 5)) == "4 s"  # the same when shown
    assert format_run_eta(RunEstimate(None, 400.0, 5)) == "?"
    assert format_run_eta(RunEstimate(700.0, None, 5)) == "11 min 40 s"
    assert format_run_eta(None) == "?"


def test_the_eta_if_the_search_stopped_at_the_first_chance():
    """The default schedule (stage 1 in epoch 1, at most 8 search epochs, early stop from
    search epoch 4, 3 local epochs): in epoch 3 the earliest stop is after epoch 5; stopped
    there the plan ends at epoch 8. 100 images per epoch, search 10 images/s, local 20, in
    epoch 3 with nothing done: planned 7 search epochs (3-9) and 3 local, 70 + 15 s; stopped
    after 5: 3 search and 3 local, 30 + 15 s."""
    assert earliest_search_stop(SCHEDULE, 3, None) == 5
    assert earliest_search_stop(SCHEDULE, 7, None) == 7
    assert earliest_search_stop(SCHEDULE, 9, None) is None  # the last search epoch
    assert earliest_search_stop(SCHEDULE, 6, 5) is None  # stopped already
    assert earliest_search_stop(SCHEDULE, 1, None) == 5  # from stage 1 on
    rows = [{"epoch": 1, "stage": "autoencode", "num_images": 100, "wall_time_s": 10.0},
            {"epoch": 2, "stage": "autodecode", "num_images": 100, "wall_time_s": 10.0}]
    planned = RunPlan.from_schedule(SCHEDULE, switch_epoch=1, search_stopped_after=None)
    early = RunPlan.from_schedule(SCHEDULE, switch_epoch=1, search_stopped_after=5)
    assert early.last_epoch == 8
    totals = phase_totals(rows, planned, 64)
    speeds = {AUTOENCODE: 1.0, SEARCH: 1.0, LOCAL: 2.0}
    assert run_eta_s(planned, 3, 0, 100, totals, speeds) == pytest.approx(70 + 15)
    assert run_eta_s(early, 3, 0, 100, totals, speeds) == pytest.approx(30 + 15)
