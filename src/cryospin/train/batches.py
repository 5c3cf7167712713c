"""Batches of training data: the :class:`Batch` type, the random batch order of an epoch, and
the loss disc's sub-discs.

Conventions (``docs/conventions.md``): images `(B, L, L)` indexed ``[y, x]``; Hartley values
and CTF on the loss disc `(B, P)`, frequencies ``(kx, ky)`` in cycles per box in the row-major
order of :func:`cryospin.forward.lattice.disc_frequencies`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.forward.lattice import negation_permutation

__all__ = [
    "Batch",
    "LossDisc",
    "sub_disc",
    "gaussian_lowpass",
    "batch_indices",
    "num_batches",
    "batch_sizes",
]


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

    def select(self, rows: Tensor) -> Batch:
        """The batch's rows ``rows`` `(n,)` (positions in it), as a whole batch to score
        (not a rank's part of a distributed one)."""
        return Batch(
            indices=self.indices[rows],
            images=self.images[rows],
            hartley=self.hartley[rows],
            ctf=None if self.ctf is None else self.ctf[rows],
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


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches :func:`batch_indices` cuts ``n`` items into."""
    sizes = [batch_size] * (n // batch_size)
    if n % batch_size:
        sizes.append(n % batch_size)
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes
