"""remove_common_rotation: the batch's shared map-frame rotation is taken out, the rest kept."""

from __future__ import annotations

import torch

from cryospin.rotations import random_rotations, so3_exp, so3_log
from cryospin.train.autodecode import remove_common_rotation


def _batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    return random_rotations(n, generator=g, dtype=torch.float64), g


def test_a_pure_change_of_frame_is_undone():
    before, g = _batch()
    c = torch.tensor([0.03, -0.02, 0.05], dtype=torch.float64)
    after = before @ so3_exp(c)  # every row rotated by the same map-frame rotation
    out = remove_common_rotation(before, after)
    torch.testing.assert_close(out, before, atol=1e-12, rtol=0)


def test_changes_with_zero_mean_are_kept_and_the_input_is_not_mutated():
    before, g = _batch()
    w = 0.05 * torch.randn(32, 3, generator=g, dtype=torch.float64)
    w = w - w.mean(0)  # no common part
    after = before @ so3_exp(w)
    copy = after.clone()
    out = remove_common_rotation(before, after)
    torch.testing.assert_close(out, after, atol=1e-5, rtol=0)  # log-mean vs exact: O(|w|^3)
    torch.testing.assert_close(after, copy, atol=0, rtol=0)


def test_the_result_has_no_common_rotation_and_keeps_the_individual_part():
    before, g = _batch(64, seed=3)
    w = 0.04 * torch.randn(64, 3, generator=g, dtype=torch.float64)
    c = torch.tensor([0.1, 0.0, -0.07], dtype=torch.float64)
    after = before @ so3_exp(w) @ so3_exp(c)
    out = remove_common_rotation(before, after)
    residual = so3_log(before.transpose(-1, -2) @ out)  # (64, 3)
    # the common part (|c| = 0.12 rad) is gone up to the second-order (BCH) cross terms
    # |w||c| / 2 ~ 2e-3 per row, which average out over the batch
    assert residual.mean(0).norm() < 1e-4
    # each row keeps its own change up to the (small) common correction
    torch.testing.assert_close(residual, w - w.mean(0), atol=2e-3, rtol=0)
    assert torch.allclose(out @ out.transpose(-1, -2), torch.eye(3, dtype=torch.float64)
                          .expand(64, 3, 3), atol=1e-12)
