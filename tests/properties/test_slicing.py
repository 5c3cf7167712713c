"""Central slices: Fourier slice theorem against an independent projection, and the adjoint."""

from __future__ import annotations

import math

import pytest
import torch

from cryospin.forward import slicing
from cryospin.forward.hartley import hartley2, hartley3, ihartley2
from cryospin.forward.lattice import (
    disc_frequencies,
    disc_mask,
    frequency_grid_2d,
    frequency_grid_3d,
)
from cryospin.forward.slicing import (
    _extract_central_slices_gather,
    _insert_by_index_add,
    _insert_by_kernel,
    extract_central_slices,
    insert_central_slices,
)
from cryospin.rotations import quaternion_to_matrix, random_rotations, so3_exp

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four anisotropic, offset 3D Gaussians (amplitudes of both signs): a volume with no symmetry.

    Sizes are in pixels: centres within 2.5 px of the origin, standard deviations 1.2-2 px along
    random axes.
    """
    g = _gen(seed)
    mus = (torch.rand(4, 3, generator=g, dtype=F64) * 2 - 1) * 2.5
    sig = 1.2 + 0.8 * torch.rand(4, 3, generator=g, dtype=F64)
    Q = quaternion_to_matrix(torch.randn(4, 4, generator=g, dtype=F64))
    covs = Q @ torch.diag_embed(sig**2) @ Q.transpose(-1, -2)
    amps = torch.tensor([1.0, 0.7, -0.4, 0.5], dtype=F64)
    return amps, mus, covs


def _gaussian_volume(L: int, amps, mus, covs) -> torch.Tensor:
    """Sum of Gaussians a·exp(-½ (r-μ)ᵀ Σ⁻¹ (r-μ)) sampled at voxel coordinates r = index - L//2."""
    r = frequency_grid_3d(L, dtype=F64)  # (L, L, L, 3): (x, y, z) coordinates of [z, y, x]
    V = torch.zeros(L, L, L, dtype=F64)
    for a, m, C in zip(amps, mus, covs, strict=True):
        d = r - m
        V = V + a * torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, torch.linalg.inv(C), d))
    return V


def _analytic_projection(L: int, R: torch.Tensor, amps, mus, covs) -> torch.Tensor:
    """P(x, y) = ∫ V(Rᵀ (x, y, z)) dz in closed form.

    With u = Rᵀ p, the Gaussian (μ, Σ) in u is the Gaussian (Rμ, RΣRᵀ) in p; integrating over z
    leaves the 2D Gaussian of the (x, y) marginal, scaled by (2π)^{3/2}|Σ|^{1/2} / (2π |S|^{1/2}).
    """
    p = frequency_grid_2d(L, dtype=F64)  # (L, L, 2): (x, y) of pixel [y, x]
    P = torch.zeros(L, L, dtype=F64)
    for a, m, C in zip(amps, mus, covs, strict=True):
        m2 = (R @ m)[:2]
        S = (R @ C @ R.T)[:2, :2]
        scale = a * (2 * math.pi) ** 1.5 * torch.linalg.det(C).sqrt()
        scale = scale / (2 * math.pi * torch.linalg.det(S).sqrt())
        d = p - m2
        P = P + scale * torch.exp(
            -0.5 * torch.einsum("...i,ij,...j->...", d, torch.linalg.inv(S), d)
        )
    return P


def _fst_errors(L: int, rotations: torch.Tensor, radius: float) -> list[float]:
    amps, mus, covs = _blobs()
    slices = extract_central_slices(hartley3(_gaussian_volume(L, amps, mus, covs)), rotations)
    mask = disc_mask(L, radius)
    errs = []
    for R, s in zip(rotations, slices, strict=True):
        ref = hartley2(_analytic_projection(L, R, amps, mus, covs))
        errs.append(((s - ref)[mask].norm() / ref[mask].norm()).item())
    return errs


def _poses() -> torch.Tensor:
    """Three generic poses: angles 37°, 113°, 161° about oblique axes (no 90° symmetry)."""
    axes = torch.nn.functional.normalize(
        torch.tensor([[0.3, -0.8, 0.5], [0.9, 0.2, -0.4], [-0.1, 0.6, 0.8]], dtype=F64), dim=-1
    )
    angles = torch.deg2rad(torch.tensor([37.0, 113.0, 161.0], dtype=F64))
    return so3_exp(axes * angles[:, None])


def test_fourier_slice_theorem_vs_analytic_projection() -> None:
    """hartley2(P_R) == central slice of hartley3(V) at R, for P_R(x,y) = ∫ V(Rᵀ(x,y,z)) dz."""
    L = 96  # the object spans ~10 px: 8x+ oversampling keeps trilinear interpolation error small
    rotations = _poses()
    errs = _fst_errors(L, rotations, radius=L // 4)
    assert max(errs) < 1e-2, errs
    # same in real space on the full grid
    amps, mus, covs = _blobs()
    vol_h = hartley3(_gaussian_volume(L, amps, mus, covs))
    image = ihartley2(extract_central_slices(vol_h, rotations[0]))
    ref = _analytic_projection(L, rotations[0], amps, mus, covs)
    assert ((image - ref).norm() / ref.norm()).item() < 1e-2
    # the test discriminates the convention: Rᵀ instead of R is far off
    wrong = extract_central_slices(vol_h, rotations[0].T)
    mask = disc_mask(L, L // 4)
    ref_h = hartley2(ref)
    assert ((wrong - ref_h)[mask].norm() / ref_h[mask].norm()).item() > 0.2


def test_fourier_slice_error_is_trilinear_interpolation() -> None:
    """The residual is interpolation error: it falls as (grid spacing)², i.e. 4x per 2x padding."""
    rotations = _poses()[:1]
    e48 = _fst_errors(48, rotations, radius=12)[0]
    e96 = _fst_errors(96, rotations, radius=24)[0]
    assert 3.3 < e48 / e96 < 4.7, (e48, e96)


@pytest.mark.parametrize("L", [7, 8])
def test_identity_and_quarter_turn_are_exact(L: int) -> None:
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(L))
    eye = torch.eye(3, dtype=F64)
    torch.testing.assert_close(extract_central_slices(vol, eye), vol[L // 2], rtol=0, atol=1e-12)
    # quarter turn about x: rows (1,0,0), (0,0,-1), (0,1,0); k @ R = (kx, 0, -ky)
    R = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=F64)
    out = extract_central_slices(vol, R)
    c = L // 2
    expected = torch.zeros(L, L, dtype=F64)
    for iy in range(L):
        iz = c - (iy - c)  # z index of -ky
        if 0 <= iz < L:
            expected[iy] = vol[iz, c, :]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("L", [7, 8])
def test_grid_sample_matches_explicit_trilinear(L: int) -> None:
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(2))
    R = random_rotations(6, generator=_gen(3), dtype=F64).reshape(2, 3, 3, 3)
    a = extract_central_slices(vol, R)
    assert a.shape == (2, 3, L, L)
    torch.testing.assert_close(a, _extract_central_slices_gather(vol, R), rtol=0, atol=1e-12)
    freqs = disc_frequencies(L, dtype=F64) * 1.3  # off-grid points, some outside the box
    b = extract_central_slices(vol, R, frequencies=freqs)
    assert b.shape == (2, 3, freqs.shape[0])
    torch.testing.assert_close(
        b, _extract_central_slices_gather(vol, R, frequencies=freqs), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("L", [7, 8])
@pytest.mark.parametrize("use_freqs", [False, True])
def test_insert_is_adjoint_of_extract(L: int, use_freqs: bool) -> None:
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(4))
    R = random_rotations(10, generator=_gen(5), dtype=F64).reshape(5, 2, 3, 3)
    freqs = disc_frequencies(L, dtype=F64) * 1.2 if use_freqs else None
    shape = (5, 2, freqs.shape[0]) if use_freqs else (5, 2, L, L)
    S = torch.randn(shape, dtype=F64, generator=_gen(6))
    lhs = (extract_central_slices(vol, R, frequencies=freqs) * S).sum()
    back = insert_central_slices(S, R, L, frequencies=freqs)
    assert back.shape == (L, L, L) and back.dtype == F64
    rhs = (vol * back).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_insert_chunking_and_broadcasting(monkeypatch: pytest.MonkeyPatch) -> None:
    L = 8
    R = random_rotations(7, generator=_gen(7), dtype=F64)
    S = torch.randn(7, L, L, dtype=F64, generator=_gen(8))
    full = insert_central_slices(S, R, L)
    monkeypatch.setattr(slicing, "_INSERT_CHUNK_SAMPLES", 100)  # one pose per chunk
    torch.testing.assert_close(insert_central_slices(S, R, L), full, rtol=0, atol=1e-12)
    # one slice broadcast over poses == inserting copies of it
    one = S[0]
    torch.testing.assert_close(
        insert_central_slices(one, R, L), insert_central_slices(one.expand(7, L, L), R, L)
    )
    # weights: inserting ones at the identity puts weight 1 on the central plane
    w = insert_central_slices(torch.ones(L, L, dtype=F64), torch.eye(3, dtype=F64), L)
    torch.testing.assert_close(w[L // 2], torch.ones(L, L, dtype=F64))
    assert w.sum().item() == pytest.approx(L * L)


def test_dtype_and_gradients() -> None:
    L = 6
    vol = torch.randn(L, L, L, generator=_gen(9))
    R = random_rotations(2, generator=_gen(10))  # float64 rotations, float32 volume
    out = extract_central_slices(vol, R)
    assert out.dtype == torch.float32
    vol64 = vol.double().requires_grad_()
    R64 = R.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, r: extract_central_slices(v, r), (vol64, R64))
    freqs = disc_frequencies(L, dtype=F64)
    assert torch.autograd.gradcheck(
        lambda v, r: extract_central_slices(v, r, frequencies=freqs), (vol64, R64)
    )


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="volume"):
        extract_central_slices(torch.zeros(4, 4, 5), torch.eye(3))
    with pytest.raises(ValueError, match="rotations"):
        extract_central_slices(torch.zeros(4, 4, 4), torch.eye(2))
    with pytest.raises(ValueError, match="frequencies"):
        extract_central_slices(torch.zeros(4, 4, 4), torch.eye(3), frequencies=torch.zeros(3))
    with pytest.raises(ValueError, match="slices"):
        insert_central_slices(torch.zeros(5, 5), torch.eye(3), 4)


@pytest.mark.parametrize("L", [7, 8])
@pytest.mark.parametrize("use_freqs", [False, True])
def test_kernel_and_explicit_scatter_insert_the_same(L: int, use_freqs: bool) -> None:
    """The two insertions (ATen's grid_sample-backward kernel; the trilinear ``index_add_``
    with channels sharing a stencil) agree in float64, on the grid and off it (points outside
    the box included)."""
    R = random_rotations(9, generator=_gen(11), dtype=F64)
    freqs = (disc_frequencies(L, dtype=F64) * 1.3 if use_freqs
             else frequency_grid_2d(L, dtype=F64).reshape(L * L, 2))
    values = torch.randn(2, 9, freqs.shape[0], dtype=F64, generator=_gen(12))
    kernel = _insert_by_kernel(values, R, freqs, L)
    scatter = _insert_by_index_add(values, R, freqs, L)
    assert kernel.shape == scatter.shape == (2, L, L, L)
    torch.testing.assert_close(scatter, kernel, rtol=0, atol=1e-12)
    for c in range(2):  # one channel at a time == the channels together
        torch.testing.assert_close(_insert_by_index_add(values[c:c + 1], R, freqs, L)[0],
                                   scatter[c], rtol=0, atol=1e-12)


@pytest.mark.parametrize("L", [7, 8])
def test_insert_channels_and_dtypes(L: int) -> None:
    """``channels=True`` equals inserting each channel alone; the public function (batch dims
    broadcast, float64: the scatter on the CPU) equals the kernel on the flattened poses;
    float32 (the kernel) agrees with float64 to float32 rounding."""
    R = random_rotations(9, generator=_gen(11), dtype=F64).reshape(3, 3, 3, 3)
    S = torch.randn(2, 3, 3, L, L, dtype=F64, generator=_gen(12))
    fused = insert_central_slices(S, R, L, channels=True)
    assert fused.shape == (2, L, L, L)
    grid = frequency_grid_2d(L, dtype=F64).reshape(L * L, 2)
    kernel = _insert_by_kernel(S.reshape(2, 9, L * L), R.reshape(9, 3, 3), grid, L)
    torch.testing.assert_close(fused, kernel, rtol=0, atol=1e-12)
    for c in range(2):
        torch.testing.assert_close(fused[c], insert_central_slices(S[c], R, L), rtol=0, atol=0)
    single = insert_central_slices(S.float(), R.float(), L, channels=True)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), fused, rtol=0, atol=1e-4 * float(fused.abs().max()))


def test_explicit_scatter_is_differentiable() -> None:
    """Its gradient with respect to the values is the extraction (the adjoint's adjoint)."""
    L = 6
    R = random_rotations(3, generator=_gen(14), dtype=F64)
    freqs = frequency_grid_2d(L, dtype=F64).reshape(L * L, 2)
    values = torch.randn(1, 3, L * L, dtype=F64, generator=_gen(15), requires_grad=True)
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(16))
    (_insert_by_index_add(values, R, freqs, L)[0] * vol).sum().backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad[0], extract_central_slices(vol, R).reshape(3, L * L),
                               rtol=0, atol=1e-12)
