"""render: gradcheck for volume, rotation and shift; consistency of its stages."""

from __future__ import annotations

import pytest
import torch

from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import fft2_centered, hartley3, ifft2_centered
from cryospin.forward.lattice import disc_frequencies, disc_indices, negation_permutation
from cryospin.forward.model import render, render_real
from cryospin.forward.shifts import shift_hartley_grid
from cryospin.rotations import random_rotations, so3_exp

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ctf(n: int, L: int) -> torch.Tensor:
    p = CTFParams(
        defocus_u_angstrom=torch.tensor([9000.0, 14000.0][:n], dtype=F64),
        defocus_v_angstrom=torch.tensor([8000.0, 12500.0][:n], dtype=F64),
        defocus_angle_deg=torch.tensor([20.0, -65.0][:n], dtype=F64),
        voltage_kv=torch.full((n,), 300.0, dtype=F64),
        cs_mm=torch.full((n,), 2.7, dtype=F64),
        amplitude_contrast=torch.full((n,), 0.1, dtype=F64),
        phase_shift_deg=torch.zeros(n, dtype=F64),
        bfactor_a2=torch.full((n,), 30.0, dtype=F64),
    )
    return compute_ctf(p, L, 4.0)  # (n, L, L)


def test_gradcheck_render_volume_rotation_shift() -> None:
    L = 8
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(0), requires_grad=True)
    R0 = random_rotations(2, generator=_gen(1), dtype=F64)
    omega = (0.1 * torch.randn(2, 3, dtype=F64, generator=_gen(2))).requires_grad_()
    shift = torch.randn(2, 2, dtype=F64, generator=_gen(3)).requires_grad_()
    ctf = _ctf(2, L)

    def f(v: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return render(v, so3_exp(w) @ R0, t, ctf)  # rotations stay on SO(3)

    assert torch.autograd.gradcheck(f, (vol, omega, shift))


def test_gradcheck_render_on_disc() -> None:
    L = 6
    freqs = disc_frequencies(L, dtype=F64)
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(4), requires_grad=True)
    R0 = random_rotations(2, generator=_gen(5), dtype=F64)
    omega = torch.zeros(2, 3, dtype=F64, requires_grad=True)  # gradient at ω = 0 too
    shift = torch.randn(2, 2, dtype=F64, generator=_gen(6)).requires_grad_()
    ctf = _ctf(2, L).reshape(2, -1)[:, disc_indices(L)]

    def f(v: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return render(v, so3_exp(w) @ R0, t, ctf, frequencies=freqs)

    assert torch.autograd.gradcheck(f, (vol, omega, shift))


@pytest.mark.parametrize("L", [7, 8])
def test_render_on_disc_equals_full_grid_on_disc(L: int) -> None:
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(7))
    R = random_rotations(6, generator=_gen(8), dtype=F64).reshape(3, 2, 3, 3)
    shift = torch.randn(3, 2, 2, dtype=F64, generator=_gen(9)) * 2
    ctf = _ctf(2, L)  # broadcast over the leading 3
    idx = disc_indices(L)
    freqs = disc_frequencies(L, dtype=F64)
    full = render(vol, R, shift, ctf)
    assert full.shape == (3, 2, L, L)
    disc = render(vol, R, shift, ctf.reshape(2, -1)[:, idx], frequencies=freqs)
    torch.testing.assert_close(disc, full.reshape(3, 2, -1)[..., idx], rtol=0, atol=1e-12)
    perm = negation_permutation(freqs, L)
    again = render(
        vol, R, shift, ctf.reshape(2, -1)[:, idx], frequencies=freqs, negation_index=perm
    )
    torch.testing.assert_close(again, disc, rtol=0, atol=0)


@pytest.mark.parametrize("L", [7, 8])
def test_render_real_identity_pose_is_sum_along_z(L: int) -> None:
    """For R = I the discrete Fourier slice theorem is exact: image = Σ_z density."""
    density = torch.randn(L, L, L, dtype=F64, generator=_gen(10))
    image = render_real(hartley3(density), torch.eye(3, dtype=F64))
    torch.testing.assert_close(image, density.sum(0), rtol=0, atol=1e-11)
    # an integer shift rolls the projection
    shifted = render_real(hartley3(density), torch.eye(3, dtype=F64), torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(shifted, torch.roll(density.sum(0), (-1, 2), (0, 1)), atol=1e-11,
                               rtol=0)


def test_ctf_in_hartley_space_equals_fourier_product() -> None:
    """The CTF is even, so multiplying the Hartley slice equals multiplying F (odd L: exact)."""
    L = 9
    density = torch.randn(L, L, L, dtype=F64, generator=_gen(11))
    R = random_rotations(2, generator=_gen(12), dtype=F64)
    ctf = _ctf(2, L)
    t = torch.randn(2, 2, dtype=F64, generator=_gen(13))
    proj = render_real(hartley3(density), R, t)
    expected = ifft2_centered(fft2_centered(proj) * ctf).real
    torch.testing.assert_close(render_real(hartley3(density), R, t, ctf), expected, rtol=0,
                               atol=1e-10)
    # CTF and shift commute (CTF even)
    vol_h = hartley3(density)
    torch.testing.assert_close(
        render(vol_h, R, t, ctf), ctf * shift_hartley_grid(render(vol_h, R), t), rtol=0, atol=1e-10
    )


def test_render_follows_volume_dtype() -> None:
    L = 6
    vol = torch.randn(L, L, L, generator=_gen(14))
    R = random_rotations(3, generator=_gen(15))
    out = render(vol, R, torch.zeros(3, 2))
    assert out.dtype == torch.float32 and out.shape == (3, L, L)
