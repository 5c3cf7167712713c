"""Preprocessing: background normalisation, soft mask, contrast check, on-the-fly Fourier crop,
and their integration into the training data (float64 where numerical)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.forward.hartley import hartley2
from cryospin.forward.resample import fourier_crop_2d
from cryospin.io.mrc import write_map
from cryospin.preprocess import (
    PreprocessedParticles,
    background_mask,
    check_contrast,
    contrast_statistic,
    normalize_background,
    radius_grid_px,
    sample_contrast,
    soft_circular_mask,
)
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import prepare_data

F64 = torch.float64


class _FakeParticles:
    """Minimal ParticleSet-like source (no CTF) over an in-memory stack `(N, L, L)`."""

    def __init__(self, images: torch.Tensor, pixel_size_angstrom: float = 2.0) -> None:
        self._images = images
        self.box_px = int(images.shape[-1])
        self.pixel_size_angstrom = pixel_size_angstrom
        self.ctf = None
        self.source = Path("fake.star")

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def images(self, indices=None) -> torch.Tensor:
        idx = slice(None) if indices is None else torch.as_tensor(indices)
        return self._images[idx].to(torch.float32)


def _noisy_stack(n: int, L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, generator=g, dtype=F64) * 5 + 0.5
    offset = torch.randn(n, 1, 1, generator=g, dtype=F64) * 3
    return torch.randn(n, L, L, generator=g, dtype=F64) * scale + offset


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("L", [16, 17])
def test_background_normalisation_gives_mean_0_std_1(L: int) -> None:
    x = _noisy_stack(6, L).reshape(2, 3, L, L)
    before = x.clone()
    radius = 0.7 * L / 2
    y = normalize_background(x, radius)
    assert y.shape == x.shape and y.dtype == F64
    assert torch.equal(x, before)  # input untouched
    bg = y.reshape(-1, L, L)[:, background_mask(L, radius)]
    torch.testing.assert_close(bg.mean(1), torch.zeros(6, dtype=F64), atol=1e-13, rtol=0)
    torch.testing.assert_close(bg.std(1, correction=0), torch.ones(6, dtype=F64),
                               atol=1e-13, rtol=0)
    # an affine map per image: normalising a rescaled, offset copy gives the same result
    torch.testing.assert_close(normalize_background(3.0 * x - 7.0, radius), y,
                               atol=1e-12, rtol=0)


def test_background_normalisation_rejects_constant_background_and_keeps_nan() -> None:
    x = torch.zeros(2, 16, 16, dtype=F64)
    x[1] = torch.randn(16, 16, dtype=F64)
    with pytest.raises(ValueError, match="image 0 .* constant background"):
        normalize_background(x, 6.0)
    x[0, 0, 0] = float("nan")  # NaN propagates (the trainer's finite check reports it)
    assert torch.isnan(normalize_background(x, 6.0)[0]).all()
    with pytest.raises(ValueError, match="no background"):
        normalize_background(x, 100.0)


# ----------------------------------------------------------------------------- mask


@pytest.mark.parametrize("L, radius, width", [(32, 10.0, 4.0), (33, 7.5, 2.5), (16, 5.0, 0.0)])
def test_soft_mask_inside_outside_monotone_smooth(L: int, radius: float, width: float) -> None:
    m = soft_circular_mask(L, radius, width)
    r = radius_grid_px(L)
    assert m.dtype == F64 and m.shape == (L, L)
    assert torch.all(m[r <= radius] == 1.0)
    assert torch.all(m[(r > radius + width) | ((r >= radius + width) & (width > 0))] == 0.0)
    assert torch.all((m >= 0) & (m <= 1))
    order = torch.argsort(r.flatten(), stable=True)
    vals = m.flatten()[order]
    assert torch.all(vals[1:] <= vals[:-1] + 1e-15)  # non-increasing with r
    if width > 0:
        # raised cosine: closed form, slope at most π/(2w) per pixel of radius
        edge = (r > radius) & (r < radius + width)
        expected = 0.5 * (1 + torch.cos(math.pi * (r[edge] - radius) / width))
        torch.testing.assert_close(m[edge], expected, atol=1e-15, rtol=0)
        dr = (r[:, 1:] - r[:, :-1]).abs()
        dm = (m[:, 1:] - m[:, :-1]).abs()
        assert torch.all(dm <= math.pi / (2 * width) * dr + 1e-12)
    assert soft_circular_mask(L, radius, width, dtype=torch.float32).dtype == torch.float32


# ----------------------------------------------------------------------------- contrast


def _blob_map(L: int) -> torch.Tensor:
    c = torch.arange(L, dtype=F64) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(L, L, L, dtype=F64)
    for (mx, my, mz), s in [((3, 0, 0), 2.5), ((-3, 2, 1), 2.0), ((0, -4, 2), 1.8),
                            ((1, 3, -3), 2.2)]:
        vol += torch.exp(-((x - mx) ** 2 + (y - my) ** 2 + (z - mz) ** 2) / (2 * s * s))
    return vol


@pytest.fixture(scope="module")
def simulated_bright(tmp_path_factory) -> torch.Tensor:
    """Bright particles with the CTF on, SNR 0.1 (cryospin.simulate), `(128, 32, 32)`."""
    from cryospin.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("contrast")
    write_map(root / "blob.mrc", _blob_map(32).numpy(), 5.0)
    ds = simulate_dataset(root / "blob.mrc", root / "data", n_particles=128, box_px=32,
                          pixel_size_angstrom=5.0, snr=0.1, seed=3, shift_std_px=1.0)
    return ds.particles.images().to(F64)


def test_contrast_check_on_simulated_bright_and_negated(simulated_bright) -> None:
    bright = check_contrast(simulated_bright)
    assert bright.verdict == "not inverted" and bright.inverted is False
    assert bright.z_score > 10 and bright.mean_contrast > 0
    dark = check_contrast(-simulated_bright)
    assert dark.verdict == "inverted" and dark.inverted is True
    assert dark.z_score == pytest.approx(-bright.z_score, rel=1e-12)


def test_contrast_check_is_unclear_on_pure_noise() -> None:
    noise = torch.randn(200, 32, 32, generator=torch.Generator().manual_seed(5), dtype=F64)
    check = check_contrast(noise)
    assert check.verdict == "unclear" and check.inverted is None
    assert abs(check.z_score) < 3
    assert check_contrast(noise[:1]).verdict == "unclear"  # one image: no statistic


def test_contrast_statistic_sign_and_scale_invariance() -> None:
    L = 24
    r = radius_grid_px(L)
    blob = torch.exp(-(r / 4.0) ** 2)  # (L, L) bright disc on a zero background
    noise = torch.randn(3, L, L, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = blob + 0.1 * noise
    s = contrast_statistic(x, 6.0, 9.6)
    assert s.shape == (3,) and torch.all(s > 0)
    torch.testing.assert_close(contrast_statistic(5.0 * x + 2.0, 6.0, 9.6), s)
    torch.testing.assert_close(contrast_statistic(-x, 6.0, 9.6), -s)


def test_sample_contrast_reads_a_particle_set(simulated_bright) -> None:
    check = sample_contrast(_FakeParticles(-simulated_bright), max_images=100)
    assert check.num_images == 100 and check.verdict == "inverted"


def test_empiar10076_particles_are_dark(shared_data: Path) -> None:
    from cryospin.io.particles import load_particles

    parts = load_particles(shared_data / "particles" / "empiar10076_7" / "empiar_10076_7.star")
    check = sample_contrast(parts)
    assert check.num_images == 7 and check.verdict == "inverted"


# ----------------------------------------------------------------------------- view / crop


def test_preprocessed_view_crops_and_normalises() -> None:
    x = _noisy_stack(5, 32, seed=2)
    src = _FakeParticles(x, pixel_size_angstrom=1.5)
    view = PreprocessedParticles(src, box_px=16, normalize="background")
    assert view.box_px == 16 and view.pixel_size_angstrom == pytest.approx(3.0)
    assert len(view) == 5 and view.ctf is None and view.encoder_mask is None
    y = view.images(torch.tensor([3, 1]))
    assert y.shape == (2, 16, 16) and y.dtype == F64
    expected = normalize_background(fourier_crop_2d(x[[3, 1]].float().double(), 16),
                                    0.8 * 16 / 2)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    assert PreprocessedParticles.wrap(src) is src  # defaults: no view at all
    assert PreprocessedParticles.wrap(src, box_px=32) is src
    masked = PreprocessedParticles.wrap(src, mask_radius_fraction=0.5, mask_edge_px=2.0)
    torch.testing.assert_close(masked.encoder_mask, soft_circular_mask(32, 8.0, 2.0))
    for bad in (15, 34, 6):
        with pytest.raises(InputError, match="fake.star: --box"):
            PreprocessedParticles(src, box_px=bad)


def test_preprocessed_view_crops_in_chunks_and_accepts_any_index() -> None:
    x = _noisy_stack(300, 16, seed=8)  # more than one crop chunk of 256
    src = _FakeParticles(x)
    view = PreprocessedParticles(src, box_px=8)
    whole = fourier_crop_2d(x.float().double(), 8)  # (300, 8, 8)
    torch.testing.assert_close(view.images(), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(view.images(slice(250, 290, 3)), whole[250:290:3],
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(view.images([299, 0, 257]), whole[[299, 0, 257]],
                               atol=1e-12, rtol=0)


def test_config_validation_of_the_new_fields() -> None:
    assert build_config("default").data.normalize == "global"
    for bad in ({"box_px": 31}, {"box_px": 4}, {"mask_radius_fraction": 0.0},
                {"mask_radius_fraction": 1.5}, {"mask_edge_px": -1.0}, {"normalize": "std"}):
        with pytest.raises(InputError):
            build_config("default", {"data": bad})


def test_prepare_data_with_box_mask_and_background_lazy_equals_preloaded() -> None:
    x = _noisy_stack(12, 32, seed=4)
    src = _FakeParticles(x, pixel_size_angstrom=2.0)
    cfg = DataConfig(no_ctf=True, box_px=16, normalize="background", mask_radius_fraction=0.75,
                     mask_edge_px=2.0)
    pre = prepare_data(src, cfg)
    lazy = prepare_data(src, DataConfig(**{**cfg.__dict__, "max_preload_gb": 0.0}))
    assert pre.preloaded and not lazy.preloaded
    assert pre.box_px == 16 and pre.pixel_size_angstrom == pytest.approx(4.0)
    assert pre.image_scale == 1.0  # background-normalised: only the sign remains
    idx = torch.tensor([7, 0, 3])
    a, b = pre.batch(idx), lazy.batch(idx)
    torch.testing.assert_close(a.images, b.images)
    torch.testing.assert_close(a.hartley, b.hartley)
    # the mask applies to the encoder input only; the loss sees the unmasked images
    view = PreprocessedParticles(src, box_px=16, normalize="background",
                                 mask_radius_fraction=0.75, mask_edge_px=2.0)
    clean = view.images(idx)  # (3, 16, 16) unmasked, background outside r = 6 px
    mask = soft_circular_mask(16, 0.75 * 8, 2.0)
    torch.testing.assert_close(a.images, (clean * mask).float(), atol=1e-6, rtol=0)
    k = torch.round(pre.frequencies).long()
    flat = (k[:, 1] + 8) * 16 + (k[:, 0] + 8)
    torch.testing.assert_close(a.hartley, hartley2(clean).reshape(3, 256)[:, flat].float(),
                               atol=1e-4, rtol=1e-5)
    # invert_contrast flips the sign of the normalised images
    inv = prepare_data(src, DataConfig(**{**cfg.__dict__, "invert_contrast": True}))
    assert inv.image_scale == -1.0
    torch.testing.assert_close(inv.batch(idx).images, -a.images)


def test_prepare_data_default_is_unchanged_by_the_preprocessing_options() -> None:
    x = _noisy_stack(8, 16, seed=6)
    src = _FakeParticles(x)
    base = prepare_data(src, DataConfig(no_ctf=True))
    same = prepare_data(src, DataConfig(no_ctf=True, box_px=16, normalize="global"))
    assert base.image_scale == same.image_scale
    torch.testing.assert_close(base.images, same.images, atol=0, rtol=0)
    torch.testing.assert_close(base.images, (x.float() * base.image_scale).float())


# --------------------------------------------------------------- Gaussian pyramid (issue 14)


def _direct_gaussian_reflect(image: np.ndarray, variance: float) -> np.ndarray:
    """The 2D convolution with the sampled, normalised, truncated Gaussian, written out pixel
    by pixel over a reflect-padded image (float64 reference)."""
    L = image.shape[0]
    sigma = np.sqrt(variance)
    r = max(1, min(int(np.ceil(4 * sigma)), L - 1))
    x = np.arange(-r, r + 1)
    k2 = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * variance))
    k2 /= k2.sum()
    padded = np.pad(image, r, mode="reflect")
    out = np.empty_like(image)
    for i in range(L):
        for j in range(L):
            out[i, j] = (padded[i:i + 2 * r + 1, j:j + 2 * r + 1] * k2).sum()
    return out


@pytest.mark.parametrize("box", [16, 33])
def test_pyramid_channels_are_the_stated_gaussian_blurs_float64(box: int) -> None:
    from cryospin.preprocess import gaussian_pyramid, pyramid_variances_px2

    images = torch.randn(2, box, box, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(box))
    variances = pyramid_variances_px2(4 * box)  # at 4x the box: 0.0x .. 100/64·box² px²
    pyr = gaussian_pyramid(images, variances)
    assert pyr.shape == (2, 5, box, box) and pyr.dtype == torch.float64
    for c, v in enumerate(variances):
        for b in range(2):
            ref = _direct_gaussian_reflect(images[b].numpy(), v)
            np.testing.assert_allclose(pyr[b, c].numpy(), ref, rtol=0, atol=1e-12)


def test_gaussian_blur_properties_float64() -> None:
    from cryospin.preprocess import gaussian_blur

    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 24, 24, dtype=torch.float64, generator=g)
    const = torch.full((24, 24), 2.5, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(const, 3.0), const, rtol=0, atol=1e-12)  # sum 1
    torch.testing.assert_close(gaussian_blur(img, 1e-4), img, rtol=0, atol=1e-12)  # ~identity
    a, b = torch.randn(24, 24, dtype=torch.float64, generator=g), 0.7
    torch.testing.assert_close(gaussian_blur(img[0] + b * a, 2.0),
                               gaussian_blur(img[0], 2.0) + b * gaussian_blur(a, 2.0),
                               rtol=0, atol=1e-12)  # linear
    # wider blurs remove more of the image's variance
    v = [float(gaussian_blur(img, s).var()) for s in (0.5, 2.0, 8.0)]
    assert v[0] > v[1] > v[2]
    with pytest.raises(ValueError, match="variance"):
        gaussian_blur(img, 0.0)
