"""The shift search by cross-correlation (cryospin.forward.shift_search), in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

from cryospin.forward.hartley import hartley2
from cryospin.forward.lattice import disc_frequencies, negation_permutation
from cryospin.forward.shift_search import best_shifts, shift_correlation
from cryospin.forward.shifts import shift_hartley

L = 16


def _disc(radius: float | None = None):
    freqs = disc_frequencies(L, radius).double()  # (P, 2)
    return freqs, negation_permutation(freqs, L)


def _on_disc(images, freqs):
    """Hartley values `(..., P)` of real images `(..., L, L)` on the disc."""
    k = torch.round(freqs).long()
    flat = (k[:, 1] + L // 2) * L + (k[:, 0] + L // 2)
    return hartley2(images).flatten(-2)[..., flat]


def test_the_correlation_is_the_inner_product_with_the_shifted_prediction_at_every_shift():
    g = torch.Generator().manual_seed(0)
    freqs, neg = _disc()
    observed = _on_disc(torch.randn(3, L, L, generator=g, dtype=torch.float64), freqs)
    predicted = _on_disc(torch.randn(3, 2, L, L, generator=g, dtype=torch.float64), freqs)
    c = shift_correlation(observed[:, None], predicted, neg, freqs, L)  # (3, 2, L, L)
    assert c.shape == (3, 2, L, L) and c.dtype == torch.float64
    for tx, ty in itertools.product(range(-L // 2, L // 2), repeat=2):
        t = torch.tensor([tx, ty], dtype=torch.float64)
        direct = (observed[:, None] * shift_hartley(predicted, predicted[..., neg], t, freqs, L)
                  ).sum(-1)  # (3, 2)
        torch.testing.assert_close(c[..., ty % L, tx % L], direct, rtol=1e-10, atol=1e-9)


def test_the_peak_is_the_least_squares_shift():
    """The squared error ‖y − p_t‖² is ‖y‖² + ‖p‖² − 2 c(t): its minimum over the integer
    shifts (found by brute force) is the correlation's peak."""
    g = torch.Generator().manual_seed(1)
    freqs, neg = _disc(L // 2 - 1)
    observed = _on_disc(torch.randn(4, L, L, generator=g, dtype=torch.float64), freqs)
    predicted = _on_disc(torch.randn(4, 3, L, L, generator=g, dtype=torch.float64), freqs)
    c = shift_correlation(observed[:, None], predicted, neg, freqs, L)
    for tx, ty in [(0, 0), (3, -2), (-5, 7)]:
        t = torch.tensor([tx, ty], dtype=torch.float64)
        moved = shift_hartley(predicted, predicted[..., neg], t, freqs, L)
        sq = (observed[:, None] - moved).square().sum(-1)
        expected = observed.square().sum(-1)[:, None] + predicted.square().sum(-1) - 2 * c[
            ..., ty % L, tx % L]
        torch.testing.assert_close(sq, expected, rtol=1e-10, atol=1e-9)


def test_integer_shifts_within_the_bound_are_found_and_the_bound_holds():
    g = torch.Generator().manual_seed(2)
    freqs, neg = _disc()
    predicted = _on_disc(torch.randn(6, 2, L, L, generator=g, dtype=torch.float64), freqs)
    true = torch.tensor([[[3.0, -4.0], [0.0, 0.0]], [[-5.0, 5.0], [1.0, 2.0]],
                         [[-1.0, 0.0], [4.0, 4.0]], [[5.0, -5.0], [-3.0, 1.0]],
                         [[2.0, 2.0], [0.0, -5.0]], [[-4.0, -1.0], [5.0, 0.0]]],
                        dtype=torch.float64)  # (6, 2, 2)
    for m in range(2):  # each head's own observation: its prediction moved by its shift
        observed = shift_hartley(predicted[:, m], predicted[:, m][..., neg], true[:, m], freqs, L)
        found = best_shifts(observed, predicted, neg, freqs, L, max_shift_px=5)
        torch.testing.assert_close(found[:, m], true[:, m], rtol=0, atol=1e-9)
        assert found.abs().max() <= 5
    # a true shift beyond the bound: the answer stays within it
    observed = shift_hartley(predicted[:, 0], predicted[:, 0][..., neg],
                             torch.tensor([7.0, 0.0], dtype=torch.float64), freqs, L)
    found = best_shifts(observed, predicted, neg, freqs, L, max_shift_px=3)
    assert found.abs().max() <= 3
    with pytest.raises(ValueError, match="max_shift_px"):
        best_shifts(observed, predicted, neg, freqs, L, max_shift_px=L / 2)


def test_a_fractional_shift_of_a_smooth_image_is_found_to_a_tenth_of_a_pixel():
    """A Gaussian blob (σ 2 px) moved by non-integer shifts: the parabola through the peak."""
    freqs, neg = _disc()
    y, x = torch.meshgrid(torch.arange(L, dtype=torch.float64) - L // 2,
                          torch.arange(L, dtype=torch.float64) - L // 2, indexing="ij")
    blob = torch.exp(-(x**2 + y**2) / (2 * 2.0**2))
    predicted = _on_disc(blob, freqs).expand(4, 1, -1)
    true = torch.tensor([[1.3, -2.6], [0.45, 0.0], [-3.2, 2.49], [2.0, 1.7]],
                        dtype=torch.float64)
    observed = shift_hartley(predicted[:, 0], predicted[:, 0][..., neg], true, freqs, L)
    found = best_shifts(observed, predicted, neg, freqs, L, max_shift_px=6)[:, 0]
    assert (found - true).abs().max() < 0.1
    assert (found - true).abs().max() < (found.round() - true).abs().max()  # better than integers
