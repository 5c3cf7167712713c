"""The noise's power spectrum, measured on the images' background, and the filter that whitens it.

Real particle images do not have white noise: the background's power per spatial frequency
falls from the lowest frequencies (ice thickness, drift, the carbon's edge) towards Nyquist
(the detector's MTF, dose weighting); in the small real stacks of ``../shared/data`` by 3-9x
across the band. The image model has one variance ``σ²`` per Hartley coefficient; with
coloured noise it over-trusts the frequencies where the noise is stronger than ``σ²``.
Multiplying both the image's coefficients and the CTF by ``w(k) = sqrt(σ² / N(|k|))``
(``N`` the noise's variance at ``|k|``) makes the noise white with variance ``σ²`` and leaves
the model unchanged (the CTF is a per-frequency factor of the prediction already): the
Gaussian likelihood of the whitened data is that of the original data under noise of
spectrum ``N`` (``docs/conventions.md``, "Preprocessing", noise whitening).

:func:`background_noise_spectrum` measures ``N`` per integer shell ``round(|k|)`` (cycles per
box) from the pixels of a background mask (for a centred particle: outside the inscribed
circle) of a sample of images: the periodogram of each image's background, mean removed. Its
expectation is ``N`` blurred by the mask's transform (the corners of a box are small regions:
the blur spans a few cycles per box) and lowered near ``k = 0`` by the mean's removal; both
are computed exactly for a radial ``N`` (:func:`_expected_periodogram`), and ``N`` is found by
multiplicative corrections until the expected periodogram matches the measured one (5 by
default: on a spectrum falling 10x across the band, within ~6 % in every shell from 2,000
images, where the plain periodogram is 25 % low at shell 1; white noise stays within the
sample's own scatter, ~3-5 %).
:func:`whitening_filter` turns it into ``w`` on a disc of frequencies.

Units: ``N`` is the variance of one Hartley coefficient of the unnormalised centred transform
(:func:`cryospin.forward.hartley.hartley2`), i.e. ``L²`` times the per-pixel variance for white
noise, the unit of ``TrainingData.noise_variance``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["background_noise_spectrum", "whitening_filter"]

_CHUNK = 64  # images per FFT batch


def background_noise_spectrum(images: Tensor, background: Tensor, *,
                              iterations: int = 5) -> Tensor:
    """Per-shell noise variance of one Hartley coefficient, `(L//2 + 1,)` float64.

    Parameters
    ----------
    images : `(m, L, L)`
        Sample images (any real dtype; computed in float64), ``[y, x]``.
    background : `(L, L)` bool
        The pixels that hold noise only.
    iterations : int
        Multiplicative corrections of the blur (module docstring); 0 returns the plain
        periodogram corrected for white noise.

    Returns
    -------
    `(L//2 + 1,)` float64
        For shells ``s = round(|k|)`` (cycles per box, the DFT grid's frequencies up to
        ``L//2``): the noise's variance ``N(s)`` of one Hartley coefficient, the radial
        spectrum whose expected background periodogram (:func:`_expected_periodogram`)
        matches the measured one, ``mean |F((x − mean_bg(x)) · bg)(k)|²`` over the shell's
        frequencies and the images (``F`` the unnormalised 2D DFT). Shell 0 (the mean,
        removed) takes shell 1's value.

    Raises
    ------
    ValueError
        If the shapes disagree or the mask holds fewer than 2 pixels.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (m, L, L), got {tuple(images.shape)}")
    L = int(images.shape[-1])
    if tuple(background.shape) != (L, L):
        raise ValueError(f"background mask {tuple(background.shape)} for images of {L} px")
    mask = background.to(torch.float64)
    n = float(mask.sum())
    if n < 2:
        raise ValueError("the background mask holds fewer than 2 pixels")
    observed = torch.zeros(L, L, dtype=torch.float64)
    for i in range(0, images.shape[0], _CHUNK):  # bounded memory for the FFTs
        x = images[i : i + _CHUNK].to(torch.float64)
        mean = (x * mask).sum(dim=(-2, -1), keepdim=True) / n  # (c, 1, 1)
        observed += torch.fft.fft2((x - mean) * mask).abs().square().sum(dim=0)
    observed /= max(int(images.shape[0]), 1)  # (L, L) mean over the images
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=torch.float64)  # cycles per box
    shell = torch.round(torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)).long()  # (L, L)
    shells = L // 2 + 1
    inside = shell < shells
    counts = torch.zeros(shells, dtype=torch.float64).index_add_(
        0, shell[inside], torch.ones_like(observed[inside]))

    def shell_mean(grid: Tensor) -> Tensor:
        sums = torch.zeros(shells, dtype=torch.float64).index_add_(0, shell[inside],
                                                                   grid[inside])
        return sums / counts

    mask_ft = torch.fft.fft2(mask)
    measured = shell_mean(observed)[1:]  # shells 1 .. L/2 (shell 0: the removed mean)
    white = shell_mean(_expected_periodogram(torch.ones(L, L, dtype=torch.float64),
                                             mask_ft, n))[1:]
    per_pixel = measured / white  # (L/2,) exact for white noise
    for _ in range(iterations):
        radial = torch.cat([per_pixel[:1], per_pixel])  # (shells,), shell 0 = shell 1
        grid = radial[shell.clamp_max(shells - 1)]  # (L, L); corners: the last shell
        expected = shell_mean(_expected_periodogram(grid, mask_ft, n))[1:]
        per_pixel = per_pixel * measured / expected
    spectrum = torch.cat([per_pixel[:1], per_pixel]) * (L * L)
    return spectrum


def _expected_periodogram(spectrum: Tensor, mask_ft: Tensor, n: float) -> Tensor:
    """``E |F((x − mean_bg(x)) · bg)(k)|²`` `(L, L)` for stationary noise ``x`` whose
    per-pixel power spectrum on the DFT grid is ``spectrum`` `(L, L)` (``Σ_d C(d) e^{-ikd}``,
    ``C`` the pixels' covariance; white noise of variance ``v``: ``v``), ``mask_ft`` `(L, L)`
    the DFT of the 0/1 background mask of ``n`` pixels.

    With ``c = M(k)/n`` (``M`` the mask's DFT) the background's mean-removed transform is
    ``Σ_q X(q) (M(k − q) − c M(−q)) / L²``, so its expected power is
    ``(1/L²) [(s ⊛ |M|²)(k) − 2 Re(c̄ ((s M) ⊛ M)(k)) + |c|² Σ_q s(q) |M(q)|²]``
    (``⊛`` the circular convolution, computed with FFTs)."""
    L = int(spectrum.shape[-1])

    def conv(a: Tensor, b: Tensor) -> Tensor:
        return torch.fft.ifft2(torch.fft.fft2(a) * torch.fft.fft2(b))

    power = mask_ft.abs().square()  # (L, L)
    c = mask_ft / n
    blurred = conv(spectrum.to(mask_ft.dtype), power.to(mask_ft.dtype)).real
    cross = (c.conj() * conv(spectrum * mask_ft, mask_ft)).real
    offset = c.abs().square() * float((spectrum * power).sum())
    return (blurred - 2.0 * cross + offset) / (L * L)


def whitening_filter(spectrum: Tensor, frequencies: Tensor, reference_variance: float, *,
                     max_gain: float = 10.0) -> Tensor:
    """``w(k) = sqrt(reference / N(round|k|))`` on ``frequencies``, `(P,)` float64.

    Parameters
    ----------
    spectrum : `(S,)`
        Noise variance per integer shell (:func:`background_noise_spectrum`); frequencies
        beyond the last shell take the last shell's value.
    frequencies : `(P, 2)`
        Cycles per box.
    reference_variance : float
        The variance of one Hartley coefficient of the whitened noise (> 0).
    max_gain : float
        ``w`` is clamped to ``[1/max_gain, max_gain]`` (a shell measured with almost no
        noise must not dominate the fit).

    Raises
    ------
    ValueError
        For a non-positive reference, ``max_gain < 1`` or a non-positive spectrum value.
    """
    if not reference_variance > 0:
        raise ValueError(f"reference_variance must be > 0, got {reference_variance}")
    if not max_gain >= 1:
        raise ValueError(f"max_gain must be >= 1, got {max_gain}")
    spec = spectrum.to(torch.float64)
    if not bool((spec > 0).all()):
        raise ValueError("the noise spectrum must be positive in every shell")
    shell = torch.round(frequencies.to(torch.float64).norm(dim=-1)).long()
    shell = shell.clamp_max(spec.numel() - 1)
    gain = torch.sqrt(reference_variance / spec[shell.to(spec.device)])
    return gain.clamp(1.0 / max_gain, max_gain)
