"""Point groups, symmetric assemblies and pose errors modulo symmetry (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.evaluate.pose_error import pose_error
from cryospin.point_group import parse_point_group
from cryospin.rotations import random_rotations
from cryospin.simulate.density import AtomicModel, parse_selection, symmetric_assembly
from cryospin.symmetry import grid_cosets, insertions_per_image, point_group_rotations

GROUPS = [("C1", 1), ("c4", 4), ("C7", 7), ("D2", 4), ("D7", 14), ("T", 12), ("o", 24),
          ("I", 60), ("I1", 60), ("I2", 60), ("i3", 60), ("I4", 60)]


@pytest.mark.parametrize("symbol, order", GROUPS)
def test_point_group_is_a_group_of_rotations(symbol, order):
    G = point_group_rotations(symbol)
    assert parse_point_group(symbol).order == order
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


@pytest.mark.parametrize("bad", ["X3", "D1", "C0", "D", "7", "C-2", "I5", "T2", "O1", "IH"])
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


# ------------------------------------------------------------------ RELION's axes (T, O, I)


def _rotation_about(axis, fold: int) -> torch.Tensor:
    """The rotation by 2π/fold about ``axis`` (Rodrigues), float64."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    t = 2 * np.pi / fold
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def _is_axis(G: torch.Tensor, axis, fold: int, tol: float = 1e-5) -> bool:
    """Whether the rotation by 2π/fold about ``axis`` is an element of ``G``."""
    R = _rotation_about(axis, fold)
    return float((G - R).abs().amax(dim=(1, 2)).min()) < tol


def _axes(G: torch.Tensor, fold: int) -> torch.Tensor:
    """Unit axes `(k, 3)` of the rotations by 2π/fold in ``G``, each with its positive-z (else
    positive-y, else positive-x) sign, one per axis."""
    angle = torch.arccos(((G.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))
    out = []
    for g in G[(angle - 2 * np.pi / fold).abs() < 1e-6]:  # arccos near π: ~1e-8
        a = torch.stack([g[2, 1] - g[1, 2], g[0, 2] - g[2, 0], g[1, 0] - g[0, 1]])
        if fold == 2:  # sin π = 0: the axis is the eigenvector of eigenvalue 1
            w, v = torch.linalg.eigh((g + g.T) / 2)
            a = v[:, w.argmax()]
        a = a / a.norm()
        for c in (2, 1, 0):
            if abs(float(a[c])) > 1e-9:
                a = a * np.sign(float(a[c]))
                break
        if not any(float((a - b).norm()) < 1e-9 for b in out):
            out.append(a)
    return torch.stack(out)


#: the generating axes RELION lists for each group (src/symmetries.cpp, fill_symmetry_class),
#: with RELION's digits, and the axes its documentation (Reference/Conventions, "Symmetry")
#: states: O: four-folds on x, y, z; I1, I2: two-folds on x, y, z; I3: five-fold on z and a
#: two-fold on y; T: a three-fold on z
RELION_AXES = {
    "T": [(3, (0, 0, 1)), (2, (0.0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1)), (4, (1, 0, 0)), (4, (0, 1, 0))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)),
           (3, (0, 0.356822076, 0.934172364)), (2, (1, 0, 0)), (2, (0, 1, 0))],
    "I1": [(2, (1, 0, 0)), (5, (0.85065080702670, 0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0)), (2, (0, 1, 0)), (2, (0, 0, 1))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)), (2, (0, 1, 0))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)), (5, (0, 0, 1))],
}


@pytest.mark.parametrize("symbol", sorted(RELION_AXES))
def test_relion_axes(symbol):
    G = point_group_rotations(symbol)
    for fold, axis in RELION_AXES[symbol]:
        assert _is_axis(G, axis, fold), (symbol, fold, axis)


@pytest.mark.parametrize("symbol, counts", [
    ("T", {2: 3, 3: 4}), ("O", {2: 6 + 3, 3: 4, 4: 3}), ("I", {2: 15, 3: 10, 5: 6}),
    ("I1", {2: 15, 3: 10, 5: 6}), ("I3", {2: 15, 3: 10, 5: 6}), ("D7", {2: 7, 7: 1}),
])
def test_number_of_axes_of_each_fold(symbol, counts):
    """Axes about which G holds the rotation by 2π/fold (O: six two-folds, and the three
    four-folds hold a half turn too)."""
    G = point_group_rotations(symbol)
    for fold, k in counts.items():
        assert _axes(G, fold).shape[0] == k, (symbol, fold)


def test_default_icosahedral_setting_is_i2():
    torch.testing.assert_close(point_group_rotations("I"), point_group_rotations("I2"),
                               rtol=0, atol=0)
    assert parse_point_group("i").symbol == "I2"


@pytest.mark.parametrize("symbol, five_plane, three_plane", [("I1", 0, 1), ("I2", 1, 0)])
def test_icosahedral_222_settings_front_vertices(symbol, five_plane, three_plane):
    """RELION's documentation: with +z towards the viewer, the front-most five-folds of I1 lie
    in the yz plane and its front-most three-folds in the xz plane; I2 the other way round."""
    G = point_group_rotations(symbol)
    for fold, plane in ((5, five_plane), (3, three_plane)):
        axes = _axes(G, fold)
        front = axes[(axes[:, 2] - axes[:, 2].max()).abs() < 1e-9]
        assert front.shape[0] == 2
        assert float(front[:, plane].abs().max()) < 1e-12, (symbol, fold, front)  # x=0 or y=0


@pytest.mark.parametrize("symbol, sign", [("I3", -1), ("I4", 1)])
def test_icosahedral_52_settings(symbol, sign):
    """I3/I4: a five-fold on z; of the other five-folds, one of the front-most lies in the
    −xz (I3) or +xz (I4) half-plane; a two-fold on y."""
    G = point_group_rotations(symbol)
    axes = _axes(G, 5)
    assert any(float((a - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).norm()) < 1e-9
               for a in axes)
    others = axes[axes[:, 2] < 1 - 1e-9]
    front = others[(others[:, 2] - others[:, 2].max()).abs() < 1e-9]
    assert any(abs(float(a[1])) < 1e-12 and np.sign(float(a[0])) == sign for a in front)
    assert _is_axis(G, (0, 1, 0), 2, tol=1e-12)


def test_octahedral_group_maps_the_voxel_grid_to_itself():
    """O's rotations are signed permutation matrices: exactly 0 and ±1 (Cn and Dn keep the
    1e-16s of cos and sin at multiples of π/2, as before)."""
    G = point_group_rotations("O")
    assert bool(((G == 0) | (G.abs() == 1)).all())


def test_mirrored_groups():
    """D G D (D = diag(1, 1, −1)) is G for C, D, O, I1, I2; I3 <-> I4; T goes to another T."""
    D = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))

    def same(A, B):
        return float((A[:, None] - B[None]).abs().amax(dim=(2, 3)).min(1).values.max()) < 1e-12

    for symbol in ("C5", "D6", "O", "I1", "I2"):
        G = point_group_rotations(symbol)
        assert same(D @ G @ D, G), symbol
    assert same(D @ point_group_rotations("I3") @ D, point_group_rotations("I4"))
    T = point_group_rotations("T")
    assert not same(D @ T @ D, T)


@pytest.mark.parametrize("symbol", ["T", "O", "I", "I3", "C5"])
def test_pose_error_modulo_every_group_and_either_hand(symbol):
    """Poses off by per-particle group elements and a global rotation are exact modulo G, in
    the true hand and in the mirrored hand (whose map has the group D G D)."""
    from cryospin.evaluate.pose_error import flip_hand

    gen = torch.Generator().manual_seed(2)
    n = 200
    gt = random_rotations(n, generator=gen).double()
    G = point_group_rotations(symbol)
    which = torch.randint(0, G.shape[0], (n,), generator=gen)
    A = random_rotations(1, generator=gen).double()[0]
    for mirrored in (False, True):
        ref = flip_hand(gt) if mirrored else gt
        group = flip_hand(G) if mirrored else G
        res = pose_error(ref @ group[which] @ A, gt, symmetry=symbol)
        assert res.flipped == mirrored
        assert np.max(res.rotation_error_deg) < 1e-4, (symbol, mirrored)
        assert np.max(res.view_direction_error_deg) < 1e-4


def test_assembly_refuses_polyhedral_groups():
    unit = AtomicModel(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                       "x")
    with pytest.raises(InputError, match="Cn and Dn"):
        symmetric_assembly(unit, "O")


@pytest.mark.parametrize("symbol, n_cosets, n_grid", [
    ("C1", 1, 1), ("C4", 1, 4), ("C7", 7, 1), ("D2", 1, 4), ("D7", 7, 2), ("T", 12, 1),
    ("O", 1, 24), ("I", 5, 12), ("I3", 30, 2),
])
def test_grid_cosets_split_the_group(symbol, n_cosets, n_grid):
    """G = {h p}: P the signed permutations of G (a subgroup, exact 0/±1), each element of G
    once among the products h p."""
    G = point_group_rotations(symbol)
    H, P = grid_cosets(G)
    assert (H.shape[0], P.shape[0]) == (n_cosets, n_grid)
    assert insertions_per_image(symbol) == n_cosets  # a backprojection's insertions per image
    assert bool(((P == 0) | (P.abs() == 1)).all())
    torch.testing.assert_close(P[0], torch.eye(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(H[0], G[0], rtol=0, atol=0)
    prods = (H[:, None] @ P[None]).reshape(-1, 9)  # (|G|, 9)
    dist = (prods[:, None] - G.reshape(1, -1, 9)).abs().amax(-1)  # (|G|, |G|)
    assert bool(((dist < 1e-9).sum(0) == 1).all()) and bool(((dist < 1e-9).sum(1) == 1).all())
