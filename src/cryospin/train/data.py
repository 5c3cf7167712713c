"""Training data, preprocessed once: normalised images, their Hartley values on the loss disc,
the CTF on the same frequencies, a noise-variance estimate and the data's radial amplitude.

Conventions (``docs/conventions.md``): images `(N, L, L)` indexed ``[y, x]``; Hartley values
of the centred transform (unnormalised forward); frequencies ``(kx, ky)`` in cycles per box on
the loss disc ``|k| ≤ radius`` (default ``L//2 − 1``), in the row-major order of
:func:`cryospin.forward.lattice.disc_frequencies`.

Normalisation: images are multiplied by ``image_scale`` (−1 with ``invert_contrast``, divided by
the global standard deviation of the pixels), so the encoder sees unit-variance inputs. The
map's scale is therefore arbitrary (as in every ab initio method). With ``DataConfig.box_px``,
``normalize="background"`` or ``mask_radius_fraction``, the particles are first wrapped in
:class:`cryospin.preprocess.PreprocessedParticles` (Fourier crop, per-particle background
normalisation; the soft mask is applied to the encoder input only, not to the loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.lattice import disc_frequencies, negation_permutation
from cryospin.noise_spectrum import background_noise_spectrum, whitening_filter
from cryospin.preprocess import PreprocessedParticles
from cryospin.sources import ImageSource, release_pages
from cryospin.train.batches import (
    Batch,
    LossDisc,
    batch_indices,
    gaussian_lowpass,
    num_batches,
    sub_disc,
)
from cryospin.train.config import DataConfig
from cryospin.train.row_source import RowSource, StreamedRows
from cryospin.train.rows import HeldParticles, RowReader, Rows, preprocess_rows
from cryospin.train.stream import StreamOptions

__all__ = [
    "TrainingData",
    "Batch",
    "LossDisc",
    "prepare_data",
    "batch_indices",
    "num_batches",
    "radial_profile",
    "sub_disc",
    "gaussian_lowpass",
]

# images per chunk while preprocessing (bounded memory for the FFTs)
_CHUNK = 512
_SAMPLE_CHUNK = 32  # spread-out sample images read between two hand-backs of their pages
# images used to estimate the normalisation and the noise
_STATS_IMAGES = 2000


@dataclass(frozen=True)
class TrainingData:
    """Preprocessed particles (see the module docstring): the metadata every row source shares
    and one :class:`~cryospin.train.row_source.RowSource`, ``rows``, that :meth:`batch` and
    :meth:`epoch_batches` delegate to.

    The rows are **in memory** (:class:`~cryospin.train.row_source.InMemoryRows`: every held
    particle preprocessed once) or **streamed** (:class:`~cryospin.train.row_source.StreamedRows`:
    each batch read and preprocessed with ``reader``, epochs by the chunked loader of
    :mod:`cryospin.train.stream`, from the float16 cache when one is attached).
    :func:`prepare_data` returns streamed rows without a cache ("lazy" data), which
    :meth:`in_memory` or :meth:`streaming` finish.

    **Sharded** (distributed training, :meth:`holding`): the rows hold only the particles of
    ``rows.held`` (a rank's shard, :class:`~cryospin.train.rows.HeldParticles`); everything
    stays indexed by *global* particle index and ``num_particles`` stays the global ``N``.

    Attributes
    ----------
    box_px : int
    pixel_size_angstrom : float
    num_particles : int
    frequencies : `(P, 2)` float32
        Loss-disc frequencies ``(kx, ky)``, cycles per box.
    negation_index : `(P,)` int64
        ``frequencies[negation_index] == −frequencies``.
    noise_variance : float
        Noise variance of one Hartley coefficient (``L² ×`` the real-space pixel variance).
    radial_amplitude : `(L//2 + 1,)` float32
        RMS Hartley amplitude of the signal per integer frequency shell ``|k|``, corrected for
        the mean CTF power (of the whitened data with ``noise_spectrum``); used to
        initialise the volume.
    image_scale : float
        Factor applied to the raw images.
    use_ctf : bool
    rows : RowSource
        Where the batches come from (in memory or streamed; possibly sharded).
    reader : RowReader or None
        Reads and preprocesses any particle's row from the image source (None: other
        particles than those in memory cannot be read).
    config : DataConfig or None
        The preprocessing configuration (keys the on-disk cache).
    noise_spectrum : `(L//2 + 1,)` float64 or None
        With ``DataConfig.whiten_noise``: the noise variance of one Hartley coefficient per
        integer shell, measured on the background before whitening
        (:func:`cryospin.noise_spectrum.background_noise_spectrum`); the rows' Hartley values
        and CTF are whitened by it (``reader.whitening``), so their noise has variance
        ``noise_variance`` at every frequency. None: not whitened.
    """

    box_px: int
    pixel_size_angstrom: float
    num_particles: int
    frequencies: Tensor
    negation_index: Tensor
    noise_variance: float
    radial_amplitude: Tensor
    image_scale: float
    use_ctf: bool
    rows: RowSource
    reader: RowReader | None = None
    config: DataConfig | None = None
    noise_spectrum: Tensor | None = None

    def __len__(self) -> int:
        return self.num_particles

    @property
    def device(self) -> torch.device:
        return self.frequencies.device

    @property
    def preloaded(self) -> bool:
        return self.rows.resident is not None

    @property
    def images(self) -> Tensor | None:
        """In memory: the images `(n, L, L)` float32 (one row per held particle); else None."""
        resident = self.rows.resident
        return None if resident is None else resident.images

    @property
    def hartley(self) -> Tensor | None:
        """In memory: the Hartley values `(n, P)` float32; else None."""
        resident = self.rows.resident
        return None if resident is None else resident.hartley

    @property
    def ctf(self) -> Tensor | None:
        """In memory: the CTF `(n, P)` float32 (None when the CTF is ignored); else None."""
        resident = self.rows.resident
        return None if resident is None else resident.ctf

    @property
    def source(self) -> ImageSource | None:
        """The image source the rows are read from (cropped and normalised as trained on,
        before the contrast scale ``image_scale``); None without a reader."""
        return None if self.reader is None else self.reader.view

    def batch(self, indices: Tensor) -> Batch:
        """Rows ``indices`` `(B,)` (global particle indices) as a :class:`Batch` (on
        :attr:`device`). Sharded: raises ValueError for particles not held."""
        return self.rows.batch(indices)

    def epoch_batches(
        self, batch_size: int, generator: torch.Generator, options: StreamOptions | None = None
    ) -> Iterator[Batch]:
        """The batches of one epoch in random order (drawn from ``generator`` now).

        In memory: the permutation of :func:`batch_indices` (seeded runs unchanged). Streamed:
        the chunked loader (:func:`cryospin.train.stream.stream_epoch`, ``options`` a
        :class:`~cryospin.train.stream.StreamOptions`): chunk order and windows shuffled,
        background prefetch. Both yield :func:`num_batches` batches.

        Sharded: the same global batches (the same draws from ``generator``), each reduced to
        the particles held (in the batch's order, possibly none), with ``global_size`` set.
        """
        return self.rows.epoch_batches(batch_size, generator, options)

    def holding(self, indices: Tensor | None) -> TrainingData:
        """These data restricted to the particles ``indices`` `(n,)` (global, any order;
        a distributed rank's shard, ``Shard.owned(N)``); None: every particle.

        Lazy data stay lazy (finish with :meth:`in_memory` or :meth:`streaming`, which then
        read and preprocess these particles only); preloaded data keep the rows of
        ``indices``, which must be held.
        """
        if indices is None:
            return self.unsharded()
        held = HeldParticles.of(indices, self.num_particles)
        return dataclasses.replace(self, rows=self.rows.holding(held))

    def unsharded(self) -> TrainingData:
        """Every particle: these data themselves when they hold all; else a lazy view that
        reads and preprocesses any particle from ``source`` on demand (for rank 0's
        diagnostics and final outputs, not for training)."""
        if not self.rows.held.sharded:
            return self
        if self.reader is None:
            raise ValueError("sharded training data without a source cannot read other "
                             "particles")
        every = HeldParticles(self.num_particles)
        return dataclasses.replace(self, rows=StreamedRows(self.reader, every, self.device))

    def in_memory(self) -> TrainingData:
        """A copy with every particle held (sharded: the held ones only) preprocessed once and
        kept in memory (on :attr:`device`)."""
        return dataclasses.replace(self, rows=self.rows.in_memory(_CHUNK))

    def streaming(self) -> TrainingData:
        """This lazy data, with the preprocessed-image cache of ``config.cache_dir`` attached
        (built on first use) when one is configured. Sharded: its streamed epochs read and
        preprocess (or read from the cache) the held particles only."""
        return dataclasses.replace(self, rows=self.rows.with_cache(self.config))

    def summary(self) -> dict[str, object]:
        """Small JSON-ready description (sizes, noise, scale)."""
        return {
            "num_particles": len(self),
            "box_px": self.box_px,
            "pixel_size_angstrom": self.pixel_size_angstrom,
            "num_frequencies": int(self.frequencies.shape[0]),
            "noise_variance_hartley": self.noise_variance,
            "noise_whitened": self.noise_spectrum is not None,
            "image_scale": self.image_scale,
            "ctf": self.use_ctf,
            "preloaded": self.preloaded,
        }


def radial_profile(values_sq: Tensor, frequencies: Tensor, num_shells: int) -> Tensor:
    """Mean of ``values_sq`` `(..., P)` over integer shells ``round(|k|)``; `(num_shells,)`.

    Averages over all leading axes too. Empty shells take the value of the last non-empty one.
    """
    shell = torch.round(frequencies.double().norm(dim=-1)).long().clamp_max(num_shells - 1)
    flat = values_sq.reshape(-1, values_sq.shape[-1]).double().sum(0)  # (P,)
    count = float(values_sq.reshape(-1, values_sq.shape[-1]).shape[0])
    sums = torch.zeros(num_shells, dtype=torch.float64).index_add_(0, shell.cpu(), flat.cpu())
    counts = torch.zeros(num_shells, dtype=torch.float64).index_add_(
        0, shell.cpu(), torch.full_like(flat.cpu(), count)
    )
    prof = sums / counts.clamp_min(1)
    for s in range(1, num_shells):
        if counts[s] == 0:
            prof[s] = prof[s - 1]
    return prof


def _corner_mask(L: int) -> Tensor:
    """Pixels outside the inscribed circle `(L, L)` (the background of a centred particle)."""
    r = torch.arange(L, dtype=torch.float64) - L // 2
    rr = (r[:, None] ** 2 + r[None, :] ** 2).sqrt()
    return rr > (L / 2)


def _read_sample(view: ImageSource, stored: ImageSource, indices: Tensor) -> Tensor:
    """Images `(m, L, L)` of the spread-out ``indices`` read from ``view``, in small groups
    whose memory-mapped pages (of ``stored``, the particle set under ``view``) are handed back
    after each group. A page fault on a memory-mapped stack can map a whole large page-cache
    folio (measured: reading 2,000 images 70 apart mapped the whole 2.3 GB stack), so without
    the hand-back this sample alone would make the stack resident."""
    parts = []
    for i in range(0, len(indices), _SAMPLE_CHUNK):
        part_idx = indices[i : i + _SAMPLE_CHUNK]
        parts.append(view.images(part_idx))
        release_pages(stored, part_idx)
    return torch.cat(parts)


def _stats_indices(n: int) -> Tensor:
    """Evenly spaced indices of at most ``_STATS_IMAGES`` particles (deterministic)."""
    m = min(n, _STATS_IMAGES)
    return torch.linspace(0, n - 1, m).round().long().unique()


def prepare_data(
    particles: ImageSource,
    config: DataConfig,
    *,
    device: torch.device | str = "cpu",
    preload: bool | None = None,
) -> TrainingData:
    """Read and preprocess the particles (all at once when they fit in the preload budget).

    ``preload`` None preloads when images, Hartley values and CTF take at most
    ``config.max_preload_gb``, else streams (with the cache of ``config.cache_dir``); True
    preloads; False returns the lazy data only (statistics computed, nothing else read), to be
    finished by :meth:`TrainingData.in_memory` or :meth:`TrainingData.streaming` (the trainer
    decides with :func:`cryospin.train.memory.plan_and_load`).

    Parameters
    ----------
    particles : ImageSource
        A :class:`cryospin.io.particles.ParticleSet` or any image source; its ``ctf`` is
        needed unless ``config.no_ctf``.
    config : DataConfig
    device : torch device
        Where the tensors live during training.

    Returns
    -------
    TrainingData
    """
    stored = particles
    # Fourier crop / background normalisation / encoder mask on the fly, chunk by chunk
    # (the view is the `source` of lazy batches too, so both paths preprocess identically)
    particles = PreprocessedParticles.wrap(
        particles, box_px=config.box_px, normalize=config.normalize,
        mask_radius_fraction=config.mask_radius_fraction, mask_edge_px=config.mask_edge_px,
    )
    n = len(particles)
    L = int(particles.box_px)
    _check_inputs(particles, config)
    use_ctf = not config.no_ctf
    freqs = disc_frequencies(L, config.loss_radius_px)  # (P, 2) float32
    neg = negation_permutation(freqs, L)  # (P,)
    P = int(freqs.shape[0])

    # --- normalisation and noise from a deterministic sample of images
    stats_idx = _stats_indices(n)
    sample = _read_sample(particles, stored, stats_idx).to(torch.float64)  # (m, L, L)
    scale, noise_var_hartley = _scale_and_noise(sample, config, particles.source)
    spectrum = whitening = None
    if config.whiten_noise and use_ctf:
        spectrum = background_noise_spectrum(sample, _corner_mask(L)) * scale**2
        whitening = whitening_filter(spectrum, freqs, noise_var_hartley)  # (P,) float64
    amplitude = _radial_amplitude(particles, stored, stats_idx, scale, freqs, use_ctf,
                                  noise_var_hartley, whitening)

    dev = torch.device(device)
    mask = particles.encoder_mask if isinstance(particles, PreprocessedParticles) else None
    reader = RowReader(view=particles, stored=stored, image_scale=float(scale),
                       frequencies=freqs, use_ctf=use_ctf, encoder_mask=mask,
                       whitening=whitening)
    lazy = TrainingData(
        box_px=L, pixel_size_angstrom=float(particles.pixel_size_angstrom), num_particles=n,
        frequencies=freqs.to(dev), negation_index=neg.to(dev),
        noise_variance=float(noise_var_hartley), radial_amplitude=amplitude,
        image_scale=float(scale), use_ctf=use_ctf,
        rows=StreamedRows(reader, HeldParticles(n), dev), reader=reader, config=config,
        noise_spectrum=spectrum,
    )
    if preload is False:  # the caller attaches the cache (``streaming()``) or preloads later
        return lazy
    if preload is None:
        preload = 4 * n * (L * L + P * (2 if use_ctf else 1)) <= config.max_preload_gb * 1e9
    # in memory: everything once, in chunks; else batches read from the stacks (or the cache)
    return lazy.in_memory() if preload else lazy.streaming()


def _check_inputs(particles: ImageSource, config: DataConfig) -> None:
    """Raise :class:`InputError` for particles (after cropping) that cannot be trained on."""
    n, L, where = len(particles), int(particles.box_px), particles.source
    if n == 0:
        raise InputError("no particles to train on", where)
    if L < 8:
        raise InputError(f"box size {L} px is too small (need >= 8)", where)
    radius = config.loss_radius_px
    if radius is not None and radius > L // 2 - 1:
        raise InputError(
            f"loss radius {radius} px exceeds the largest disc of a {L} px box ({L // 2 - 1})"
        )
    if not config.no_ctf and particles.ctf is None:
        raise InputError(
            "particles have no CTF parameters (give --ctf, or --no-ctf to ignore the CTF)", where
        )


def _scale_and_noise(sample: Tensor, config: DataConfig, where: Path | None
                     ) -> tuple[float, float]:
    """The image scale and the noise variance of one Hartley coefficient, from the sample
    images `(m, L, L)` float64 (see the module docstring)."""
    L = int(sample.shape[-1])
    if not torch.isfinite(sample).all():
        raise InputError("particle images contain NaN or Inf", where)
    std = float(sample.std())
    if not std > 0:
        raise InputError("particle images are constant", where)
    # "background": images are already normalised per particle; only the sign is applied
    scale = (-1.0 if config.invert_contrast else 1.0) / (
        1.0 if config.normalize == "background" else std)
    if config.noise_variance is not None:
        noise_var_real = float(config.noise_variance)
    else:
        corners = (sample * scale)[:, _corner_mask(L)]  # (m, C)
        noise_var_real = float(corners.var(dim=1).mean()) if corners.numel() else 1.0
        noise_var_real = max(noise_var_real, 1e-6)
    return scale, noise_var_real * L * L


def _radial_amplitude(
    particles: ImageSource, stored: ImageSource, stats_idx: Tensor, scale: float,
    freqs: Tensor, use_ctf: bool, noise_var_hartley: float, whitening: Tensor | None = None,
) -> Tensor:
    """RMS Hartley amplitude `(L//2 + 1,)` float32 of the signal per shell, corrected for the
    mean CTF power, from the particles ``stats_idx`` (read in chunks whose pages are handed
    back); with ``whitening`` `(P,)`, of the whitened rows (their noise variance is
    ``noise_var_hartley`` in every shell and the CTF carries the filter, so the ratio is
    the signal's own amplitude again)."""
    shells = int(particles.box_px) // 2 + 1
    parts: list[Rows] = []  # in chunks: the transient memory of the FFTs stays bounded
    for i in range(0, len(stats_idx), _SAMPLE_CHUNK):
        part_idx = stats_idx[i : i + _SAMPLE_CHUNK]
        parts.append(preprocess_rows(particles, part_idx, scale, freqs, use_ctf,
                                     whitening=whitening))
        release_pages(stored, part_idx)
    stats_h = torch.cat([p.hartley for p in parts])  # (m, P)
    ctfs = [p.ctf for p in parts if p.ctf is not None]
    stats_ctf = torch.cat(ctfs) if use_ctf else None  # (m, P)
    del parts, ctfs
    power = radial_profile(stats_h.double().square(), freqs, shells) - noise_var_hartley
    if stats_ctf is not None:
        ctf_power = radial_profile(stats_ctf.double().square(), freqs, shells)
    else:
        ctf_power = torch.ones(shells, dtype=torch.float64)
    floor = 1e-3 * float(power.abs().max())
    return (power.clamp_min(floor) / ctf_power.clamp_min(0.05)).sqrt().to(torch.float32)
