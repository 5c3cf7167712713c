"""A copy of a noise-free simulated data set with Gaussian noise of a real stack's spectrum.

`cryospin simulate` adds white noise; real particle images do not have it: their background's
power per spatial frequency falls from the lowest frequencies (ice thickness, the carbon's
edge, drift) towards Nyquist (the detector's MTF, dose weighting), by 2-6x across the band in
the small real stacks of ``../shared/data/particles``. This copy measures the radial noise
power profile of a real stack, from the four corner squares (side L/4) of its images (pure
background), as a function of the frequency in cycles per pixel, and adds to a noise-free
simulation (``cryospin simulate ... --snr inf``) Gaussian noise with that profile and the
total variance ``var_clean / SNR`` (the simulator's definition of the SNR). The star, the
ground truth and ``simulation.json`` are copied; ``noise_profile.npy`` holds the profile
(relative power against cycles per pixel)::

    cryospin simulate bundled:6vyb -o SPIKE_64_CLEAN --n-particles 20000 --box 64 \\
        --pixel-size 3.4 --resolution-angstrom 6.8 --snr inf --seed 0
    python benchmarks/coloured_noise_set.py SPIKE_64_CLEAN SPIKE_64_COLOURED \\
        --noise-from ../shared/data/particles/relion31_5/relion31.mrcs --snr 0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cryospin.io.mrc import read_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_derived_set  # noqa: E402

#: frequency bands (cycles per pixel) of the measured profile
BANDS = 16


def corner_noise_profile(stack: np.ndarray, bands: int = BANDS) -> tuple[np.ndarray, np.ndarray]:
    """The radial power profile of the background of ``stack`` `(n, L, L)`: the centres
    `(B,)` (cycles per pixel) of bands ``(a, b]`` on ``(0, 0.5]`` and the mean power in each
    `(B,)`, normalised to mean 1, from the periodograms of the four corner squares (side
    ``s = L // 4``, each made zero-mean) of every image; ``B = min(bands, s // 2)`` so that
    every band holds frequencies of the corners' grid."""
    n, L, _ = stack.shape
    s = L // 4
    bands = min(bands, s // 2)
    x = np.asarray(stack, np.float64)
    corners = (x[:, :s, :s], x[:, :s, -s:], x[:, -s:, :s], x[:, -s:, -s:])
    power = np.zeros((s, s))
    for c in corners:
        c = c - c.mean(axis=(1, 2), keepdims=True)
        power += (np.abs(np.fft.fft2(c)) ** 2).sum(axis=0)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(s), np.fft.fftfreq(s), indexing="ij"))
    edges = np.linspace(0.0, 0.5, bands + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    profile = np.empty(bands)
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        profile[i] = power[(k > a) & (k <= b)].mean()  # k = 0 went with the mean
    return centres, profile / profile.mean()


def coloured_noise(shape: tuple[int, int, int], centres: np.ndarray, profile: np.ndarray,
                   sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise `(n, L, L)` float32 whose power at frequency ``|k|`` (cycles per pixel)
    is proportional to ``profile`` interpolated at ``|k|`` (held beyond the last centre) and
    whose variance per pixel is ``sigma²`` (white noise filtered by ``sqrt(profile)``, the
    filter scaled to mean power 1 over the box's frequencies)."""
    n, L, _ = shape
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(L), np.fft.fftfreq(L), indexing="ij"))
    gain = np.interp(k, centres, profile)  # (L, L), even in k: the filtered noise stays real
    gain = gain / gain.mean()
    out = np.empty(shape, np.float32)
    for i in range(0, n, 1024):
        white = rng.standard_normal((min(1024, n - i), L, L))
        out[i : i + 1024] = np.fft.ifft2(np.fft.fft2(white) * np.sqrt(gain)).real * sigma
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a noise-free `cryospin simulate` folder")
    parser.add_argument("out", type=Path, help="new folder")
    parser.add_argument("--noise-from", type=Path, required=True,
                        help="a real particle stack (.mrcs) whose background sets the profile")
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists")
    if not args.snr > 0:
        parser.error("--snr must be > 0")
    real, _ = read_map(args.noise_from)
    centres, profile = corner_noise_profile(np.asarray(real))
    clean, apix = read_map(args.source / "particles.mrcs")
    clean = np.asarray(clean, dtype=np.float32)
    sigma = float(np.sqrt(clean.astype(np.float64).var() / args.snr))
    noise = coloured_noise(clean.shape, centres, profile, sigma,
                           np.random.default_rng(args.seed))
    write_derived_set(args.source, args.out, clean + noise, apix,
                      ("noise_profile.npy", np.stack([centres, profile])))
    print(f"{args.out}: {clean.shape[0]} images, noise sigma {sigma:.4g}; profile of "
          f"{args.noise_from.name} (relative power, {profile.size} bands 0-0.5 cycles/px): "
          + " ".join(f"{v:.2f}" for v in profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
