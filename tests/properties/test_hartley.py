"""Centred FFT / Hartley transforms: round trips, relation to the FFT, negation, lattices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryospin.forward.hartley import (
    fft2_centered,
    fft3_centered,
    fourier_from_hartley,
    hartley2,
    hartley3,
    hartley_from_fourier,
    ifft2_centered,
    ifft3_centered,
    ihartley2,
    ihartley3,
    negate_frequency,
)
from cryospin.forward.lattice import (
    disc_frequencies,
    disc_indices,
    disc_mask,
    frequency_grid_2d,
    frequency_grid_3d,
    negation_permutation,
)

SIZES = [6, 7, 8, 9]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("L", SIZES)
def test_fft_round_trips(L: int) -> None:
    x2 = torch.randn(3, L, L, dtype=torch.float64, generator=_gen(L))
    x3 = torch.randn(2, L, L, L, dtype=torch.float64, generator=_gen(L + 1))
    torch.testing.assert_close(ifft2_centered(fft2_centered(x2)).real, x2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ifft3_centered(fft3_centered(x3)).real, x3, rtol=0, atol=1e-12)
    assert ifft2_centered(fft2_centered(x2)).is_complex()


@pytest.mark.parametrize("L", SIZES)
def test_centred_fft_matches_direct_dft(L: int) -> None:
    """F[k] = sum_r x[r] exp(-2 pi i k r / L) with r, k = index - L//2 (origin and DC at L//2)."""
    x = torch.randn(L, L, dtype=torch.float64, generator=_gen(3))
    c = np.arange(L) - L // 2
    E = np.exp(-2j * np.pi * np.outer(c, c) / L)  # (k, r)
    expected = E @ x.numpy() @ E.T  # rows: ky, columns: kx
    np.testing.assert_allclose(fft2_centered(x).numpy(), expected, atol=1e-10)
    # a delta at the centre voxel has a flat transform; DC equals the sum
    d = torch.zeros(L, L, dtype=torch.float64)
    d[L // 2, L // 2] = 1
    torch.testing.assert_close(hartley2(d), torch.ones_like(d))
    assert hartley2(x)[L // 2, L // 2].item() == pytest.approx(x.sum().item())


@pytest.mark.parametrize("L", SIZES)
def test_hartley_round_trip_2d_3d(L: int) -> None:
    x2 = torch.randn(4, L, L, dtype=torch.float64, generator=_gen(L))
    x3 = torch.randn(L, L, L, dtype=torch.float64, generator=_gen(L + 7))
    torch.testing.assert_close(ihartley2(hartley2(x2)), x2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ihartley3(hartley3(x3)), x3, rtol=0, atol=1e-12)
    # self-inverse up to 1/N
    torch.testing.assert_close(hartley2(hartley2(x2)) / L**2, x2, rtol=0, atol=1e-12)
    assert hartley2(x2).dtype == torch.float64
    assert hartley2(x2.float()).dtype == torch.float32


@pytest.mark.parametrize("L", SIZES)
def test_hartley_fourier_relation(L: int) -> None:
    x2 = torch.randn(2, L, L, dtype=torch.float64, generator=_gen(L))
    x3 = torch.randn(L, L, L, dtype=torch.float64, generator=_gen(L + 2))
    for x, ndim, fft, hart in ((x2, 2, fft2_centered, hartley2), (x3, 3, fft3_centered, hartley3)):
        F, H = fft(x), hart(x)
        torch.testing.assert_close(H, F.real - F.imag, rtol=0, atol=1e-12)
        torch.testing.assert_close(hartley_from_fourier(F), H, rtol=0, atol=1e-12)
        torch.testing.assert_close(fourier_from_hartley(H, ndim), F, rtol=0, atol=1e-10)


@pytest.mark.parametrize("L", SIZES)
def test_negate_frequency(L: int) -> None:
    """Index of -k is (L - i) mod L (even L) or L - 1 - i (odd L); F(-k) = conj F(k)."""
    x = torch.randn(L, L, dtype=torch.float64, generator=_gen(L))
    F = fft2_centered(x)
    torch.testing.assert_close(negate_frequency(F, 2), F.conj(), rtol=0, atol=1e-10)
    i = torch.arange(L)
    expected_idx = (L - i) % L if L % 2 == 0 else L - 1 - i
    a = torch.arange(L * L, dtype=torch.float64).reshape(L, L)
    torch.testing.assert_close(negate_frequency(a, 2), a[expected_idx][:, expected_idx])
    # involution, and on frequencies it negates k (modulo L at the even-L Nyquist)
    torch.testing.assert_close(negate_frequency(negate_frequency(a, 2), 2), a)
    k = frequency_grid_2d(L, dtype=torch.float64).permute(2, 0, 1)  # (2, L, L)
    kn = negate_frequency(k, 2)
    torch.testing.assert_close(torch.remainder(kn + k, L), torch.zeros_like(k))
    # 3D: only the last 3 axes, leading axes untouched
    v = torch.randn(2, L, L, L, dtype=torch.float64, generator=_gen(1))
    torch.testing.assert_close(
        negate_frequency(v, 3), v[:, expected_idx][:, :, expected_idx][:, :, :, expected_idx]
    )


@pytest.mark.parametrize("L", SIZES)
def test_lattices_and_disc(L: int) -> None:
    g2 = frequency_grid_2d(L, dtype=torch.float64)
    assert g2.shape == (L, L, 2)
    assert g2[0, 1].tolist() == [1 - L // 2, -(L // 2)]  # [y=0, x=1] -> (kx, ky)
    g3 = frequency_grid_3d(L)
    assert g3.shape == (L, L, L, 3) and g3.dtype == torch.float32
    assert g3[0, 1, 2].tolist() == [2 - L // 2, 1 - L // 2, -(L // 2)]
    mask = disc_mask(L)
    r = L // 2 - 1
    torch.testing.assert_close(mask, g2.norm(dim=-1) <= r)
    idx = disc_indices(L)
    freqs = disc_frequencies(L, dtype=torch.float64)
    assert idx.shape[0] == int(mask.sum()) == freqs.shape[0]
    torch.testing.assert_close(g2.reshape(-1, 2)[idx], freqs)
    perm = negation_permutation(freqs)
    torch.testing.assert_close(freqs[perm], -freqs)
    # periodic negation of the full grid agrees with negate_frequency
    full = g2.reshape(-1, 2)
    a = torch.randn(L, L, dtype=torch.float64, generator=_gen(5))
    perm_full = negation_permutation(full, L)
    torch.testing.assert_close(a.reshape(-1)[perm_full].reshape(L, L), negate_frequency(a, 2))


def test_negation_permutation_rejects_open_set() -> None:
    with pytest.raises(ValueError, match="closed under negation"):
        negation_permutation(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="integer"):
        negation_permutation(torch.tensor([[0.5, 0.0], [-0.5, 0.0]]))


def test_hartley_rejects_complex() -> None:
    with pytest.raises(ValueError, match="real"):
        hartley2(torch.zeros(4, 4, dtype=torch.complex128))
