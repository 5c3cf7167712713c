"""The global search's grid over one asymmetric unit (cryospin.symmetry.asymmetric_unit)."""

from __future__ import annotations

import math

import pytest
import torch

from cryospin.rotations import random_rotations, so3_exp
from cryospin.symmetry import asymmetric_unit, point_group_rotations
from cryospin.train.autodecode import pose_change_deg, super_fibonacci_rotations


def _angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic distances `(n, m)` (rad) between rotations `(n, 3, 3)` and `(m, 3, 3)`."""
    trace = torch.einsum("nij,mij->nm", a, b)
    return torch.arccos(((trace - 1) / 2).clamp(-1, 1))


@pytest.mark.parametrize("symbol", ["C4", "D7", "O", "I"])
def test_one_element_of_each_coset_of_a_closed_set(symbol):
    """Of a set closed under G (every R g present, shuffled), exactly one element of each
    coset is kept, the one nearest the identity."""
    G = point_group_rotations(symbol)
    gen = torch.Generator().manual_seed(0)
    base = random_rotations(40, generator=gen)
    closed = (base[:, None] @ G[None]).reshape(-1, 3, 3)
    closed = closed[torch.randperm(closed.shape[0], generator=gen)]
    kept = asymmetric_unit(closed, G)
    assert kept.shape[0] == base.shape[0]
    orbit = (kept[:, None] @ G[None]).reshape(kept.shape[0], -1, 9)  # (K, G, 9)
    same = (orbit[:, None] - kept.reshape(1, -1, 1, 9)).abs().amax(-1).amin(-1) < 1e-9
    assert torch.equal(same, torch.eye(kept.shape[0], dtype=torch.bool))  # distinct cosets
    angle = torch.arccos(((torch.einsum("kgii->kg", orbit.reshape(-1, G.shape[0], 3, 3)) - 1)
                          / 2).clamp(-1, 1))
    assert bool((angle[:, :1] <= angle + 1e-9).all())


def test_ties_on_the_boundary_are_kept_once():
    """Rotations by ±90° about z are equally far from the identity and C2-related: one of the
    pair is kept."""
    G = point_group_rotations("C2")
    quarter = point_group_rotations("C4")[1]
    pair = torch.stack([quarter, quarter @ G[1]])
    assert asymmetric_unit(pair, G).shape[0] == 1
    assert asymmetric_unit(pair.flip(0), G).shape[0] == 1
    torch.testing.assert_close(asymmetric_unit(pair, G), asymmetric_unit(pair.flip(0), G))


@pytest.mark.parametrize("symbol, n", [("C4", 2048), ("D7", 2048), ("I", 4096)])
def test_grid_covers_so3_modulo_the_group(symbol, n):
    """About n/|G| grid points are kept, and every rotation of a fine random set has a
    G-equivalent near a kept one: within 1.25x the full grid's covering radius (measured
    1.17x C4, 1.19x D7, 1.10x I: a point near the domain's boundary may have its nearest grid
    point across it, where the grid is not kept)."""
    G = point_group_rotations(symbol)
    grid = super_fibonacci_rotations(n, dtype=torch.float64)
    kept = asymmetric_unit(grid, G)
    assert abs(kept.shape[0] - n / G.shape[0]) <= 0.05 * n / G.shape[0] + 2
    probes = random_rotations(4000, generator=torch.Generator().manual_seed(1))
    covering = _angles(probes, grid).min(dim=1).values.max()
    expanded = (kept[:, None] @ G[None]).reshape(-1, 3, 3)  # every R g of the kept
    reach = _angles(probes, expanded).min(dim=1).values.max()
    assert float(reach) <= 1.25 * float(covering)
    assert math.degrees(float(covering)) < 25


def test_trivial_group_keeps_everything():
    grid = super_fibonacci_rotations(100)
    torch.testing.assert_close(asymmetric_unit(grid, point_group_rotations("C1")), grid)


def test_pose_changes_are_measured_modulo_the_group():
    """A pose replaced by a symmetry copy ``R g`` did not move (no jump for the early stop);
    a real change is measured whatever copy it lands in."""
    group = point_group_rotations("D7")  # (14, 3, 3) float64
    before = random_rotations(14, generator=torch.Generator().manual_seed(0))
    copies = before @ group  # row i: R_i g_i
    assert float(pose_change_deg(before, copies, group).max()) < 1e-6
    assert float(pose_change_deg(before, copies)[1:].min()) > 20.0  # C1: copies are jumps
    turn = so3_exp(torch.tensor([0.0, 0.0, math.radians(5.0)], dtype=torch.float64))
    moved = before @ turn @ group  # a 5 deg change, then a copy
    torch.testing.assert_close(pose_change_deg(before, moved, group),
                               torch.full((14,), 5.0, dtype=torch.float64))
