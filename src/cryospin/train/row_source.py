"""Row sources: where the trainer's batches come from, one protocol and two implementations.

:class:`RowSource` is what :class:`cryospin.train.data.TrainingData` delegates to: the rows of
given particles (:meth:`RowSource.batch`) and the batches of one epoch in random order
(:meth:`RowSource.epoch_batches`), both indexed by *global* particle index, plus the steps that
finish or restrict a source. Two sources implement it:

- :class:`InMemoryRows`: every held particle preprocessed once and kept on the training device;
  an epoch is the permutation of :func:`cryospin.train.batches.batch_indices`.
- :class:`StreamedRows`: rows read and preprocessed on demand by a
  :class:`~cryospin.train.rows.RowReader` (or read from the float16 cache); an epoch is the
  chunked loader of :func:`cryospin.train.stream.stream_epoch`.

Both preprocess with the same function (:func:`cryospin.train.rows.preprocess_rows`), so a
particle's row is the same from either (the cache aside: float16). Their epochs draw different
orders from the generator (a permutation of particles, or of chunks then of particles within
windows); each is exactly reproducible from the generator's state.

**Sharded** (distributed training): a source holds only the particles of its
:class:`~cryospin.train.rows.HeldParticles` (a rank's shard, ``i mod W == rank``).
:meth:`RowSource.batch` raises for particles not held; :meth:`RowSource.epoch_batches` draws
the same global batches as one process (the same draws from the generator) and yields the held
part of each (:attr:`Batch.global_size` set), reading and preprocessing held particles only.

Conventions (``docs/conventions.md``): images `(B, L, L)` indexed ``[y, x]``; Hartley values and
CTF `(B, P)` on the loss disc; all rows float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from cryospin.train.batches import Batch, batch_indices
from cryospin.train.cache import PreprocessedCache, open_cache
from cryospin.train.config import DataConfig
from cryospin.train.rows import HeldParticles, RowReader, Rows
from cryospin.train.stream import StreamOptions, stream_epoch

__all__ = ["RowSource", "InMemoryRows", "StreamedRows"]


@runtime_checkable
class RowSource(Protocol):
    """Training rows by global particle index (see the module docstring)."""

    @property
    def held(self) -> HeldParticles:
        """The particles this source holds (all of them unless sharded)."""
        ...

    @property
    def resident(self) -> Rows | None:
        """Every held row in memory (row ``k`` is particle ``held.ids()[k]``), or None when
        the rows are read on demand."""
        ...

    def batch(self, indices: Tensor) -> Batch:
        """Rows of particles ``indices`` `(B,)` (global) as a :class:`Batch` on the training
        device; raises ValueError for particles not held."""
        ...

    def epoch_batches(self, batch_size: int, generator: torch.Generator,
                      options: StreamOptions | None = None) -> Iterator[Batch]:
        """The batches of one epoch in random order, drawn from ``generator`` now (sharded: the
        held part of each global batch). ``options`` tune the streaming loader only."""
        ...

    def holding(self, held: HeldParticles) -> RowSource:
        """This source restricted to the particles ``held`` (in memory: they must be held)."""
        ...

    def in_memory(self, chunk: int) -> RowSource:
        """Every held row preprocessed once and kept in memory (read ``chunk`` particles at a
        time); the source itself when it is in memory."""
        ...

    def with_cache(self, config: DataConfig | None) -> RowSource:
        """Streamed epochs read from the float16 cache of ``config.cache_dir`` (built on first
        use); the source itself when in memory, already cached, or without a cache folder."""
        ...


@dataclass(frozen=True)
class InMemoryRows:
    """Training rows held in memory, one per held particle, on the training device.

    Attributes
    ----------
    images : `(n, L, L)` float32
    hartley : `(n, P)` float32
    ctf : `(n, P)` float32 or None
        None when the CTF is ignored.
    held : HeldParticles
        Row ``k`` is particle ``held.ids()[k]`` (``n = held.num_held``).
    """

    images: Tensor
    hartley: Tensor
    ctf: Tensor | None
    held: HeldParticles

    @classmethod
    def read_all(cls, reader: RowReader, held: HeldParticles, device: torch.device,
                 chunk: int) -> InMemoryRows:
        """Rows of the particles ``held`` read by ``reader`` in chunks of ``chunk`` particles
        (bounded transient memory), then moved to ``device``."""
        ids = held.ids()
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
        return cls(images.to(device), hart.to(device), None if ctf is None else ctf.to(device),
                   held)

    @property
    def resident(self) -> Rows:
        return Rows(self.images, self.hartley, self.ctf)

    def take(self, rows: Tensor) -> Rows:
        """The rows ``rows`` `(B,)` int64 (positions in these arrays)."""
        rows = rows.to(self.images.device)
        return Rows(self.images[rows], self.hartley[rows],
                    None if self.ctf is None else self.ctf[rows])

    def batch(self, indices: Tensor) -> Batch:
        idx = indices.to(self.images.device)
        images, hart, ctf = self.take(self.held.local_rows(indices))  # checks they are held
        return Batch(indices=idx, images=images, hartley=hart, ctf=ctf)

    def epoch_batches(self, batch_size: int, generator: torch.Generator,
                      options: StreamOptions | None = None) -> Iterator[Batch]:
        """The permutation of :func:`batch_indices` (``options`` unused)."""
        order = batch_indices(self.held.num_particles, batch_size, generator)
        if not self.held.sharded:
            return (self.batch(idx) for idx in order)
        return (self._held_part(idx) for idx in order)

    def _held_part(self, indices: Tensor) -> Batch:
        part = self.batch(indices[self.held.holds(indices)])
        return dataclasses.replace(part, global_size=int(indices.numel()))

    def holding(self, held: HeldParticles) -> InMemoryRows:
        return InMemoryRows(*self.take(self.held.local_rows(held.ids())), held=held)

    def in_memory(self, chunk: int) -> InMemoryRows:
        return self

    def with_cache(self, config: DataConfig | None) -> InMemoryRows:
        return self


@dataclass(frozen=True)
class StreamedRows:
    """Training rows read and preprocessed on demand (or read from the float16 cache).

    Attributes
    ----------
    reader : RowReader
        Reads and preprocesses any particle's row from the image source.
    held : HeldParticles
        Sharded: the epochs read and preprocess (or read from the cache) these particles only.
    device : torch.device
        Where the batches go.
    cache : PreprocessedCache or None
        Float16 preprocessed rows read by the epochs (not by :meth:`batch`).
    """

    reader: RowReader
    held: HeldParticles
    device: torch.device
    cache: PreprocessedCache | None = None

    @property
    def resident(self) -> None:
        return None

    def batch(self, indices: Tensor) -> Batch:
        idx = indices.to(self.device)
        self.held.local_rows(indices)  # checks that the particles are held
        images, hart, ctf = self.reader.read(indices)
        dev = self.device
        return Batch(
            indices=idx,
            images=images.to(dev),
            hartley=hart.to(dev),
            ctf=None if ctf is None else ctf.to(dev),
        )

    def epoch_batches(self, batch_size: int, generator: torch.Generator,
                      options: StreamOptions | None = None) -> Iterator[Batch]:
        """The chunked streaming loader (:func:`stream_epoch`): chunk order and windows
        shuffled, background prefetch; :func:`~cryospin.train.batches.num_batches` batches."""
        return stream_epoch(self.reader, batch_size, generator, options, cache=self.cache,
                            held=self.held.indices, device=self.device)

    def holding(self, held: HeldParticles) -> StreamedRows:
        return dataclasses.replace(self, held=held)

    def in_memory(self, chunk: int) -> InMemoryRows:
        return InMemoryRows.read_all(self.reader, self.held, self.device, chunk)

    def with_cache(self, config: DataConfig | None) -> StreamedRows:
        cache_dir = None if config is None else config.cache_dir
        if config is None or cache_dir is None or self.cache is not None:
            return self
        return dataclasses.replace(self, cache=open_cache(self.reader, config, cache_dir))
