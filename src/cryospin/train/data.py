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
from typing import Any

import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.hartley import hartley2
from cryospin.forward.lattice import disc_frequencies, negation_permutation
from cryospin.train.config import DataConfig

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
class Batch:
    """One batch of training data (all on the training device).

    Attributes
    ----------
    indices : `(B,)` int64
        Particle indices (rows of the pose table).
    images : `(B, L, L)` float32
        Normalised real-space images (encoder input).
    hartley : `(B, P)` float32
        Hartley values of the images on the loss disc.
    ctf : `(B, P)` float32 or None
        CTF on the loss disc (None when CTF is ignored).
    global_size : int or None
        Distributed (sharded data): the size of the global batch this batch is this rank's
        part of (the rows it holds, possibly none); None: the batch is whole.
    """

    indices: Tensor
    images: Tensor
    hartley: Tensor
    ctf: Tensor | None
    global_size: int | None = None

    def restrict(self, disc: LossDisc) -> Batch:
        """The same batch with ``hartley`` and ``ctf`` on the sub-disc ``disc`` only."""
        cols = disc.columns
        return Batch(
            indices=self.indices,
            images=self.images,
            hartley=self.hartley[:, cols],
            ctf=None if self.ctf is None else self.ctf[:, cols],
            global_size=self.global_size,
        )


@dataclass(frozen=True)
class LossDisc:
    """A smaller loss disc ``|k| ≤ radius_px`` inside the training disc.

    Attributes
    ----------
    radius_px : float
        Radius in cycles per box.
    columns : `(P',)` int64
        Positions of its frequencies among the training disc's ``P`` (row-major order kept).
    frequencies : `(P', 2)` float32
        ``(kx, ky)`` in cycles per box.
    negation_index : `(P',)` int64
        ``frequencies[negation_index] == −frequencies``.
    """

    radius_px: float
    columns: Tensor
    frequencies: Tensor
    negation_index: Tensor


def sub_disc(frequencies: Tensor, box_px: int, radius_px: float) -> LossDisc:
    """The frequencies of ``frequencies`` `(P, 2)` with ``|k| ≤ radius_px``, as a :class:`LossDisc`.

    The sub-disc is closed under ``k → −k`` whenever the full disc is.
    """
    k2 = frequencies.double().square().sum(-1)  # (P,)
    columns = torch.nonzero(k2 <= float(radius_px) ** 2, as_tuple=False).squeeze(-1)
    freqs = frequencies[columns]  # (P', 2)
    return LossDisc(
        radius_px=float(radius_px),
        columns=columns,
        frequencies=freqs,
        negation_index=negation_permutation(freqs.cpu(), box_px).to(freqs.device),
    )


def gaussian_lowpass(images: Tensor, sigma_px: float) -> Tensor:
    """Images `(B, L, L)` filtered by ``exp(−|k|² / (2 σ²))`` (``k`` in cycles per box).

    A new tensor of the same dtype; the DC term (image mean) is unchanged.
    """
    L = images.shape[-1]
    k = torch.fft.fftfreq(L, d=1.0 / L, device=images.device, dtype=torch.float64)  # (L,)
    k2 = k[:, None] ** 2 + k[None, :] ** 2  # (L, L), uncentred FFT order
    filt = torch.exp(-k2 / (2.0 * float(sigma_px) ** 2)).to(images.dtype)  # (L, L)
    return torch.fft.ifft2(torch.fft.fft2(images) * filt).real.to(images.dtype)


@dataclass(frozen=True)
class TrainingData:
    """Preprocessed particles (see the module docstring).

    When the dataset fits in ``DataConfig.max_preload_gb``, ``images``, ``hartley`` and ``ctf``
    hold every particle (computed once). Otherwise they are None and :meth:`batch` reads and
    preprocesses each batch from ``source`` (memory-mapped stacks) with the same function.

    **Sharded** (distributed training, :meth:`holding`): the data hold only the particles
    ``held`` (a rank's shard, ``i mod W == rank``). In memory, the arrays have one row per held
    particle (``images[k]`` is particle ``held[k]``) and everything stays indexed by *global*
    particle index: :meth:`batch` maps global indices to rows (:meth:`local_rows`) and raises
    for particles not held; :meth:`epoch_batches` draws the same global batches as one process
    and yields the held part of each (:attr:`Batch.global_size` set), reading and preprocessing
    held particles only. ``num_particles`` stays the global ``N``.

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
        the mean CTF power; used to initialise the volume.
    image_scale : float
        Factor applied to the raw images.
    use_ctf : bool
    images : `(N, L, L)` float32 or None
        Sharded: `(n_held, L, L)`, row ``k`` is particle ``held[k]`` (also ``hartley``, ``ctf``).
    hartley : `(N, P)` float32 or None
    ctf : `(N, P)` float32 or None
    source : ParticleSet or None
        Where batches are read from when not preloaded.
    config : DataConfig or None
        The preprocessing configuration (keys the on-disk cache).
    cache : cryospin.train.stream.PreprocessedCache or None
        Float16 preprocessed images read by the streaming loader (``config.cache_dir``).
    held : `(n_held,)` int64 or None
        Sharded: the global indices of the particles these data hold, increasing (CPU);
        None: every particle.
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
    images: Tensor | None = None
    hartley: Tensor | None = None
    ctf: Tensor | None = None
    source: Any = None
    config: DataConfig | None = None
    cache: Any = None
    held: Tensor | None = None

    def __len__(self) -> int:
        return self.num_particles

    @property
    def device(self) -> torch.device:
        return self.frequencies.device

    @property
    def preloaded(self) -> bool:
        return self.images is not None

    @property
    def sharded(self) -> bool:
        """Whether these data hold only some particles (:attr:`held`)."""
        return self.held is not None

    @property
    def num_held(self) -> int:
        """Number of particles held: ``len(held)``, or ``N`` when not sharded."""
        return self.num_particles if self.held is None else int(self.held.numel())

    def holds(self, indices: Tensor) -> Tensor:
        """Boolean mask `(B,)` (CPU): which global particle ``indices`` `(B,)` are held."""
        idx = indices.detach().cpu().to(torch.int64)
        if self.held is None:
            return (idx >= 0) & (idx < self.num_particles)
        held = self.held
        if held.numel() == 0:
            return torch.zeros(idx.shape, dtype=torch.bool)
        pos = torch.searchsorted(held, idx).clamp_max(held.numel() - 1)
        return held[pos] == idx

    def local_rows(self, indices: Tensor) -> Tensor:
        """Rows `(B,)` int64 (CPU) of the held arrays for global particle ``indices`` `(B,)`.

        The identity when not sharded; else the position of each index in :attr:`held`.

        Raises
        ------
        ValueError
            When some of ``indices`` are not held (another rank owns them).
        """
        idx = indices.detach().cpu().to(torch.int64)
        if self.held is None:
            return idx
        ok = self.holds(idx)
        if not bool(ok.all()):
            missing = idx[~ok]
            shown = ", ".join(str(int(i)) for i in missing[:5])
            raise ValueError(
                f"particles {shown}{', ...' if missing.numel() > 5 else ''} "
                f"({missing.numel()} of {idx.numel()} requested) are not held by this process, "
                f"which holds {self.num_held} of {self.num_particles} particles (its shard); "
                "use TrainingData.unsharded() to read any particle from the stacks"
            )
        return torch.searchsorted(self.held, idx)

    def batch(self, indices: Tensor) -> Batch:
        """Rows ``indices`` `(B,)` (global particle indices) as a :class:`Batch` (on
        :attr:`device`). Sharded: raises ValueError for particles not held."""
        idx = indices.to(self.device)
        rows = self.local_rows(indices)  # (B,) CPU; checks that the particles are held
        if self.images is not None and self.hartley is not None:
            rows = rows.to(self.images.device)
            return Batch(
                indices=idx,
                images=self.images[rows],
                hartley=self.hartley[rows],
                ctf=None if self.ctf is None else self.ctf[rows],
            )
        images, hart, ctf = self.load_rows(indices)
        dev = self.device
        return Batch(
            indices=idx,
            images=images.to(dev),
            hartley=hart.to(dev),
            ctf=None if ctf is None else ctf.to(dev),
        )

    def load_rows(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Read and preprocess particles ``indices`` `(c,)` from ``source`` (CPU, float32).

        Returns ``images`` `(c, L, L)`, ``hartley`` `(c, P)`, ``ctf`` `(c, P)` or None. The
        resident pages of the stacks read are handed back (see :mod:`cryospin.train.stream`).
        Reads any particle (held or not); ``c = 0`` reads nothing.
        """
        from cryospin.train.stream import release_pages

        idx = indices.cpu()
        if idx.numel() == 0:
            L, P = self.box_px, int(self.frequencies.shape[0])
            empty = torch.empty(0, P, dtype=torch.float32)
            return (torch.empty(0, L, L, dtype=torch.float32), empty,
                    empty.clone() if self.use_ctf else None)
        out = _preprocess(self.source, idx, self.image_scale, self.frequencies.cpu(), self.use_ctf)
        release_pages(self.source, idx)
        return out

    def epoch_batches(
        self, batch_size: int, generator: torch.Generator, options: Any = None
    ) -> Iterator[Batch]:
        """The batches of one epoch in random order (drawn from ``generator`` now).

        Preloaded: the permutation of :func:`batch_indices` (seeded runs unchanged). Otherwise
        the chunked streaming loader (:func:`cryospin.train.stream.stream_epoch`, ``options``
        a :class:`~cryospin.train.stream.StreamOptions`): chunk order and windows shuffled,
        background prefetch. Both yield :func:`num_batches` batches.

        Sharded: the same global batches (the same draws from ``generator``), each reduced to
        the particles held (in the batch's order, possibly none), with ``global_size`` set.
        """
        if self.preloaded:
            order = batch_indices(self.num_particles, batch_size, generator)
            if self.held is None:
                return (self.batch(idx) for idx in order)
            return (self._held_part(idx) for idx in order)
        from cryospin.train.stream import stream_epoch

        return stream_epoch(self, batch_size, generator, options)

    def _held_part(self, indices: Tensor) -> Batch:
        part = self.batch(indices[self.holds(indices)])
        return dataclasses.replace(part, global_size=int(indices.numel()))

    def holding(self, indices: Tensor | None) -> TrainingData:
        """These data restricted to the particles ``indices`` `(n,)` (global, any order;
        a distributed rank's shard, ``Shard.owned(N)``); None: every particle.

        Lazy data stay lazy (finish with :meth:`in_memory` or :meth:`streaming`, which then
        read and preprocess these particles only); preloaded data keep the rows of
        ``indices``, which must be held.
        """
        if indices is None:
            if self.held is None:
                return self
            return self.unsharded()
        held = torch.unique(torch.as_tensor(indices, dtype=torch.int64).cpu())  # sorted
        if held.numel() and (int(held[0]) < 0 or int(held[-1]) >= self.num_particles):
            raise ValueError(f"particle indices outside 0..{self.num_particles - 1}")
        if self.images is None or self.hartley is None:
            return dataclasses.replace(self, held=held)
        rows = self.local_rows(held).to(self.images.device)
        return dataclasses.replace(
            self, images=self.images[rows], hartley=self.hartley[rows],
            ctf=None if self.ctf is None else self.ctf[rows], held=held,
        )

    def unsharded(self) -> TrainingData:
        """Every particle: these data themselves when they hold all; else a lazy view that
        reads and preprocesses any particle from ``source`` on demand (for rank 0's
        diagnostics and final outputs, not for training)."""
        if self.held is None:
            return self
        if self.source is None:
            raise ValueError("sharded training data without a source cannot read other "
                             "particles")
        return dataclasses.replace(self, images=None, hartley=None, ctf=None, held=None)

    def in_memory(self) -> TrainingData:
        """A copy with every particle held (sharded: the :attr:`held` ones only) preprocessed
        once and kept in memory (on :attr:`device`)."""
        if self.preloaded:
            return self
        ids = torch.arange(self.num_particles) if self.held is None else self.held
        n, L, P = int(ids.numel()), self.box_px, int(self.frequencies.shape[0])
        images = torch.empty(n, L, L, dtype=torch.float32)
        hart = torch.empty(n, P, dtype=torch.float32)
        ctf = torch.empty(n, P, dtype=torch.float32) if self.use_ctf else None
        for start in range(0, n, _CHUNK):
            idx = ids[start:start + _CHUNK]
            stop = start + int(idx.numel())
            x, h, c = self.load_rows(idx)
            images[start:stop], hart[start:stop] = x, h
            if ctf is not None and c is not None:
                ctf[start:stop] = c
        dev = self.device
        return dataclasses.replace(
            self, images=images.to(dev), hartley=hart.to(dev),
            ctf=None if ctf is None else ctf.to(dev), cache=None,
        )

    def streaming(self) -> TrainingData:
        """This lazy data, with the preprocessed-image cache of ``config.cache_dir`` attached
        (built on first use) when one is configured. Sharded: its streamed epochs read and
        preprocess (or read from the cache) the :attr:`held` particles only."""
        cache_dir = getattr(self.config, "cache_dir", None)
        if self.preloaded or cache_dir is None or self.cache is not None:
            return self
        from cryospin.train.stream import open_cache

        return dataclasses.replace(self, cache=open_cache(self, cache_dir))

    def summary(self) -> dict[str, Any]:
        """Small JSON-ready description (sizes, noise, scale)."""
        return {
            "num_particles": len(self),
            "box_px": self.box_px,
            "pixel_size_angstrom": self.pixel_size_angstrom,
            "num_frequencies": int(self.frequencies.shape[0]),
            "noise_variance_hartley": self.noise_variance,
            "image_scale": self.image_scale,
            "ctf": self.use_ctf,
            "preloaded": self.preloaded,
        }


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """A random permutation of ``range(n)`` cut into batches `(≤ batch_size,)` (last is partial).

    The permutation is drawn from ``generator`` (a CPU generator) when this is called, so the
    generator's state after the call determines the next epoch's order. A last batch of a
    single image is merged into the previous one (batch normalisation needs two images).
    """
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return iter(batches)


def num_batches(n: int, batch_size: int) -> int:
    """Number of batches :func:`batch_indices` yields for ``n`` items."""
    count = -(-n // batch_size)
    if count > 1 and n % batch_size == 1:
        count -= 1
    return count


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


def _read_sample(particles: Any, indices: Tensor) -> Tensor:
    """Images `(m, L, L)` of the spread-out ``indices``, read in small groups whose memory-mapped
    pages are handed back after each group. A page fault on a memory-mapped stack can map a whole
    large page-cache folio (measured: reading 2,000 images 70 apart mapped the whole 2.3 GB
    stack), so without the hand-back this sample alone would make the stack resident."""
    from cryospin.train.stream import release_pages

    parts = []
    for i in range(0, len(indices), _SAMPLE_CHUNK):
        part_idx = indices[i : i + _SAMPLE_CHUNK]
        parts.append(particles.images(part_idx))
        release_pages(particles, part_idx)
    return torch.cat(parts)


def _stats_indices(n: int) -> Tensor:
    """Evenly spaced indices of at most ``_STATS_IMAGES`` particles (deterministic)."""
    m = min(n, _STATS_IMAGES)
    return torch.linspace(0, n - 1, m).round().long().unique()


def _preprocess(
    particles: Any, idx: Tensor, scale: float, frequencies: Tensor, use_ctf: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Read particles ``idx`` `(c,)` and preprocess them (CPU, float32).

    Returns
    -------
    images : `(c, L, L)` scaled real-space images.
    hartley : `(c, P)` their Hartley values on the disc ``frequencies`` `(P, 2)`.
    ctf : `(c, P)` or None.
    """
    from cryospin.forward.ctf import compute_ctf

    L = int(particles.box_px)
    where = getattr(particles, "source", None)
    raw = particles.images(idx)
    if tuple(raw.shape) != (len(idx), L, L):
        raise InputError(f"images have shape {tuple(raw.shape[1:])}, expected ({L}, {L})", where)
    x = raw.to(torch.float64) * scale  # (c, L, L)
    if not torch.isfinite(x).all():
        first = int(idx[0]) if len(idx) else 0
        raise InputError(f"particle images near index {first} contain NaN or Inf", where)
    k = torch.round(frequencies).long()  # (P, 2) integer (kx, ky)
    flat = (k[:, 1] + L // 2) * L + (k[:, 0] + L // 2)  # (P,) row-major [y, x]
    hart = hartley2(x).reshape(len(idx), L * L)[:, flat]  # (c, P)
    mask = getattr(particles, "encoder_mask", None)  # (L, L) soft mask of the encoder input
    if mask is not None:
        x = x * mask.to(x.dtype)  # the loss (hart) stays unmasked
    ctf = None
    if use_ctf:
        ctf = compute_ctf(
            particles.ctf[idx], L, float(particles.pixel_size_angstrom),
            frequencies=frequencies.to(torch.float64),
        ).to(torch.float32)  # (c, P)
    return x.to(torch.float32), hart.to(torch.float32), ctf


def prepare_data(
    particles: Any,
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
    particles : cryospin.io.particles.ParticleSet
        Needs ``box_px``, ``pixel_size_angstrom``, ``ctf`` (or ``config.no_ctf``), ``len()`` and
        ``images(indices) -> (n, L, L)``.
    config : DataConfig
    device : torch device
        Where the tensors live during training.

    Returns
    -------
    TrainingData
    """
    from cryospin.preprocess import PreprocessedParticles
    from cryospin.train.stream import release_pages

    # Fourier crop / background normalisation / encoder mask on the fly, chunk by chunk
    # (the view is the `source` of lazy batches too, so both paths preprocess identically)
    particles = PreprocessedParticles.wrap(
        particles, box_px=config.box_px, normalize=config.normalize,
        mask_radius_fraction=config.mask_radius_fraction, mask_edge_px=config.mask_edge_px,
    )
    n = len(particles)
    L = int(particles.box_px)
    where = getattr(particles, "source", None)
    if n == 0:
        raise InputError("no particles to train on", where)
    if L < 8:
        raise InputError(f"box size {L} px is too small (need >= 8)", where)
    radius = config.loss_radius_px
    if radius is not None and radius > L // 2 - 1:
        raise InputError(
            f"loss radius {radius} px exceeds the largest disc of a {L} px box ({L // 2 - 1})"
        )
    use_ctf = not config.no_ctf
    if use_ctf and particles.ctf is None:
        raise InputError(
            "particles have no CTF parameters (give --ctf, or --no-ctf to ignore the CTF)", where
        )
    freqs = disc_frequencies(L, radius)  # (P, 2) float32
    neg = negation_permutation(freqs, L)  # (P,)
    P = int(freqs.shape[0])

    # --- normalisation and noise from a deterministic sample of images
    stats_idx = _stats_indices(n)
    sample = _read_sample(particles, stats_idx).to(torch.float64)  # (m, L, L)
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
    noise_var_hartley = noise_var_real * L * L

    # --- radial amplitude of the signal, for the volume initialisation
    shells = L // 2 + 1
    parts = []  # in chunks: the transient memory of the FFTs stays bounded
    for i in range(0, len(stats_idx), _SAMPLE_CHUNK):
        part_idx = stats_idx[i : i + _SAMPLE_CHUNK]
        _, h_part, c_part = _preprocess(particles, part_idx, scale, freqs, use_ctf)
        release_pages(particles, part_idx)
        parts.append((h_part, c_part))
    stats_h = torch.cat([h for h, _ in parts])  # (m, P)
    stats_ctf = None if parts[0][1] is None else torch.cat([c for _, c in parts])  # (m, P)
    del parts
    power = radial_profile(stats_h.double().square(), freqs, shells) - noise_var_hartley
    if stats_ctf is not None:
        ctf_power = radial_profile(stats_ctf.double().square(), freqs, shells)
    else:
        ctf_power = torch.ones(shells, dtype=torch.float64)
    floor = 1e-3 * float(power.abs().max())
    amplitude = (power.clamp_min(floor) / ctf_power.clamp_min(0.05)).sqrt().to(torch.float32)

    dev = torch.device(device)
    common = {
        "box_px": L,
        "pixel_size_angstrom": float(particles.pixel_size_angstrom),
        "num_particles": n,
        "frequencies": freqs.to(dev),
        "negation_index": neg.to(dev),
        "noise_variance": float(noise_var_hartley),
        "radial_amplitude": amplitude,
        "image_scale": float(scale),
        "use_ctf": use_ctf,
    }
    lazy = TrainingData(**common, source=particles, config=config)
    if preload is False:  # the caller attaches the cache (``streaming()``) or preloads later
        return lazy
    if preload is None:
        preload = 4 * n * (L * L + P * (2 if use_ctf else 1)) <= config.max_preload_gb * 1e9
    # in memory: everything once, in chunks; else batches read from the stacks (or the cache)
    return lazy.in_memory() if preload else lazy.streaming()
