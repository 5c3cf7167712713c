"""Training rows: a particle's preprocessed image, its Hartley values on the loss disc and its
CTF there, made by :class:`RowReader` from an image source or held by :class:`InMemoryRows`.

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

__all__ = ["Rows", "RowReader", "InMemoryRows", "preprocess_rows"]


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
    encoder_mask: Tensor | None = None,
) -> Rows:
    """Read particles ``idx`` `(c,)` from ``particles`` and preprocess them (CPU, float32).

    The images are multiplied by ``scale``; their Hartley values are taken on the disc
    ``frequencies`` `(P, 2)`; ``encoder_mask`` `(L, L)` (or None) multiplies the encoder's
    images only (the Hartley values stay unmasked); the CTF is computed when ``use_ctf``.
    """
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
    """

    view: ImageSource
    stored: ImageSource
    image_scale: float
    frequencies: Tensor
    use_ctf: bool
    encoder_mask: Tensor | None = None

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
                              self.use_ctf, self.encoder_mask)
        release_pages(self.stored, idx)
        return out


@dataclass(frozen=True)
class InMemoryRows:
    """Training rows held in memory (one row per held particle, on the training device).

    Attributes
    ----------
    images : `(n, L, L)` float32
    hartley : `(n, P)` float32
    ctf : `(n, P)` float32 or None
    """

    images: Tensor
    hartley: Tensor
    ctf: Tensor | None

    def take(self, rows: Tensor) -> Rows:
        """The rows ``rows`` `(B,)` int64 (positions in these arrays)."""
        rows = rows.to(self.images.device)
        return Rows(self.images[rows], self.hartley[rows],
                    None if self.ctf is None else self.ctf[rows])

    @classmethod
    def read_all(cls, reader: RowReader, ids: Tensor, device: torch.device,
                 chunk: int) -> InMemoryRows:
        """Rows of the particles ``ids`` `(n,)` read by ``reader`` in chunks of ``chunk``
        particles (bounded transient memory), then moved to ``device``."""
        n, L, P = int(ids.numel()), reader.box_px, int(reader.frequencies.shape[0])
        images = torch.empty(n, L, L, dtype=torch.float32)
        hart = torch.empty(n, P, dtype=torch.float32)
        ctf = torch.empty(n, P, dtype=torch.float32) if reader.use_ctf else None
        for start in range(0, n, chunk):
            idx = ids[start:start + chunk]
            stop = start + int(idx.numel())
            x, h, c = reader.read(idx)
            images[start:stop], hart[start:stop] = x, h
            if ctf is not None and c is not None:
                ctf[start:stop] = c
        return cls(images.to(device), hart.to(device), None if ctf is None else ctf.to(device))
