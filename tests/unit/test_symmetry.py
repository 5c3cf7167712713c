"""Point groups, symmetric assemblies and pose errors modulo symmetry (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.evaluate.pose_error import pose_error
from cryospin.rotations import random_rotations
from cryospin.simulate.density import AtomicModel, parse_selection, symmetric_assembly
from cryospin.symmetry import parse_point_group, point_group_rotations


@pytest.mark.parametrize("symbol, order", [("C1", 1), ("c4", 4), ("D2", 4), ("D7", 14)])
def test_point_group_is_a_group_of_rotations(symbol, order):
    G = point_group_rotations(symbol)
    assert G.shape == (order, 3, 3) and G.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(G[0], eye)
    torch.testing.assert_close(G @ G.transpose(-1, -2), eye.expand(order, 3, 3))
    assert torch.allclose(torch.linalg.det(G), torch.ones(order, dtype=torch.float64))
    # closure: every product is an element; all elements distinct
    prods = (G[:, None] @ G[None]).reshape(-1, 9)  # (G², 9)
    dist = (prods[:, None] - G.reshape(1, -1, 9)).norm(dim=-1)  # (G², G)
    assert float(dist.min(dim=1).values.max()) < 1e-12
    flat = G.reshape(-1, 9)
    pairwise = (flat[:, None] - flat[None]).norm(dim=-1) + torch.eye(order) * 9
    assert float(pairwise.min()) > 1e-3


@pytest.mark.parametrize("bad", ["X3", "D1", "C0", "D", "7", "C-2"])
def test_bad_point_group_is_a_clear_error(bad):
    with pytest.raises(InputError, match="symmetry"):
        parse_point_group(bad)


def test_selection_parsing():
    assert parse_selection("A:330-530") == ("A", 330, 530)
    assert parse_selection("B") == ("B", None, None)
    for bad in ("A:530-330", "A:x-3", ":1-2", "A:5"):
        with pytest.raises(InputError, match="selection"):
            parse_selection(bad)


def test_assembly_is_invariant_under_its_group():
    g = torch.Generator().manual_seed(0)
    unit = AtomicModel(torch.randn(20, 3, generator=g, dtype=torch.float64) * 5 + 3.0,
                       torch.rand(20, generator=g, dtype=torch.float64) + 1, "random")
    asm = symmetric_assembly(unit, "D7")
    assert len(asm) == 14 * 20
    xyz = asm.coords_angstrom
    for R in point_group_rotations("D7"):
        moved = xyz @ R.T  # r -> g r
        # the rotated set equals the original set (each moved atom lands on an atom)
        gap = (moved[:, None] - xyz[None]).norm(dim=-1)  # (A, A)
        assert float(gap.min(dim=1).values.max()) < 1e-9
    # centre of mass on the symmetry axis at the origin
    torch.testing.assert_close(asm.centre_of_mass_angstrom(), torch.zeros(3, dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_pose_error_modulo_symmetry():
    """Poses off by per-particle group elements and one global rotation are exact modulo D7."""
    gen = torch.Generator().manual_seed(1)
    n = 300
    gt = random_rotations(n, generator=gen).double()
    G = point_group_rotations("D7")
    which = torch.randint(0, G.shape[0], (n,), generator=gen)
    A = random_rotations(1, generator=gen).double()[0]
    pred = gt @ G[which] @ A
    plain = pose_error(pred, gt)
    assert np.median(plain.rotation_error_deg) > 20  # not explained by one global rotation
    sym = pose_error(pred, gt, symmetry="D7")
    assert np.max(sym.rotation_error_deg) < 1e-4
    assert np.max(sym.view_direction_error_deg) < 1e-4
    assert np.max(sym.in_plane_error_deg) < 1e-4
    assert not sym.flipped
    # per-particle perturbations of 2° about random axes show up as 2° errors (their
    # geodesic median alignment stays A up to the group, as the axes are isotropic)
    from cryospin.rotations import so3_exp

    axes = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    eps = axes / axes.norm(dim=-1, keepdim=True) * np.deg2rad(2.0)
    noisy = pose_error(pred @ so3_exp(eps), gt, symmetry="D7")
    np.testing.assert_allclose(np.median(noisy.rotation_error_deg), 2.0, atol=0.2)
