"""Shifts: integer shifts equal torch.roll, sign image(r) = P(r − t), adjoint, Fourier agreement."""

from __future__ import annotations

import pytest
import torch

from cryospin.forward.hartley import (
    fft2_centered,
    hartley2,
    hartley_from_fourier,
    ifft2_centered,
    ihartley2,
    negate_frequency,
)
from cryospin.forward.lattice import disc_frequencies, disc_indices, frequency_grid_2d
from cryospin.forward.shifts import phase_shift_fourier, shift_hartley, shift_hartley_grid

F64 = torch.float64
INTEGER_SHIFTS = [(1, 0), (-1, 0), (0, 2), (0, -3), (2, -1), (-2, 3)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("L", [7, 8])
@pytest.mark.parametrize("t", INTEGER_SHIFTS)
def test_integer_shift_equals_roll(L: int, t: tuple[int, int]) -> None:
    """image(r) = P(r − t): torch.roll by (ty, tx) along (rows, columns)."""
    x = torch.randn(2, L, L, dtype=F64, generator=_gen(L))
    expected = torch.roll(x, shifts=(t[1], t[0]), dims=(-2, -1))
    shift = torch.tensor(t, dtype=F64)
    got = ihartley2(shift_hartley_grid(hartley2(x), shift))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    got_f = ifft2_centered(phase_shift_fourier(fft2_centered(x), shift))
    torch.testing.assert_close(got_f.real, expected, rtol=0, atol=1e-12)
    assert got_f.imag.abs().max().item() < 1e-12


def test_subpixel_shift_moves_a_blob_by_plus_t() -> None:
    L, sigma = 32, 2.0
    r = frequency_grid_2d(L, dtype=F64)  # (x, y) of pixel [y, x]
    t = torch.tensor([1.3, -2.7], dtype=F64)
    blob = torch.exp(-((r - torch.tensor([0.5, 1.0], dtype=F64)) ** 2).sum(-1) / (2 * sigma**2))
    moved = torch.exp(-((r - torch.tensor([1.8, -1.7], dtype=F64)) ** 2).sum(-1) / (2 * sigma**2))
    got = ihartley2(shift_hartley_grid(hartley2(blob), t))
    torch.testing.assert_close(got, moved, rtol=0, atol=1e-6)


@pytest.mark.parametrize("L", [7, 9])
def test_hartley_shift_matches_fourier_phase_shift(L: int) -> None:
    x = torch.randn(3, L, L, dtype=F64, generator=_gen(1))
    t = torch.randn(3, 2, dtype=F64, generator=_gen(2)) * 2
    h = shift_hartley_grid(hartley2(x), t)
    torch.testing.assert_close(
        h, hartley_from_fourier(phase_shift_fourier(fft2_centered(x), t)), rtol=0, atol=1e-10
    )
    # inverse and composition
    torch.testing.assert_close(shift_hartley_grid(h, -t), hartley2(x), rtol=0, atol=1e-10)
    t2 = torch.randn(3, 2, dtype=F64, generator=_gen(3))
    torch.testing.assert_close(
        shift_hartley_grid(h, t2), shift_hartley_grid(hartley2(x), t + t2), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("L", [7, 8])
def test_shift_adjoint_on_disc(L: int) -> None:
    """<shift_t a, b> = <a, shift_{−t} b> on the disc (closed under k -> −k), non-integer t."""
    freqs = disc_frequencies(L, dtype=F64)
    idx = disc_indices(L)
    g = _gen(4)
    a_img, b_img = torch.randn(2, 5, L, L, dtype=F64, generator=g)
    t = torch.randn(5, 2, dtype=F64, generator=g) * 3

    def disc(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h.reshape(5, -1)[:, idx], negate_frequency(h, 2).reshape(5, -1)[:, idx]

    a, a_neg = disc(a_img)
    b, b_neg = disc(b_img)
    lhs = (shift_hartley(a, a_neg, t, freqs, L) * b).sum()
    rhs = (a * shift_hartley(b, b_neg, -t, freqs, L)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_shift_adjoint_full_odd_grid() -> None:
    L = 9
    g = _gen(5)
    a, b = torch.randn(2, 4, L, L, dtype=F64, generator=g)
    t = torch.randn(4, 2, dtype=F64, generator=g) * 3
    lhs = (shift_hartley_grid(a, t) * b).sum()
    rhs = (a * shift_hartley_grid(b, -t)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # Fourier: <shift_t A, B> = <A, shift_{-t} B> with the Hermitian inner product
    A, B = fft2_centered(a), fft2_centered(b)
    lhs_f = (phase_shift_fourier(A, t) * B.conj()).sum()
    rhs_f = (A * phase_shift_fourier(B, -t).conj()).sum()
    torch.testing.assert_close(lhs_f, rhs_f, rtol=1e-12, atol=1e-10)


def test_shift_gradcheck_and_dtype() -> None:
    L = 6
    h = torch.randn(2, L, L, dtype=F64, generator=_gen(6), requires_grad=True)
    t = torch.randn(2, 2, dtype=F64, generator=_gen(7), requires_grad=True)
    assert torch.autograd.gradcheck(shift_hartley_grid, (h, t))
    assert shift_hartley_grid(h.detach().float(), t.detach()).dtype == torch.float32
    with pytest.raises(ValueError, match="shift_px"):
        shift_hartley_grid(h, torch.zeros(2, 3, dtype=F64))
