"""The image-source protocol: particle images read by index (``docs/conventions.md``).

An :class:`ImageSource` is anything the trainer, the streaming loader and the preprocessing
read particle images from: :class:`cryospin.io.particles.ParticleSet` (memory-mapped stacks),
:class:`cryospin.preprocess.PreprocessedParticles` (a cropping/normalising view of one), or an
in-memory stand-in. A :class:`StackedImageSource` also says where its images are stored
(stack files, the stack and image of every particle) and can hand back the resident pages of
its memory-mapped stacks; the streaming loader reads such a source in storage order and the
preprocessed-image cache is keyed by its files.

Conventions: images `(n, L, L)` indexed ``[y, x]``, pixel values in the stack's own units;
particle indices are 0-based positions in the source, the same in a view and in the set it
views.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor

__all__ = ["CTFTable", "ImageSource", "StackedImageSource", "release_pages", "storage_layout"]


class CTFTable(Protocol):
    """Per-particle CTF parameters indexable by particle: :class:`cryospin.forward.ctf.CTFParams`
    (fields `(N,)` in physical units; ``docs/conventions.md``, "CTF"). Structural, so that this
    core module need not import ``forward``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: object) -> CTFTable: ...


@runtime_checkable
class ImageSource(Protocol):
    """Particle images read by index.

    Attributes
    ----------
    box_px : int
        Image side ``L`` (pixels).
    pixel_size_angstrom : float
        Pixel size (Å).
    ctf : CTFTable or None
        Per-particle CTF parameters `(N,)` (a :class:`cryospin.forward.ctf.CTFParams`), None
        when the source has none.
    source : Path or None
        The file the particles come from (named in error messages).
    """

    @property
    def box_px(self) -> int: ...

    @property
    def pixel_size_angstrom(self) -> float: ...

    @property
    def ctf(self) -> CTFTable | None: ...

    @property
    def source(self) -> Path | None: ...

    def __len__(self) -> int:
        """Number of particles ``N``."""
        ...

    def images(self, indices: Tensor) -> Tensor:
        """Images `(n, L, L)` of the particles ``indices`` `(n,)` int64, in that order
        (float32 or float64, indexed ``[y, x]``)."""
        ...


@runtime_checkable
class StackedImageSource(ImageSource, Protocol):
    """An :class:`ImageSource` read from memory-mapped stack files.

    Attributes
    ----------
    stack_paths : sequence of Path
        The stack files.
    stack_index, image_index : `(N,)` int64
        Stack (position in ``stack_paths``) and 0-based image in that stack of every particle.
    """

    @property
    def stack_paths(self) -> Sequence[Path]: ...

    @property
    def stack_index(self) -> np.ndarray: ...

    @property
    def image_index(self) -> np.ndarray: ...

    def release_pages(self, indices: np.ndarray) -> None:
        """Hand back the resident pages of the stacks holding particles ``indices`` `(n,)`."""
        ...


def release_pages(source: ImageSource, indices: Tensor | np.ndarray) -> None:
    """Hand back the resident memory-mapped pages of the stacks that hold particles
    ``indices`` `(n,)` (:meth:`StackedImageSource.release_pages`); a no-op for other sources."""
    if not isinstance(source, StackedImageSource):
        return
    idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
    source.release_pages(idx)


def storage_layout(
    source: ImageSource | None, n: int, chunk_images: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Storage order of the particles and its cut into chunks.

    Parameters
    ----------
    source : ImageSource or None
        A :class:`StackedImageSource`: particles are sorted by stack, then by image. Any other
        source (or None): the storage order is ``0 .. N−1``.
    n : int
        Number of particles.
    chunk_images : int
        Largest chunk.

    Returns
    -------
    order : `(N,)` int64
        ``order[r]`` is the particle stored at rank ``r``.
    chunks : list of ``(start, stop)``
        Rank ranges ``[start, stop)``; none crosses a stack boundary.
    """
    cuts: list[int] = []
    if isinstance(source, StackedImageSource) and len(source.stack_index) == n:
        stack_index = np.asarray(source.stack_index)
        order = np.lexsort((np.asarray(source.image_index), stack_index)).astype(np.int64)
        cuts = (np.flatnonzero(np.diff(stack_index[order]) != 0) + 1).tolist()
    else:
        order = np.arange(n, dtype=np.int64)
    chunks: list[tuple[int, int]] = []
    for a, b in zip([0, *cuts], [*cuts, n], strict=True):
        for s in range(a, b, chunk_images):
            chunks.append((s, min(s + chunk_images, b)))
    return order, chunks
