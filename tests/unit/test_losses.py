"""Tests of cryospin.losses: Gaussian NLL, winner-take-all, head usage."""

from __future__ import annotations

import math

import pytest
import torch

from cryospin.forward.hartley import fft2_centered, hartley2
from cryospin.forward.lattice import disc_indices
from cryospin.losses import gaussian_nll, head_usage, winner_take_all


def test_gaussian_nll_hand_computed() -> None:
    predicted = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]], dtype=torch.float64)  # (1, 2, 2)
    observed = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # (1, 2)
    nll = gaussian_nll(predicted, observed, 2.0)
    # head 0: (0² + 2²) / (2·2) = 1; head 1: (1² + 0²) / 4 = 0.25
    torch.testing.assert_close(nll, torch.tensor([[1.0, 0.25]], dtype=torch.float64))
    assert nll.dtype == torch.float64


def test_gaussian_nll_per_frequency_and_per_image_variance() -> None:
    predicted = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]], dtype=torch.float64)  # (2, 1, 2)
    observed = torch.zeros(2, 2, dtype=torch.float64)
    per_freq = gaussian_nll(predicted, observed, torch.tensor([0.5, 2.0], dtype=torch.float64))
    # image 0: 1/(2·0.5) + 4/(2·2) = 2; image 1: 9/1 + 0 = 9
    torch.testing.assert_close(per_freq, torch.tensor([[2.0], [9.0]], dtype=torch.float64))
    per_image = gaussian_nll(predicted, observed, torch.tensor([[1.0], [4.5]], dtype=torch.float64))
    # image 0: 5/2 = 2.5; image 1: 9/9 = 1
    torch.testing.assert_close(per_image, torch.tensor([[2.5], [1.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("pred_shape", "obs_shape"), [((2, 3), (2, 3)), ((2, 1, 3), (2, 4)), ((2, 1, 3), (3, 3))]
)
def test_gaussian_nll_rejects_bad_shapes(pred_shape: tuple, obs_shape: tuple) -> None:
    with pytest.raises(ValueError, match="predicted"):
        gaussian_nll(torch.zeros(pred_shape), torch.zeros(obs_shape), 1.0)


def test_gaussian_nll_rejects_nonpositive_variance() -> None:
    with pytest.raises(ValueError, match="noise_variance"):
        gaussian_nll(torch.zeros(1, 1, 2), torch.zeros(1, 2), 0.0)


@pytest.mark.parametrize("L", [8, 9])
def test_hartley_parseval_on_the_loss_disc(L: int) -> None:
    """Summed squared Hartley error on the (symmetric) disc == summed squared Fourier error."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, L, L, generator=gen, dtype=torch.float64)
    b = torch.randn(3, L, L, generator=gen, dtype=torch.float64)
    idx = disc_indices(L)
    ha = hartley2(a).reshape(3, L * L)[:, idx]
    hb = hartley2(b).reshape(3, L * L)[:, idx]
    fa = fft2_centered(a).reshape(3, L * L)[:, idx]
    fb = fft2_centered(b).reshape(3, L * L)[:, idx]
    nll = gaussian_nll(ha[:, None], hb, 0.5)[:, 0]  # σ² = 1/2: plain sum of squares
    torch.testing.assert_close(nll, (fa - fb).abs().square().sum(-1))


def test_winner_take_all_hand_computed() -> None:
    loss_bm = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 1.0]], dtype=torch.float64)
    loss, best = winner_take_all(loss_bm)
    torch.testing.assert_close(loss, torch.tensor(0.75, dtype=torch.float64))
    assert best.dtype == torch.int64
    assert best.tolist() == [1, 0]


def test_winner_take_all_gradient_reaches_only_the_winner() -> None:
    loss_bm = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 1.0]], requires_grad=True)
    loss, _ = winner_take_all(loss_bm)
    loss.backward()
    expected = torch.tensor([[0.0, 0.5, 0.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(loss_bm.grad, expected)


def test_winner_take_all_through_nll_leaves_losing_heads_without_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    predicted = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    observed = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    loss, best = winner_take_all(gaussian_nll(predicted, observed, 1.0))
    loss.backward()
    grad = predicted.grad
    for b in range(4):
        for m in range(3):
            if m == best[b]:
                # d/dpred of (pred − obs)²/2, averaged over B
                torch.testing.assert_close(grad[b, m], (predicted[b, m] - observed[b]).detach() / 4)
            else:
                assert torch.equal(grad[b, m], torch.zeros(5, dtype=torch.float64))


def test_winner_take_all_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="(B, M)"):
        winner_take_all(torch.zeros(3))


def test_head_usage_fractions() -> None:
    usage = head_usage(torch.tensor([0, 2, 2, 1]), 4)
    torch.testing.assert_close(usage, torch.tensor([0.25, 0.25, 0.5, 0.0]))
    assert head_usage(torch.zeros(0, dtype=torch.int64), 3).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="num_heads"):
        head_usage(torch.tensor([0, 3]), 3)


def test_head_spread_is_zero_for_constant_heads_and_about_132_deg_for_random_float64() -> None:
    from cryospin.losses import head_spread_deg
    from cryospin.rotations import quaternion_to_matrix

    g = torch.Generator().manual_seed(0)
    fixed = quaternion_to_matrix(torch.randn(3, 4, dtype=torch.float64, generator=g))  # (3,3,3)
    const = fixed[None].expand(64, 3, 3, 3)  # every image: head m's rotation
    torch.testing.assert_close(head_spread_deg(const), torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    random = quaternion_to_matrix(torch.randn(4000, 2, 4, dtype=torch.float64, generator=g))
    spread = head_spread_deg(random)
    # the median angle of a uniformly random rotation: (θ − sin θ)/π = 1/2 at θ ≈ 132.3°
    assert spread.shape == (2,) and bool(((spread - 132.3).abs() < 3.0).all()), spread
    # a rotation of 30° about z between the two halves: exactly 30
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    pair = torch.stack([fixed[:1], rz @ fixed[:1]])  # (2, 1, 3, 3)
    torch.testing.assert_close(head_spread_deg(pair), torch.tensor([30.0], dtype=torch.float64))
    assert bool(head_spread_deg(const[:1]).isnan().all())
