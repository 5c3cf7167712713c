"""The distinct axes of a point group and their orders (cryospin.symmetry.symmetry_axes),
float64, for the groups' conventional (RELION) orientations and a conjugated one."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cryospin.rotations import random_rotations
from cryospin.symmetry import point_group_rotations, symmetry_axes


@pytest.mark.parametrize(("symbol", "counts"), [
    ("C1", {}),
    ("C7", {7: 1}),
    ("D7", {7: 1, 2: 7}),
    ("D2", {2: 3}),
    ("T", {3: 4, 2: 3}),
    ("O", {4: 3, 3: 4, 2: 6}),
    ("I", {5: 6, 3: 10, 2: 15}),
    ("I1", {5: 6, 3: 10, 2: 15}),
])
def test_axes_and_orders(symbol: str, counts: dict[int, int]) -> None:
    group = point_group_rotations(symbol)
    axes, orders = symmetry_axes(group)
    assert axes.dtype == torch.float64 and orders.dtype == torch.int64
    assert dict(Counter(orders.tolist())) == counts
    assert orders.tolist() == sorted(orders.tolist(), reverse=True)
    assert torch.allclose(axes.norm(dim=-1), torch.ones(len(axes), dtype=torch.float64))
    # distinct as axes (±u is one axis)
    if len(axes) > 1:
        dots = (axes @ axes.T).abs() - torch.eye(len(axes), dtype=torch.float64)
        assert float(dots.max()) < 1 - 1e-6
    # every axis is fixed by the rotation 2π/n about it, which is in the group
    for u, n in zip(axes, orders.tolist(), strict=True):
        fixing = group[((group @ u - u).norm(dim=-1) < 1e-9)]
        assert fixing.shape[0] == n


def test_principal_axes_lie_where_relion_puts_them() -> None:
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    axes, orders = symmetry_axes(point_group_rotations("C7"))
    assert orders.tolist() == [7] and torch.allclose(axes[0], z)
    axes, orders = symmetry_axes(point_group_rotations("D7"))
    assert torch.allclose(axes[0], z)
    assert torch.allclose(axes[1:, 2], torch.zeros(7, dtype=torch.float64), atol=1e-12)
    x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert any(torch.allclose(a, x, atol=1e-12) for a in axes[1:])  # RELION: a 2-fold on x
    axes, orders = symmetry_axes(point_group_rotations("O"))
    assert torch.allclose(axes[:3].abs().sum(0), torch.ones(3, dtype=torch.float64))


def test_axes_of_a_conjugated_group_are_turned() -> None:
    M = random_rotations(1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[0]
    group = point_group_rotations("D5")
    axes, orders = symmetry_axes(group)
    axes_m, orders_m = symmetry_axes(M @ group @ M.T)
    assert orders_m.tolist() == orders.tolist()
    turned = axes @ M.T  # M u, each ±
    for n in (5, 2):
        a, b = turned[orders == n], axes_m[orders_m == n]
        assert float((a @ b.T).abs().amax(1).min()) > 1 - 1e-9
