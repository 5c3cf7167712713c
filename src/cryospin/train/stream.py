"""Streaming epochs for datasets larger than memory: chunked contiguous reads, a chunk shuffle,
background prefetch and an optional on-disk cache of preprocessed images.

The particles are visited in *storage order* (sorted by stack, then by image within the stack)
cut into **chunks** of at most ``chunk_images`` consecutive particles of one stack, so every
read is one contiguous slice of a memory-mapped stack (stacks come from
:func:`cryospin.io.mrc.open_stack`'s cache: a file is never opened once per image). An epoch:

1. draws a random permutation of the chunks, and groups them into **windows** of
   ``window_chunks`` consecutive chunks of that permutation;
2. draws a random permutation of the particles of each window;
3. the concatenation of the windows is the epoch's particle order, cut into batches exactly as
   :func:`cryospin.train.batches.batch_indices` cuts a permutation (same count, the same merge of a
   last batch of one image).

All random numbers are drawn from the training generator when the epoch is created (as
:func:`~cryospin.train.batches.batch_indices` does), so resumed runs are exact. A background thread
reads and preprocesses the chunks in visiting order into a bounded queue (``prefetch_chunks``
ahead); torch releases the GIL in its kernels, so preprocessing overlaps training. Threads: on
CPU each Python thread running torch kernels gets its own OpenMP team of
``torch.get_num_threads()`` threads (a new thread takes the process-wide value at its first
parallel kernel), so while a chunk is preprocessed beside a training step up to twice that many
compute threads would be runnable. ``torch.set_num_threads`` is not per thread (it changes the
process-wide value), but OpenMP's own ``omp_set_num_threads`` is: the prefetch thread sets it to
1 in the OpenMP runtime torch loaded (:func:`limit_openmp_threads_of_this_thread`), so the
preprocessing adds one compute thread beside the training's, not a second team.

Sharded data (distributed training, ``held``): the plan above is drawn exactly
as by one process (the same chunks, windows and permutations, so every rank sees the same
global batches), but from each chunk only the particles the rank holds are read (the held
images of the chunk's contiguous range of one stack, or the held rows of the cache) and
preprocessed; each window's permutation is applied to the held rows, and each global batch
yields its held part (``Batch.global_size`` the global batch's size). Memory and
preprocessing per rank are therefore about ``1/W`` of a single process's.

Resident memory: pages of a memory-mapped file count in a process's resident set once touched,
so after each chunk the pages it covered are handed back (``madvise(MADV_DONTNEED)``; the data
stay in the OS page cache). Without that an epoch would grow the resident set by the whole
stack.

With the optional cache (:mod:`cryospin.train.cache`, ``DataConfig.cache_dir``) the chunks
are contiguous rows of its float16 files, read without the FFTs.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin.sources import storage_layout
from cryospin.train.batches import Batch, batch_sizes
from cryospin.train.cache import PreprocessedCache
from cryospin.train.release import return_free_memory
from cryospin.train.rows import RowReader, Rows

__all__ = [
    "StreamOptions",
    "EpochPlan",
    "plan_epoch",
    "stream_epoch",
    "limit_openmp_threads_of_this_thread",
]

_THREAD_NAME = "cryospin-prefetch"
_POLL_S = 0.05


@dataclass(frozen=True)
class StreamOptions:
    """Chunking and prefetch of the streaming loader.

    Attributes
    ----------
    chunk_images : int
        Consecutive particles of one stack read (and preprocessed) at once.
    window_chunks : int
        Chunks whose particles are shuffled together; a batch mixes particles of up to this
        many random chunks.
    prefetch_chunks : int
        Chunks the background thread may hold ready ahead of training (queue bound).
    """

    chunk_images: int = 256
    window_chunks: int = 4
    prefetch_chunks: int = 2

    def __post_init__(self) -> None:
        for name in ("chunk_images", "window_chunks", "prefetch_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"StreamOptions.{name} must be >= 1, got {getattr(self, name)}")

    def resident_images(self, batch_size: int) -> int:
        """Upper bound on the preprocessed images held at once by an epoch.

        The window being consumed (with the tail of the previous one), the chunks in the
        queue, the chunk being preprocessed, and one batch being assembled.
        """
        window = self.window_chunks * self.chunk_images
        return 2 * window + (self.prefetch_chunks + 1) * self.chunk_images + batch_size


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class EpochPlan:
    """The visiting order of one streamed epoch (all randomness drawn up front).

    Attributes
    ----------
    chunks : list of ``(start, stop)``
        Rank ranges in visiting order.
    windows : list of ``(num_chunks, permutation)``
        Consecutive groups of ``chunks``; ``permutation`` `(m,)` reorders the concatenated
        rows of the group's chunks.
    order : `(N,)` int64
        Particle indices in visiting order.
    sizes : list of int
        Batch sizes.
    """

    chunks: list[tuple[int, int]]
    windows: list[tuple[int, Tensor]]
    order: Tensor
    sizes: list[int]


def plan_epoch(
    order: np.ndarray,
    chunks: Sequence[tuple[int, int]],
    batch_size: int,
    window_chunks: int,
    generator: torch.Generator,
) -> EpochPlan:
    """Shuffle chunks, then particles within windows of ``window_chunks`` chunks.

    Draws ``1 + ⌈C / window_chunks⌉`` permutations from ``generator`` (CPU), in that order.
    """
    perm = torch.randperm(len(chunks), generator=generator).tolist()
    visit = [chunks[i] for i in perm]
    ranks = torch.from_numpy(np.asarray(order, dtype=np.int64))
    windows: list[tuple[int, Tensor]] = []
    parts: list[Tensor] = []
    for w in range(0, len(visit), window_chunks):
        group = visit[w : w + window_chunks]
        rows = torch.cat([torch.arange(a, b) for a, b in group])  # (m,) ranks
        p = torch.randperm(int(rows.numel()), generator=generator)
        windows.append((len(group), p))
        parts.append(ranks[rows[p]])
    full = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return EpochPlan(visit, windows, full, batch_sizes(int(full.numel()), batch_size))


# --------------------------------------------------------------------------- prefetch


def _torch_openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime shipped in torch's ``lib`` folder (GNU ``libgomp``, LLVM ``libomp``
    or Intel ``libiomp5``), or None (a build without one). The very file torch loaded: another
    copy of the runtime would hold its own settings."""
    folder = Path(torch.__file__).resolve().parent / "lib"
    for pattern in ("libgomp*.so*", "libomp*.so*", "libiomp5*.so*", "libomp*.dylib",
                    "libiomp5*.dylib"):
        for path in sorted(folder.glob(pattern)):
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                continue
            if hasattr(lib, "omp_set_num_threads"):
                return lib
    return None


def limit_openmp_threads_of_this_thread(count: int = 1) -> bool:
    """Cap the OpenMP team of the *calling* thread's parallel kernels at ``count`` threads
    (OpenMP's per-thread ``nthreads-var``; other threads, and ``torch.get_num_threads()``, are
    unchanged). Returns False where torch has no OpenMP runtime to ask (nothing changed)."""
    lib = _torch_openmp_runtime()
    if lib is None:
        return False
    lib.omp_set_num_threads(ctypes.c_int(max(int(count), 1)))
    return True


Chunk = tuple[int, int]  # a rank range [start, stop) of the storage order
_Message = tuple[str, "Rows | BaseException | None"]  # ("ok" | "error" | "end", payload)


class _Prefetcher:
    """A daemon thread running ``load(chunk)`` for each chunk into a bounded queue."""

    def __init__(self, load: Callable[[Chunk], Rows], items: Sequence[Chunk], depth: int
                 ) -> None:
        self._load = load
        self._items = list(items)
        self._queue: queue.Queue[_Message] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
        self._thread.start()

    def _put(self, item: _Message) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            limit_openmp_threads_of_this_thread(1)  # one core for reading, not a second team
            for item in self._items:
                if self._stop.is_set():
                    return
                loaded = self._load(item)
                return_free_memory()  # this thread's arena keeps the chunk's temporaries
                if not self._put(("ok", loaded)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            self._put(("error", exc))

    def get(self) -> Rows:
        """The next loaded chunk (re-raises the loader's exception)."""
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended early") from None
        if isinstance(value, BaseException):
            raise value
        if kind == "end" or value is None:
            raise RuntimeError("the prefetch thread has no more chunks")
        return value

    def close(self) -> None:
        """Stop the thread and wait for it (drains the queue so it is never blocked)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)


# --------------------------------------------------------------------------- epochs


def stream_epoch(
    reader: RowReader,
    batch_size: int,
    generator: torch.Generator,
    options: StreamOptions | None = None,
    *,
    cache: PreprocessedCache | None = None,
    held: Tensor | None = None,
    device: torch.device | None = None,
) -> Iterator[Batch]:
    """Batches of one epoch read in chunks (see the module docstring).

    The order is drawn from ``generator`` now; reading starts at the first ``next()``. Closing
    the iterator (or dropping it, or an exception in the consumer) stops the prefetch thread.

    Parameters
    ----------
    reader : RowReader
        Reads and preprocesses the rows of a chunk (when there is no cache).
    batch_size : int
    generator : torch.Generator
        The CPU generator of the batch order.
    options : StreamOptions, optional
    cache : PreprocessedCache, optional
        Read the chunks' rows from this cache instead.
    held : `(n_held,)` int64, optional
        Sharded data: the particles this rank holds (increasing); each global batch yields
        its held part, with ``Batch.global_size`` set.
    device : torch.device, optional
        Where the batches go (default CPU).

    Yields
    ------
    Batch
        On ``device``; ``indices`` `(B,)` follow the epoch's order.
    """
    opts = options or StreamOptions()
    n = reader.num_particles
    order, chunks = storage_layout(reader.stored, n, opts.chunk_images)
    if cache is not None:
        order = cache.order
    plan = plan_epoch(order, chunks, batch_size, opts.window_chunks, generator)
    owned = None  # (N,) bool by particle: held by this rank (sharded data only)
    stored_owned = None  # (N,) bool in storage order
    if held is not None:
        owned = torch.zeros(n, dtype=torch.bool)
        owned[held] = True
        stored_owned = owned.numpy()[np.asarray(order, dtype=np.int64)]

    def load(rng: tuple[int, int]) -> Rows:
        keep = None if stored_owned is None else stored_owned[rng[0] : rng[1]]
        if cache is not None:
            return cache.read(*rng, keep=keep)
        ids = order[rng[0] : rng[1]]
        if keep is not None:
            ids = ids[keep]  # this rank's particles only
        return reader.read(torch.from_numpy(np.ascontiguousarray(ids)))

    dev = torch.device("cpu") if device is None else device
    return _iterate(dev, plan, load, opts, owned=owned, stored_owned=stored_owned)


def _cat(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    ctfs = [p.ctf for p in parts if p.ctf is not None]
    ctf = torch.cat(ctfs) if len(ctfs) == len(parts) else None
    return Rows(torch.cat([p.images for p in parts]), torch.cat([p.hartley for p in parts]), ctf)


def _clone_rows(rows: Rows) -> Rows:
    x, h, c = rows
    return Rows(x.clone(), h.clone(), None if c is None else c.clone())


def _held_permutation(perm: Tensor, keep: Tensor) -> Tensor:
    """Rows `(m_held,)` of a window's held rows in the order of ``perm`` `(m,)`.

    ``keep`` `(m,)` bool marks the held rows of the window's concatenated chunks; the loader
    returns only those (in the same order), so the held row of position ``j`` is
    ``cumsum(keep)[j] − 1``.
    """
    local = torch.cumsum(keep.to(torch.int64), 0) - 1  # (m,)
    chosen = perm[keep[perm]]  # positions of the held rows, in permuted order
    return local[chosen]


def _iterate(
    dev: torch.device, plan: EpochPlan, load: Callable[[tuple[int, int]], Rows],
    opts: StreamOptions, owned: Tensor | None = None, stored_owned: np.ndarray | None = None,
) -> Iterator[Batch]:
    """The batches of ``plan``; with ``owned`` `(N,)` bool (by particle) and ``stored_owned``
    `(N,)` bool (storage order), ``load`` returns the held rows of a chunk only and each
    global batch yields its held part; the batches go to ``dev``."""
    if not plan.sizes:
        return
    batches = plan.order.split(plan.sizes)
    prefetch = _Prefetcher(load, plan.chunks, opts.prefetch_chunks)
    try:
        windows = iter(plan.windows)
        chunks = iter(plan.chunks)
        pending: Rows | None = None  # rows in visiting order not yet batched
        for idx in batches:
            global_size = int(idx.numel())
            if owned is not None:
                idx = idx[owned[idx]]  # this rank's part of the global batch
            need = int(idx.numel())
            while pending is None or int(pending[0].shape[0]) < need:
                # Resident memory: the unbatched tail is a view of the previous window, so it
                # is copied out first (freeing that window) and the temporaries of each step
                # are dropped before the next one; at most ~2 windows are held at once.
                if pending is not None:
                    pending = _clone_rows(pending) if int(pending[0].shape[0]) else None
                count, perm = next(windows)
                group = [next(chunks) for _ in range(count)]
                block = _cat([prefetch.get() for _ in range(count)])
                if stored_owned is not None:
                    keep = torch.from_numpy(np.concatenate(
                        [stored_owned[a:b] for a, b in group]))  # (m,)
                    perm = _held_permutation(perm, keep)
                x, h, c = block
                del block
                block = Rows(x[perm], h[perm], None if c is None else c[perm])  # (m, ...)
                del x, h, c
                pending = block if pending is None else _cat([pending, block])
                del block
                return_free_memory()
            x, h, c = pending
            yield Batch(
                indices=idx.to(dev),
                images=x[:need].to(dev),
                hartley=h[:need].to(dev),
                ctf=None if c is None else c[:need].to(dev),
                global_size=None if owned is None else global_size,
            )
            pending = Rows(x[need:], h[need:], None if c is None else c[need:])
    finally:
        prefetch.close()
