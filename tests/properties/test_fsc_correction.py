"""The phase-randomisation correction ``FSC_true = (FSC_t − FSC_n)/(1 − FSC_n)`` (float64):
RELION's formula beyond the randomisation shell, the masked FSC before it, always in
``[−1, 1]``, and 0 where the mask alone explains the correlation (``FSC_n → 1``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cryospin.evaluate.gold_standard import corrected_fsc

CORRELATION = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)


@st.composite
def curves(draw):
    n = draw(st.integers(2, 40))
    t = draw(arrays(np.float64, n, elements=CORRELATION))
    r = draw(arrays(np.float64, n, elements=CORRELATION))
    s_r = draw(st.integers(0, n + 1))
    return t, r, s_r


@settings(max_examples=300, deadline=None)
@given(curves())
def test_formula_beyond_the_randomisation_shell_masked_fsc_before(data) -> None:
    t, n, s_r = data
    out = corrected_fsc(t, n, s_r)
    assert out.dtype == np.float64 and out.shape == t.shape
    assert np.all(np.abs(out) <= 1.0)  # a correlation, whatever FSC_n does
    np.testing.assert_array_equal(out[:s_r], t[:s_r])
    for s in range(s_r, t.size):
        if 1.0 - n[s] <= 1e-6:
            assert out[s] == 0.0  # no information left
        else:
            expected = float(np.clip((t[s] - n[s]) / (1.0 - n[s]), -1.0, 1.0))
            assert out[s] == expected
            if n[s] <= t[s]:
                assert 0.0 <= out[s] <= 1.0  # the mask's share removed, never more


@settings(max_examples=200, deadline=None)
@given(curves())
def test_monotone_in_the_masked_fsc_and_identity_without_mask_correlation(data) -> None:
    t, n, s_r = data
    zero = corrected_fsc(t, np.zeros_like(n), s_r)
    np.testing.assert_array_equal(zero, t)  # FSC_n = 0: nothing to correct
    higher = np.minimum(t + 0.1, 1.0)
    assert np.all(corrected_fsc(higher, n, s_r) >= corrected_fsc(t, n, s_r))


def test_the_issue_case_no_longer_goes_below_minus_one() -> None:
    """Shell values of the reported 32 px halves run: masked 0.711, randomised 0.863 gave
    −1.108 (and −1.195 at Nyquist with 0.671 / 0.85)."""
    out = corrected_fsc(np.array([1.0, 0.711, 0.671]), np.array([1.0, 0.863, 0.85]), 1)
    assert out[0] == 1.0
    assert out[1] == -1.0 and out[2] == -1.0
    assert corrected_fsc(np.array([0.5]), np.array([1.0 - 1e-9]), 0)[0] == 0.0
    assert corrected_fsc(np.array([np.nan]), np.array([0.2]), 0)[0] == 0.0
