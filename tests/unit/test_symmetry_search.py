"""Point-group detection (cryospin.symmetry_search): float64 properties of the pure
functions, and the right group ranked first on synthetic blob maps of known symmetry, turned
by a random rotation and shifted by a few voxels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from cryospin.forward.rigid import transform_map
from cryospin.rotations import random_rotations
from cryospin.symmetry import point_group_rotations
from cryospin.symmetry_search import (
    GroupFit,
    axis_rotation,
    cyclic_power_scores,
    detect_symmetry,
    group_score,
    hemisphere_directions,
    map_in_group_frame,
    place_group,
    poses_in_group_frame,
    prepare_search_map,
    rank_groups,
    symmetry_correlations,
)


def blob_centres(symbol: str, *, n_blobs: int = 3, box_px: int = 32, seed: int = 0) -> Tensor:
    """Blob centres `(G · n_blobs (+1), 3)` with exactly the group ``symbol`` (its frame)."""
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(n_blobs, 3, generator=g, dtype=torch.float64) - 0.5) * 0.5 * box_px
    centres[:, 2] *= 0.6
    group = point_group_rotations(symbol)
    out = torch.einsum("gij,bj->gbi", group, centres).reshape(-1, 3)
    if symbol.startswith("C") and symbol != "C1":  # a cap on the axis: Cn, not Dn
        out = torch.cat([out, torch.tensor([[0.0, 0.0, 0.25 * box_px]], dtype=out.dtype)])
    return out


def blob_map(centres: Tensor, box_px: int, sigma_px: float = 1.6) -> Tensor:
    """Sum of Gaussians at ``centres`` (xyz px from ``L//2``), `(L, L, L)` float64."""
    c = torch.arange(box_px, dtype=torch.float64) - box_px // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], -1)
    d2 = ((r[..., None, :] - centres) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * sigma_px**2)).sum(-1)


def placed(symbol: str, *, box_px: int = 32, seed: int = 0,
           n_blobs: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """A symmetric blob map turned by a random rotation Q and shifted by t: the map (float32)
    with its centres, Q and t."""
    g = torch.Generator().manual_seed(100 + seed)
    Q = random_rotations(1, generator=g)[0]
    t = torch.tensor([2.0, -1.0, 1.5], dtype=torch.float64)
    centres = blob_centres(symbol, box_px=box_px, seed=seed, n_blobs=n_blobs) @ Q.T + t
    return blob_map(centres, box_px).float(), Q, t


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_axis_rotation_n_times_is_identity(n: int) -> None:
    u = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    R = axis_rotation(u, 2 * math.pi / n)
    assert torch.allclose(torch.linalg.matrix_power(R, n), torch.eye(3, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(R @ (u / u.norm()), u / u.norm(), atol=1e-12)


def test_map_rotated_n_times_returns_the_map() -> None:
    """Resampling a smooth map n times by 2π/n about an axis returns it (float64)."""
    v = blob_map(torch.tensor([[3.0, 1.0, -2.0], [-2.0, 2.5, 1.0]], dtype=torch.float64), 24, 2.0)
    R = axis_rotation(torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64), 2 * math.pi / 5)
    w = v
    for _ in range(5):
        w = transform_map(w, R)
    assert float(torch.corrcoef(torch.stack([v.flatten(), w.flatten()]))[0, 1]) > 0.99


def test_hemisphere_directions_unit_and_upper() -> None:
    d = hemisphere_directions(500)
    assert torch.allclose(d.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    assert bool((d[:, 2] >= 0).all())


def test_symmetric_map_correlates_with_its_rotated_copies() -> None:
    """Conventional-frame C5 map: every element scores ≈ 1, a wrong rotation does not."""
    v = blob_map(blob_centres("C5", box_px=24), 24)
    search = prepare_search_map(v, 24)
    group = point_group_rotations("C5")
    # on the axis, to the grid's sampling of a five-fold (not a symmetry of the voxels)
    assert float(search.centre_px[:2].abs().max()) < 0.05
    # not 1: whitening lifts the aliasing of the sampled Gaussians near Nyquist
    assert float(symmetry_correlations(search, group[1:]).min()) > 0.95
    assert group_score(search, point_group_rotations("C1")) == 1.0
    wrong = axis_rotation(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), math.pi / 2)
    assert float(symmetry_correlations(search, wrong[None])[0]) < 0.5


def test_cyclic_power_scores_peak_on_the_axis() -> None:
    v = blob_map(blob_centres("C4", box_px=24), 24)
    search = prepare_search_map(v, 24)
    dirs = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64)
    S = cyclic_power_scores(search, dirs, [2, 3, 4])  # (3, 3)
    assert float(S[0, 0]) > 0.99 and float(S[0, 2]) > 0.99  # z: two- and four-fold
    assert float(S[0, 1]) < 0.5  # not three-fold
    assert float(S[1:, 2].max()) < 0.7


def test_rank_groups_prefers_the_largest_accepted_group() -> None:
    eye = torch.eye(3, dtype=torch.float64)
    fits = [GroupFit("C1", 1, 1.0, eye), GroupFit("C7", 7, 0.95, eye),
            GroupFit("D7", 14, 0.93, eye), GroupFit("C2", 2, 0.96, eye),
            GroupFit("D14", 28, 0.4, eye), GroupFit("C3", 3, 0.2, eye)]
    ranked, gap = rank_groups(fits, 0.7)
    assert [f.group for f in ranked] == ["D7", "C7", "C2", "C1", "D14", "C3"]
    assert gap == pytest.approx(0.93 - 0.4)


def test_poses_in_group_frame_give_the_same_images() -> None:
    """Analytic Gaussian blobs: the image of blob p under (R, t) is at (R p)_xy + t; the
    aligned map W(r) = V(M r + c) has its blobs at Mᵀ (p − c); with (R M, t + (R c)_xy) its
    images are at the same places (float64)."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(5, 3, generator=g, dtype=torch.float64) * 4
    M = random_rotations(1, generator=g)[0]
    c = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    R = random_rotations(7, generator=g)
    t = torch.randn(7, 2, generator=g, dtype=torch.float64)
    R2, t2 = poses_in_group_frame(R, t, M, c)
    q = (p - c) @ M  # rows: Mᵀ (p − c)
    image_v = (p @ R.transpose(-1, -2))[..., :2] + t[:, None]  # (7, 5, 2)
    image_w = (q @ R2.transpose(-1, -2))[..., :2] + t2[:, None]
    assert torch.allclose(image_v, image_w, atol=1e-12)


def _project(volume: Tensor, R: Tensor, shift_px: Tensor) -> Tensor:
    """``image(r) = P(r − t)``, ``P(x, y) = Σ_z V(Rᵀ r)``: real-space projection (trilinear)
    and a Fourier phase shift, `(L, L)`."""
    P = transform_map(volume, R).sum(0)  # (L, L) [y, x]
    L = P.shape[-1]
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=P.dtype)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    phase = torch.exp(-2j * math.pi * (kx * shift_px[0] + ky * shift_px[1]) / L)
    X = torch.fft.fft2(torch.fft.ifftshift(P))
    return torch.fft.fftshift(torch.fft.ifft2(X * phase)).real


def test_aligned_map_with_converted_poses_gives_the_same_images() -> None:
    """Projecting W = V(M r + c) (resampled) with (R M, t + (R c)_xy) gives the images of V
    with (R, t), float64, 32 px."""
    g = torch.Generator().manual_seed(5)
    v = blob_map(torch.randn(5, 3, generator=g, dtype=torch.float64) * 3, 32, 2.0)
    M = random_rotations(1, generator=g)[0]
    c = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
    w = map_in_group_frame(v, M, c)
    R = random_rotations(3, generator=g)
    t = torch.randn(3, 2, generator=g, dtype=torch.float64)
    R2, t2 = poses_in_group_frame(R, t, M, c)
    for i in range(3):
        a, b = _project(v, R[i], t[i]), _project(w, R2[i], t2[i])
        assert float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) > 0.999
        assert float((a - b).abs().max()) < 0.03 * float(a.max())


def test_map_in_group_frame_matches_the_analytic_map() -> None:
    """W(r) = V(M r + c) resampled equals the blobs placed at Mᵀ (p − c) (float64)."""
    g = torch.Generator().manual_seed(4)
    p = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    M = random_rotations(1, generator=g)[0]
    c = torch.tensor([1.0, 0.5, -1.5], dtype=torch.float64)
    w = map_in_group_frame(blob_map(p, 24, 2.0), M, c)
    expected = blob_map((p - c) @ M, 24, 2.0)
    # trilinear resampling of the 2× padded map: a few per cent at the peaks of 2 px blobs
    assert float((w - expected).abs().max()) < 0.04 * float(expected.max())
    assert float(torch.corrcoef(torch.stack([w.flatten(), expected.flatten()]))[0, 1]) > 0.999


# ----------------------------------------------------------------------------- detection


def _symmetrised(volume: Tensor, symbol: str) -> Tensor:
    group = point_group_rotations(symbol)
    return transform_map(volume.double(), group).mean(0)


@pytest.mark.parametrize(("symbol", "box_px"), [
    ("C1", 24), ("C3", 24), ("C7", 32), ("D7", 32), ("O", 32),
    pytest.param("T", 32, marks=pytest.mark.slow), pytest.param("I", 32, marks=pytest.mark.slow),
])
def test_detects_the_group_and_aligns_the_map(symbol: str, box_px: int) -> None:
    # three blobs lie in a plane: near a two-fold; an asymmetric object needs more
    # (one blob per asymmetric unit of I: 60 blobs fill a 32 px box)
    v, _, _ = placed(symbol, box_px=box_px, n_blobs={"C1": 8, "I": 1}.get(symbol, 3))
    result = detect_symmetry(v, max_order=8, directions=600)
    ranking = [(f.group, round(f.score, 3)) for f in result.fits]
    assert result.chosen.group == {"I": "I2"}.get(symbol, symbol), ranking
    assert result.gap > 0.2
    aligned = map_in_group_frame(v.double(), result.chosen.frame, result.centre_px)
    sym = _symmetrised(aligned, result.chosen.group)
    r = float(torch.corrcoef(torch.stack([aligned.flatten(), sym.flatten()]))[0, 1])
    assert r >= 0.98


@pytest.mark.parametrize("symbol", ["I1", "I3", "I4"])
def test_places_every_icosahedral_setting(symbol: str) -> None:
    """``place_group`` with RELION's other icosahedral settings: the map of an I1/I3/I4
    object, turned and shifted, aligned into that setting's own frame is symmetric under it."""
    v, _, _ = placed(symbol, box_px=32, n_blobs=1)
    fit = place_group(v, symbol, directions=600)
    assert fit.chosen.group == symbol and fit.gap > 0.2
    aligned = map_in_group_frame(v.double(), fit.chosen.frame, fit.centre_px)
    sym = _symmetrised(aligned, symbol)
    assert float(torch.corrcoef(torch.stack([aligned.flatten(), sym.flatten()]))[0, 1]) >= 0.98
