"""``half_fit``: the relative gap between the halves' mean particle scores, the rule that
warns when one half explains its own images clearly worse than the other."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryospin.train.halves import HALF_FIT_GAP, half_fit, half_to_restart


def test_the_gap_is_the_difference_over_the_larger_mean_whichever_half_is_worse():
    rng = np.random.default_rng(0)
    a = 100.0 + rng.standard_normal(500)
    b = 90.0 + rng.standard_normal(400)
    a += 100.0 - a.mean()  # exact means: 100 and 90
    b += 90.0 - b.mean()
    ab, ba = half_fit(a, b), half_fit(b, a)
    assert ab.mean_score_nats == pytest.approx((100.0, 90.0), abs=1e-12)
    assert ab.relative_gap == pytest.approx(0.1, abs=1e-12)
    assert ba.relative_gap == ab.relative_gap  # symmetric
    assert (ab.worse, ba.worse) == ("B", "A")
    assert not ab.agree and not ba.agree  # 10 % > HALF_FIT_GAP


def test_halves_fitting_alike_agree_at_the_threshold_and_below():
    a = np.full(10, 100.0)
    assert half_fit(a, a).relative_gap == 0.0 and half_fit(a, a).agree
    edge = np.full(10, 100.0 * (1.0 - HALF_FIT_GAP))
    assert half_fit(a, edge).agree  # "at most" the threshold
    assert not half_fit(a, edge - 1e-6).agree


def test_no_positive_mean_is_not_judged():
    """Neither map explains its images better than an empty image: no gap, no agreement."""
    fit = half_fit(np.array([-3.0, -1.0]), np.array([-2.0]))
    assert math.isnan(fit.relative_gap) and not fit.agree
    assert fit.to_dict()["relative_gap"] is None and fit.to_dict()["agree"] is False


def test_the_half_that_fits_worse_gets_a_start_until_it_has_the_most():
    worse_b = half_fit(np.full(4, 100.0), np.full(4, 80.0))
    worse_a = half_fit(np.full(4, 80.0), np.full(4, 100.0))
    assert half_to_restart(worse_b, (1, 1), 3) == 2
    assert half_to_restart(worse_a, (1, 1), 3) == 1
    assert half_to_restart(worse_b, (1, 2), 3) == 2
    assert half_to_restart(worse_b, (1, 3), 3) is None  # half B has all its starts
    assert half_to_restart(worse_b, (3, 1), 1) is None  # --max-starts 1: never
    assert half_to_restart(worse_a, (1, 3), 3) == 1  # the other half's count does not matter


def test_halves_that_agree_or_cannot_be_compared_get_no_start():
    alike = half_fit(np.full(4, 100.0), np.full(4, 100.0 * (1 - HALF_FIT_GAP)))
    assert alike.agree and half_to_restart(alike, (1, 1), 3) is None
    unjudged = half_fit(np.full(4, -1.0), np.full(4, -2.0))
    assert math.isnan(unjudged.relative_gap) and half_to_restart(unjudged, (1, 1), 3) is None
    assert half_to_restart(None, (1, 1), 3) is None  # a half's star without scores
