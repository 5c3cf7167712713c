"""Tests of cryospin.volume: the mantissa·exp(exponent) Hartley volume and radial profiles."""

from __future__ import annotations

import pytest
import torch

from cryospin.forward.hartley import hartley3
from cryospin.forward.lattice import disc_frequencies
from cryospin.forward.slicing import extract_central_slices
from cryospin.forward.symmetrize import symmetrize_volume
from cryospin.rotations import random_rotations
from cryospin.symmetry import grid_cosets, point_group_rotations
from cryospin.volume import (
    HartleyVolume,
    radial_amplitude_from_images,
    radial_rms,
    radial_shells,
)

F64 = torch.float64


def _blob_map(L: int, seed: int = 0) -> torch.Tensor:
    """A non-symmetric real map: three Gaussian blobs plus a little noise, `(L, L, L)` float64."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.arange(L, dtype=F64) - L // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    out = torch.zeros(L, L, L, dtype=F64)
    for cx, cy, cz, s in [(2.0, 0.0, -1.0, 2.0), (-3.0, 2.0, 1.0, 1.5), (0.0, -3.0, 2.0, 1.0)]:
        out += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return out + 0.01 * torch.randn(L, L, L, generator=gen, dtype=F64)


def test_radial_shells_values() -> None:
    shells = radial_shells(8, 3)
    assert shells.shape == (8, 8, 8) and shells.dtype == torch.int64
    assert shells[4, 4, 4] == 0 and shells[4, 4, 5] == 1 and shells[4, 5, 5] == 1  # √2 -> 1
    assert shells[4, 5, 6] == 2  # √5 ≈ 2.24 -> 2
    assert shells.max() == 4 and shells[0, 0, 0] == 4  # corner clamped to L//2
    assert radial_shells(5, 2)[2, 2] == 0 and radial_shells(5, 2)[0, 0] == 2


def test_radial_rms_hand_computed() -> None:
    vol = torch.full((6, 6, 6), 3.0, dtype=F64)
    torch.testing.assert_close(radial_rms(vol, 3), torch.full((4,), 3.0, dtype=F64))
    img = torch.zeros(2, 5, 5, dtype=F64)
    img[0, 2, 2], img[1, 2, 2] = 1.0, 7.0  # DC shell only: rms = sqrt((1 + 49) / 2) = 5
    rms = radial_rms(img, 2)
    torch.testing.assert_close(rms, torch.tensor([5.0, 0.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="expected"):
        radial_rms(torch.zeros(4, 5), 2)


def test_radial_amplitude_from_images_subtracts_noise_and_floors() -> None:
    images = torch.full((3, 6, 6), 3.0, dtype=F64)
    torch.testing.assert_close(
        radial_amplitude_from_images(images, noise_variance=5.0), torch.full((4,), 2.0, dtype=F64)
    )
    images[:, 2:5, 2:5] = 10.0  # shells 0 and 1 at 10, others at 3
    amp = radial_amplitude_from_images(images, noise_variance=9.0, floor_fraction=0.1)
    assert amp[0] == pytest.approx(91**0.5)
    assert amp[3] == pytest.approx(9.1**0.5)  # 9 − 9 = 0 -> floored at 0.1 · 91
    with pytest.raises(ValueError, match="noise"):
        radial_amplitude_from_images(images, noise_variance=1e6)


def test_forward_is_mantissa_times_exp_exponent_and_default_init() -> None:
    gen = torch.Generator().manual_seed(0)
    vol = HartleyVolume(10, init_scale=0.5, generator=gen)
    assert vol.mantissa.shape == vol.exponent.shape == (10, 10, 10)
    assert torch.equal(vol.exponent, torch.zeros(10, 10, 10))
    assert vol.mantissa.std().item() == pytest.approx(0.5, rel=0.1)
    torch.testing.assert_close(vol(), vol.mantissa * vol.exponent.exp())
    again = HartleyVolume(10, init_scale=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.mantissa, vol.mantissa)
    assert {n for n, _ in vol.named_parameters()} == {"mantissa", "exponent"}


@pytest.mark.parametrize("L", [12, 13])
def test_from_real_space_is_exact_with_radial_exponent(L: int) -> None:
    real = _blob_map(L)
    vol = HartleyVolume.from_real_space(real)
    assert vol.mantissa.dtype == F64
    ht = hartley3(real)
    torch.testing.assert_close(vol(), ht, rtol=1e-12, atol=1e-12 * ht.abs().max().item())
    torch.testing.assert_close(vol.to_real_space(), real, rtol=0, atol=1e-12)
    shells = radial_shells(L, 3)
    for r in range(L // 2 + 1):
        e = vol.exponent.detach()[shells == r]
        assert torch.equal(e, e[:1].expand_as(e))  # one exponent per shell
    torch.testing.assert_close(radial_rms(vol.mantissa.detach(), 3), torch.ones(L // 2 + 1,
                                                                               dtype=F64))
    # the same decomposition through the constructor
    torch.testing.assert_close(HartleyVolume(L, init=ht)(), vol(), rtol=0, atol=0)


def test_from_real_space_of_zero_map_is_finite() -> None:
    vol = HartleyVolume.from_real_space(torch.zeros(6, 6, 6, dtype=F64))
    assert torch.isfinite(vol.exponent).all() and torch.equal(vol(), torch.zeros(6, 6, 6,
                                                                                  dtype=F64))


def test_ab_initio_matches_the_radial_amplitude() -> None:
    L = 24
    amplitude = torch.logspace(3, 0, L // 2 + 1, dtype=F64)
    vol = HartleyVolume.ab_initio(L, amplitude, torch.Generator().manual_seed(1))
    assert vol.mantissa.dtype == F64
    shells = radial_shells(L, 3)
    torch.testing.assert_close(vol.exponent.detach(), amplitude.log()[shells])
    rms = radial_rms(vol().detach(), 3)
    ratio = rms[4:] / amplitude[4:]  # shells with at least ~200 voxels
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    same = HartleyVolume.ab_initio(L, amplitude, torch.Generator().manual_seed(1))
    assert torch.equal(same.mantissa, vol.mantissa)
    small = HartleyVolume.ab_initio(L, amplitude, torch.Generator().manual_seed(1),
                                    mantissa_scale=0.1)
    torch.testing.assert_close(small.mantissa, 0.1 * vol.mantissa)


def test_ab_initio_short_profile_extends_last_value_and_rejects_bad_amplitudes() -> None:
    vol = HartleyVolume.ab_initio(8, torch.tensor([4.0, 2.0]))
    assert vol.exponent.dtype == torch.float32
    assert vol.exponent[4, 4, 4].item() == pytest.approx(torch.tensor(4.0).log().item())
    assert vol.exponent[0, 0, 0].item() == pytest.approx(torch.tensor(2.0).log().item())
    with pytest.raises(ValueError, match="positive"):
        HartleyVolume.ab_initio(8, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(R,\)"):
        HartleyVolume.ab_initio(8, torch.ones(2, 2))


def test_slices_equal_extract_central_slices_and_differentiate() -> None:
    L = 10
    vol = HartleyVolume.from_real_space(_blob_map(L))
    rots = random_rotations(6, generator=torch.Generator().manual_seed(2), dtype=F64)
    rots = rots.reshape(2, 3, 3, 3)
    full = vol.slices(rots)
    assert full.shape == (2, 3, L, L)
    torch.testing.assert_close(full, extract_central_slices(vol(), rots), rtol=0, atol=0)
    freqs = disc_frequencies(L, dtype=F64)
    disc = vol.slices(rots, freqs)
    assert disc.shape == (2, 3, freqs.shape[0])
    disc.square().sum().backward()
    assert vol.mantissa.grad is not None and vol.mantissa.grad.abs().sum() > 0
    assert vol.exponent.grad is not None and vol.exponent.grad.abs().sum() > 0


def test_constructor_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="init"):
        HartleyVolume(4, init=torch.zeros(4, 4, 5))
    with pytest.raises(ValueError, match="cube"):
        HartleyVolume.from_real_space(torch.zeros(4, 4))


def test_fitting_slices_of_a_known_volume_decreases_the_loss() -> None:
    """End to end: Adam on (mantissa, exponent) against slices at known rotations."""
    L = 16
    target = HartleyVolume.from_real_space(_blob_map(L, seed=4))
    gen = torch.Generator().manual_seed(5)
    rots = random_rotations(40, generator=gen, dtype=F64)
    freqs = disc_frequencies(L, dtype=F64)
    with torch.no_grad():
        observed = target.slices(rots, freqs)  # (40, P)
    # amplitude estimated from the "images" themselves, as in ab initio use
    amplitude = radial_rms(target.slices(rots).detach(), 2).clamp_min(1e-3)
    vol = HartleyVolume.ab_initio(L, amplitude, gen, mantissa_scale=0.1)
    opt = torch.optim.Adam(vol.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        loss = (vol.slices(rots, freqs) - observed).square().sum() / observed.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_symmetry_averages_the_volume_and_keeps_the_state_dict() -> None:
    """With a point group the volume is the group average of ``mantissa · exp(exponent)``
    (exactly G-invariant for a permutation group); its buffers are not in the state dict, so
    a checkpoint loads into a volume of any group."""
    gen = torch.Generator().manual_seed(0)
    plain = HartleyVolume(7, generator=gen)
    sym = HartleyVolume(7, symmetry="D2")
    sym.load_state_dict(plain.state_dict())
    assert set(sym.state_dict()) == set(plain.state_dict()) == {"mantissa", "exponent"}
    out = sym()
    torch.testing.assert_close(out, symmetrize_volume(plain(), *grid_cosets(
        point_group_rotations("D2"))))
    torch.testing.assert_close(out, out.flip(1, 2), rtol=0, atol=1e-7)  # the 2-fold about z
    assert HartleyVolume(7, symmetry="C1").symmetry_cosets is None
    assert "symmetry=D2" in repr(sym)
    out.sum().backward()
    assert sym.mantissa.grad is not None
