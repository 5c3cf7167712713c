"""Training rows: a particle's preprocessed image, its Hartley values on the loss disc and its
CTF there, made by :class:`RowReader` from an image source; :class:`HeldParticles`, the map from
global particle indices to the rows a (possibly sharded) row source holds. The row sources
themselves are in :mod:`cryospin.train.row_source`.

Conventions (``docs/conventions.md``): images `(n, L, L)` indexed ``[y, x]``; Hartley values
of the centred transform (unnormalised forward); frequencies ``(kx, ky)`` in cycles per box on
the loss disc, in the row-major order of :func:`cryospin.forward.lattice.disc_frequencies`.
All rows are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import hartley2
from cryospin.sources import ImageSource, release_pages

__all__ = ["Rows", "RowReader", "HeldParticles", "preprocess_rows"]


class Rows(NamedTuple):
    """Preprocessed rows of ``c`` particles (CPU or the training device, float32).

    Attributes
    ----------
    images : `(c, L, L)`
        Scaled real-space images (the encoder's input, soft mask applied when configured).
    hartley : `(c, P)`
        Hartley values of the scaled, unmasked images on the loss disc.
    ctf : `(c, P)` or None
        CTF on the loss disc (None when the CTF is ignored).
    """

    images: Tensor
    hartley: Tensor
    ctf: Tensor | None


def preprocess_rows(
    particles: ImageSource, idx: Tensor, scale: float, frequencies: Tensor, use_ctf: bool,
    encoder_mask: Tensor | None = None, whitening: Tensor | None = None,
) -> Rows:
    """Read particles ``idx`` `(c,)` from ``particles`` and preprocess them (CPU, float32).

    The images are multiplied by ``scale``; their Hartley values are taken on the disc
    ``frequencies`` `(P, 2)`; ``encoder_mask`` `(L, L)` (or None) multiplies the encoder's
    images only (the Hartley values stay unmasked); the CTF is computed when ``use_ctf``.
    ``whitening`` `(P,)` (or None; only with ``use_ctf``) multiplies both the Hartley values
    and the CTF (:func:`cryospin.noise_spectrum.whitening_filter`: the noise becomes white;
    the encoder's images stay as they are).
    """
    if whitening is not None and not use_ctf:
        raise ValueError("whitening multiplies the CTF rows: it needs use_ctf")
    L = int(particles.box_px)
    where = particles.source
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
    if encoder_mask is not None:
        x = x * encoder_mask.to(x.dtype)  # the loss (hart) stays unmasked
    ctf = None
    if use_ctf:
        params = particles.ctf
        if not isinstance(params, CTFParams):
            raise InputError("particles have no CTF parameters", where)
        ctf = compute_ctf(
            params[idx], L, float(particles.pixel_size_angstrom),
            frequencies=frequencies.to(torch.float64),
        ).to(torch.float32)  # (c, P)
    if whitening is not None and ctf is not None:
        w = whitening.to(torch.float64)
        hart = hart * w
        ctf = (ctf.to(torch.float64) * w).to(torch.float32)
    return Rows(x.to(torch.float32), hart.to(torch.float32), ctf)


@dataclass(frozen=True)
class RowReader:
    """Reads and preprocesses any particle's training row (:func:`preprocess_rows`).

    Attributes
    ----------
    view : ImageSource
        Where the images are read from (the particle set, or a cropping/normalising view of
        it, :class:`cryospin.preprocess.PreprocessedParticles`).
    stored : ImageSource
        The particle set under ``view`` (the same particle order): its stacks give the storage
        order and have their pages handed back after each read.
    image_scale : float
        Factor applied to the images read.
    frequencies : `(P, 2)` float32 (CPU)
        The loss disc, cycles per box.
    use_ctf : bool
    encoder_mask : `(L, L)` or None
        Soft mask of the encoder's input.
    whitening : `(P,)` float64 or None
        The noise-whitening filter on ``frequencies`` (:func:`preprocess_rows`).
    """

    view: ImageSource
    stored: ImageSource
    image_scale: float
    frequencies: Tensor
    use_ctf: bool
    encoder_mask: Tensor | None = None
    whitening: Tensor | None = None

    @property
    def box_px(self) -> int:
        return int(self.view.box_px)

    @property
    def num_particles(self) -> int:
        return len(self.view)

    def read(self, indices: Tensor) -> Rows:
        """Rows of particles ``indices`` `(c,)` (CPU, float32); ``c = 0`` reads nothing.

        The resident pages of the stacks read are handed back afterwards."""
        idx = indices.cpu()
        if idx.numel() == 0:
            L, P = self.box_px, int(self.frequencies.shape[0])
            empty = torch.empty(0, P, dtype=torch.float32)
            return Rows(torch.empty(0, L, L, dtype=torch.float32), empty,
                        empty.clone() if self.use_ctf else None)
        out = preprocess_rows(self.view, idx, self.image_scale, self.frequencies,
                              self.use_ctf, self.encoder_mask, self.whitening)
        release_pages(self.stored, idx)
        return out


@dataclass(frozen=True)
class HeldParticles:
    """Which of ``num_particles`` particles a row source holds, and where their rows are.

    Distributed training shards the data: a rank holds the particles ``i mod W == rank``
    (:meth:`cryospin.train.distributed.Shard.owned`). Everything stays indexed by *global*
    particle index; a source with one row per held particle finds particle ``indices[k]`` in
    its row ``k`` (:meth:`local_rows`).

    Attributes
    ----------
    num_particles : int
        The global ``N``.
    indices : `(n_held,)` int64 or None
        The global indices of the particles held, increasing (CPU); None: every particle.
    """

    num_particles: int
    indices: Tensor | None = None

    @classmethod
    def of(cls, indices: Tensor, num_particles: int) -> HeldParticles:
        """The particles ``indices`` `(n,)` (global, any order, repeats allowed) of
        ``num_particles``; raises ValueError for indices outside ``0..N-1``."""
        held = torch.unique(torch.as_tensor(indices, dtype=torch.int64).cpu())  # sorted
        if held.numel() and (int(held[0]) < 0 or int(held[-1]) >= num_particles):
            raise ValueError(f"particle indices outside 0..{num_particles - 1}")
        return cls(num_particles, held)

    @property
    def sharded(self) -> bool:
        """Whether only some particles are held (:attr:`indices` set)."""
        return self.indices is not None

    @property
    def num_held(self) -> int:
        """Number of particles held: ``len(indices)``, or ``N`` when not sharded."""
        return self.num_particles if self.indices is None else int(self.indices.numel())

    def ids(self) -> Tensor:
        """The global indices `(n_held,)` int64 (CPU) of the particles held, increasing."""
        return torch.arange(self.num_particles) if self.indices is None else self.indices

    def holds(self, indices: Tensor) -> Tensor:
        """Boolean mask `(B,)` (CPU): which global particle ``indices`` `(B,)` are held."""
        idx = indices.detach().cpu().to(torch.int64)
        if self.indices is None:
            return (idx >= 0) & (idx < self.num_particles)
        held = self.indices
        if held.numel() == 0:
            return torch.zeros(idx.shape, dtype=torch.bool)
        pos = torch.searchsorted(held, idx).clamp_max(held.numel() - 1)
        return held[pos] == idx

    def local_rows(self, indices: Tensor) -> Tensor:
        """Rows `(B,)` int64 (CPU) of the held rows for global particle ``indices`` `(B,)`.

        The identity when not sharded; else the position of each index in :attr:`indices`.

        Raises
        ------
        ValueError
            When some of ``indices`` are not held (another rank owns them).
        """
        idx = indices.detach().cpu().to(torch.int64)
        if self.indices is None:
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
        return torch.searchsorted(self.indices, idx)
