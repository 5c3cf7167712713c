"""CTF: closed form at hand-computed points, symmetry, astigmatism direction, envelope, sign."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cryospin.forward.ctf import CTFParams, compute_ctf, ctf_at, electron_wavelength_angstrom
from cryospin.forward.hartley import negate_frequency
from cryospin.forward.lattice import (
    disc_frequencies,
    disc_indices,
    frequency_grid_2d,
    negation_permutation,
)

F64 = torch.float64


def _params(n: int = 1, dtype: torch.dtype = F64, **overrides: float) -> CTFParams:
    values = dict(
        defocus_u_angstrom=15000.0,
        defocus_v_angstrom=12000.0,
        defocus_angle_deg=30.0,
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.1,
        phase_shift_deg=0.0,
        bfactor_a2=0.0,
    )
    values.update(overrides)
    return CTFParams(**{k: torch.full((n,), v, dtype=dtype) for k, v in values.items()})


def test_wavelength() -> None:
    # 12.2643247 / sqrt(300000 * (1 + 0.978466e-6 * 300000)) = 12.2643247 / sqrt(388061.94)
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.01968761530923358, rel=1e-12)
    assert electron_wavelength_angstrom(200.0) == pytest.approx(0.025079493567048063, rel=1e-12)
    t = electron_wavelength_angstrom(torch.tensor([300.0], dtype=F64))
    assert t.dtype == F64 and t.item() == pytest.approx(0.01968761530923358, rel=1e-12)


def test_closed_form_at_hand_computed_points() -> None:
    """CTF = w cos γ − √(1−w²) sin γ, γ = 2π(−½ df λ s² + ¼ Cs λ³ s⁴) − φ (explicit numbers)."""
    lam = 0.01968761530923358  # 300 kV
    cs = 2.7e7  # 2.7 mm in Å
    w = 0.1
    # point 1: s = (0.1, 0) 1/Å, α = 0, df = 13500 + 1500 cos(2(0 − 30°)) = 14250 Å
    g1 = 2 * math.pi * (-0.5 * 14250 * lam * 0.01 + 0.25 * cs * lam**3 * 1e-4)
    c1 = w * math.cos(g1) - math.sqrt(1 - w * w) * math.sin(g1)
    # point 2: s = (0, -0.05), α = −90°, df = 13500 + 1500 cos(−240°) = 12750 Å
    g2 = 2 * math.pi * (-0.5 * 12750 * lam * 0.0025 + 0.25 * cs * lam**3 * 0.0025**2)
    c2 = w * math.cos(g2) - math.sqrt(1 - w * w) * math.sin(g2)
    # point 3: s = (0.03, 0.04), |s|² = 0.0025, α = atan2(4, 3), df = 13500 + 1500 cos(2(α − 30°))
    a3 = math.atan2(0.04, 0.03)
    df3 = 13500 + 1500 * math.cos(2 * (a3 - math.radians(30)))
    g3 = 2 * math.pi * (-0.5 * df3 * lam * 0.0025 + 0.25 * cs * lam**3 * 0.0025**2)
    c3 = w * math.cos(g3) - math.sqrt(1 - w * w) * math.sin(g3)
    s = torch.tensor([[0.1, 0.0], [0.0, -0.05], [0.03, 0.04], [0.0, 0.0]], dtype=F64)
    got = ctf_at(s, _params())
    expected = torch.tensor([c1, c2, c3, w], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # phase shift of 90°: γ(0) = −π/2, CTF(0) = √(1 − w²)
    got0 = ctf_at(s[3:], _params(phase_shift_deg=90.0))
    assert got0.item() == pytest.approx(math.sqrt(1 - w * w), rel=1e-12)


def test_sign_is_relion_positive_at_dc_and_negative_of_cryodrgn() -> None:
    """CTF(0) = +w; cryoDRGN's √(1−w²) sin γ − w cos γ is its negative."""
    p = _params(amplitude_contrast=0.07)
    s = torch.tensor([[0.0, 0.0], [0.02, 0.01], [0.11, -0.07]], dtype=F64)
    ours = ctf_at(s, p)
    assert ours[0].item() == pytest.approx(0.07, rel=1e-12)
    sx, sy = s.unbind(-1)
    lam = electron_wavelength_angstrom(300.0)
    df = 13500 + 1500 * torch.cos(2 * (torch.atan2(sy, sx) - math.radians(30)))
    s2 = sx**2 + sy**2
    gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * 2.7e7 * lam**3 * s2**2)
    cryodrgn = math.sqrt(1 - 0.07**2) * torch.sin(gamma) - 0.07 * torch.cos(gamma)
    torch.testing.assert_close(ours, -cryodrgn, rtol=1e-12, atol=1e-12)


def test_even_in_k() -> None:
    s = torch.randn(50, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.1
    p = _params(bfactor_a2=40.0, phase_shift_deg=20.0)
    torch.testing.assert_close(ctf_at(s, p), ctf_at(-s, p), rtol=1e-12, atol=1e-12)
    # on the odd grid, and on the (symmetric) disc of an even grid
    grid = compute_ctf(p, 9, 1.7)[0]
    torch.testing.assert_close(grid, negate_frequency(grid, 2), rtol=1e-12, atol=1e-12)
    freqs = disc_frequencies(10, dtype=F64)
    disc = compute_ctf(p, 10, 1.7, frequencies=freqs)[0]
    torch.testing.assert_close(disc, disc[negation_permutation(freqs)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("angle_deg", [0.0, 30.0, 90.0, 135.0])
def test_astigmatism_direction(angle_deg: float) -> None:
    """Along the direction at defocus_angle from +x (towards +y) defocus is U; at +90° it is V."""
    p = _params(defocus_angle_deg=angle_deg)
    r = torch.linspace(0.0, 0.2, 41, dtype=F64)
    a = math.radians(angle_deg)
    along_u = torch.stack([r * math.cos(a), r * math.sin(a)], -1)
    along_v = torch.stack([-r * math.sin(a), r * math.cos(a)], -1)
    iso_u = _params(defocus_v_angstrom=15000.0)  # round CTF with defocus U
    iso_v = _params(defocus_u_angstrom=12000.0)  # round CTF with defocus V
    torch.testing.assert_close(ctf_at(along_u, p), ctf_at(along_u, iso_u), rtol=0, atol=1e-12)
    torch.testing.assert_close(ctf_at(along_v, p), ctf_at(along_v, iso_v), rtol=0, atol=1e-12)
    assert not torch.allclose(ctf_at(along_u, p), ctf_at(along_u, iso_v), atol=1e-3)


def test_astigmatism_on_the_pixel_grid() -> None:
    """defocus_angle 0: U along image columns (x, second index); 90: U along rows (y)."""
    L, px = 32, 1.5
    iso_u = compute_ctf(_params(defocus_v_angstrom=15000.0), L, px)[0]
    along_x = compute_ctf(_params(defocus_angle_deg=0.0), L, px)[0]
    along_y = compute_ctf(_params(defocus_angle_deg=90.0), L, px)[0]
    c = L // 2
    torch.testing.assert_close(along_x[c, :], iso_u[c, :], rtol=0, atol=1e-12)
    torch.testing.assert_close(along_y[:, c], iso_u[:, c], rtol=0, atol=1e-12)
    assert not torch.allclose(along_x[:, c], iso_u[:, c], atol=1e-3)


def test_bfactor_envelope() -> None:
    s = torch.tensor([[0.05, 0.0], [0.1, 0.1], [0.0, 0.2]], dtype=F64)
    base = ctf_at(s, _params())
    damped = ctf_at(s, _params(bfactor_a2=80.0))
    s2 = torch.tensor([0.0025, 0.02, 0.04], dtype=F64)
    torch.testing.assert_close(damped, base * torch.exp(-80.0 / 4 * s2), rtol=1e-12, atol=0)


def test_compute_ctf_grid_and_batch() -> None:
    L, px = 12, 2.0
    p = CTFParams.cat([_params(), _params(defocus_u_angstrom=20000.0, bfactor_a2=50.0)])
    grid = compute_ctf(p, L, px)
    assert grid.shape == (2, L, L) and grid.dtype == F64
    k = frequency_grid_2d(L, dtype=F64)
    for i in range(2):
        torch.testing.assert_close(grid[i], ctf_at(k / (L * px), p[i : i + 1]), rtol=0, atol=1e-14)
    assert grid[0, L // 2, L // 2].item() == pytest.approx(0.1)
    freqs = disc_frequencies(L, dtype=F64)
    disc = compute_ctf(p, L, px, frequencies=freqs)
    assert disc.shape == (2, freqs.shape[0])
    torch.testing.assert_close(disc, grid.reshape(2, -1)[:, disc_indices(L)])
    assert compute_ctf(_params(dtype=torch.float32), L, px).dtype == torch.float32


def test_ctf_is_self_adjoint() -> None:
    c = compute_ctf(_params(), 10, 1.0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 10, 10, dtype=F64, generator=g)
    assert (c * a * b).sum().item() == pytest.approx((a * (c * b)).sum().item(), rel=1e-13)


def test_gradient_wrt_defocus() -> None:
    p = _params(n=2)
    du = p.defocus_u_angstrom.clone().requires_grad_()

    def f(du: torch.Tensor) -> torch.Tensor:
        q = dataclasses.replace(p, defocus_u_angstrom=du)
        return compute_ctf(q, 8, 2.0, frequencies=disc_frequencies(8, dtype=F64))

    assert torch.autograd.gradcheck(f, (du,))
