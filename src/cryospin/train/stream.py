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
   :func:`cryospin.train.data.batch_indices` cuts a permutation (same count, the same merge of a
   last batch of one image).

All random numbers are drawn from the training generator when the epoch is created (as
:func:`~cryospin.train.data.batch_indices` does), so resumed runs are exact. A background thread
reads and preprocesses the chunks in visiting order into a bounded queue (``prefetch_chunks``
ahead); torch releases the GIL in its kernels, so preprocessing overlaps training. Threads: on
CPU each Python thread running torch kernels gets its own OpenMP team of
``torch.get_num_threads()`` threads (a new thread takes the process-wide value at its first
parallel kernel), so while a chunk is preprocessed beside a training step up to twice that many
compute threads would be runnable. ``torch.set_num_threads`` is not per thread (it changes the
process-wide value), but OpenMP's own ``omp_set_num_threads`` is: the prefetch thread sets it to
1 in the OpenMP runtime torch loaded (:func:`limit_openmp_threads_of_this_thread`), so the
preprocessing adds one compute thread beside the training's, not a second team.

Sharded data (distributed training, ``TrainingData.held``): the plan above is drawn exactly
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

The optional cache (``DataConfig.cache_dir``) stores, once, the preprocessed images
`(N, L, L)`, the Hartley values on the loss disc `(N, P)` (divided by ``L``) and the CTF `(N, P)`
as float16 ``.npy`` files in storage order, under a folder named by a hash of everything they
depend on (stack files with sizes and modification times, particle selection, preprocessing
configuration, normalisation, disc): a change of any input rebuilds it. Later epochs then read
contiguous rows of these files and skip the FFTs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cryospin.atomic import atomic_path, atomic_write_text
from cryospin.errors import InputError, OutputError
from cryospin.io.mrc import release_memmap_rows
from cryospin.train.memory import return_free_memory

__all__ = [
    "StreamOptions",
    "EpochPlan",
    "PreprocessedCache",
    "storage_layout",
    "plan_epoch",
    "stream_epoch",
    "open_cache",
    "cache_key",
    "release_pages",
    "batch_sizes",
]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
_THREAD_NAME = "cryospin-prefetch"
_POLL_S = 0.05

Rows = tuple[Tensor, Tensor, "Tensor | None"]


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


# --------------------------------------------------------------------------- layout and plan


def _stack_owner(source: Any) -> Any:
    """The ParticleSet under ``source`` (views such as PreprocessedParticles keep it in
    ``.particles``, in the same particle order), or ``source`` itself."""
    seen = 0
    while getattr(source, "stack_index", None) is None and seen < 8:
        inner = getattr(source, "particles", None)
        if inner is None:
            break
        source, seen = inner, seen + 1
    return source


def storage_layout(
    source: Any, n: int, chunk_images: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Storage order of the particles and its cut into chunks.

    Parameters
    ----------
    source : ParticleSet or None
        With ``stack_index`` and ``image_index`` `(N,)`: particles are sorted by stack, then by
        image. Without them (any other source) the storage order is ``0 .. N−1``.
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
    owner = _stack_owner(source)
    stack_index = getattr(owner, "stack_index", None)
    image_index = getattr(owner, "image_index", None)
    if stack_index is not None and image_index is not None and len(stack_index) == n:
        order = np.lexsort((np.asarray(image_index), np.asarray(stack_index))).astype(np.int64)
        stacks = np.asarray(stack_index)[order]
        cuts = (np.flatnonzero(np.diff(stacks) != 0) + 1).tolist()
    else:
        order = np.arange(n, dtype=np.int64)
        cuts = []
    chunks: list[tuple[int, int]] = []
    for a, b in zip([0, *cuts], [*cuts, n], strict=True):
        for s in range(a, b, chunk_images):
            chunks.append((s, min(s + chunk_images, b)))
    return order, chunks


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches :func:`cryospin.train.data.batch_indices` cuts ``n`` items into."""
    sizes = [batch_size] * (n // batch_size)
    if n % batch_size:
        sizes.append(n % batch_size)
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


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


# --------------------------------------------------------------------------- resident pages


def release_pages(source: Any, indices: Any) -> None:
    """Hand back the resident pages of the stacks that hold particles ``indices``
    (:meth:`cryospin.io.particles.ParticleSet.release_pages`); a no-op for other sources."""
    owner = _stack_owner(source)
    release = getattr(owner, "release_pages", None)
    if release is None:
        return
    idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
    release(idx)


# --------------------------------------------------------------------------- the cache


def cache_key(data: Any) -> str | None:
    """Hash of everything the preprocessed values depend on; None when not cacheable.

    ``data`` is a :class:`~cryospin.train.data.TrainingData` whose ``source`` is a ParticleSet
    (stack files are identified by resolved path, size and modification time).
    """
    src = _stack_owner(data.source)
    paths = getattr(src, "stack_paths", None)
    if paths is None or getattr(src, "stack_index", None) is None:
        return None
    h = hashlib.sha256()
    stacks = []
    for p in paths:
        try:
            st = Path(p).stat()
        except OSError:
            return None
        stacks.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    cfg = {}
    if data.config is not None:
        cfg = dataclasses.asdict(data.config)
        for k in ("cache_dir", "max_memory_gb", "max_preload_gb"):  # do not change the values
            cfg.pop(k, None)
    meta = {
        "version": _CACHE_VERSION,
        "stacks": stacks,
        "box_px": data.box_px,
        "num_particles": data.num_particles,
        "image_scale": repr(float(data.image_scale)),
        "use_ctf": bool(data.use_ctf),
        "config": repr(sorted(cfg.items())),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for arr in (src.stack_index, src.image_index):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update(data.frequencies.detach().cpu().to(torch.float32).numpy().tobytes())
    ctf = getattr(src, "ctf", None)
    if data.use_ctf and ctf is not None:
        for f in dataclasses.fields(ctf):
            value = getattr(ctf, f.name)
            if isinstance(value, Tensor):
                h.update(f.name.encode())
                h.update(value.detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:20]


class PreprocessedCache:
    """Float16 ``.npy`` files of preprocessed particles, in storage order (see module doc).

    Attributes
    ----------
    folder : Path
    order : `(N,)` int64
        Particle at each row.
    images : `(N, L, L)` float16 memory map
    hartley : `(N, P)` memory map (float16, or float32 when float16 would overflow), ``÷ L``
    ctf : `(N, P)` float16 memory map or None
    """

    def __init__(self, folder: Path, order: np.ndarray, box_px: int) -> None:
        self.folder = folder
        self.order = order
        self.box_px = int(box_px)
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.hartley = np.load(folder / "hartley.npy", mmap_mode="r")
        ctf_path = folder / "ctf.npy"
        self.ctf = np.load(ctf_path, mmap_mode="r") if ctf_path.exists() else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, start: int, stop: int, keep: np.ndarray | None = None) -> Rows:
        """Rows ``[start, stop)`` as float32 tensors ``(images, hartley, ctf)`` (one read each).

        ``keep`` `(stop − start,)` bool: only those rows are read (a rank's held particles).
        """
        out = []
        for arr, scale in ((self.images, 1.0), (self.hartley, float(self.box_px)),
                           (self.ctf, 1.0)):
            if arr is None:
                out.append(None)
                continue
            rows = arr[start:stop]  # a view of the memory map: nothing read yet
            block = np.array(rows if keep is None else rows[keep], dtype=np.float32)
            if scale != 1.0:
                block *= scale
            release_memmap_rows(arr, start, stop)
            out.append(torch.from_numpy(block))
        return out[0], out[1], out[2]


def _npy_header(fh: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_2_0(
        fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
             "shape": shape},
    )


class _Float16Overflow(Exception):
    pass


def _write_cache(
    folder: Path, data: Any, order: np.ndarray, chunks: Sequence[tuple[int, int]],
    hartley_dtype: np.dtype,
) -> None:
    """Preprocess every chunk once and append it to the ``.npy`` files (sequential writes)."""
    n, L, P = data.num_particles, data.box_px, int(data.frequencies.shape[0])
    names = ["images", "hartley"] + (["ctf"] if data.use_ctf else [])
    shapes = {"images": (n, L, L), "hartley": (n, P), "ctf": (n, P)}
    dtypes = {"images": np.dtype("<f2"), "hartley": hartley_dtype, "ctf": np.dtype("<f2")}
    limit = float(np.finfo(np.float16).max)
    import contextlib

    with contextlib.ExitStack() as stack:
        handles = {}
        for name in names:
            tmp = stack.enter_context(atomic_path(folder / f"{name}.npy"))
            fh = stack.enter_context(open(tmp, "wb"))
            _npy_header(fh, dtypes[name], shapes[name])
            handles[name] = fh
        for a, b in chunks:
            x, h, c = data.load_rows(torch.from_numpy(order[a:b]))
            values = {"images": x, "hartley": h / float(L), "ctf": c}
            for name in names:
                v = values[name].numpy()
                if dtypes[name] == np.float16 and float(np.abs(v).max(initial=0.0)) > limit:
                    raise _Float16Overflow(name)
                handles[name].write(np.ascontiguousarray(v, dtype=dtypes[name]).tobytes())
        for fh in handles.values():
            fh.flush()


def open_cache(data: Any, folder: str | Path, chunks_of: int = 256) -> PreprocessedCache | None:
    """Open the cache of ``data`` under ``folder``, building it first when absent or stale.

    Returns None (with a log line) when ``data``'s source cannot be cached. The cache lives
    in ``folder/cryospin-cache-<key>``; ``meta.json`` is written last, so an interrupted build
    is rebuilt next time.
    """
    key = cache_key(data)
    if key is None:
        logger.info("preprocessed-image cache disabled: the particle source has no stack files")
        return None
    root = Path(folder).expanduser()
    target = root / f"cryospin-cache-{key}"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the cache folder ({exc.strerror})", target) from None
    order, chunks = storage_layout(data.source, data.num_particles, chunks_of)
    meta_path = target / "meta.json"
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
    expected = {"key": key, "num_particles": data.num_particles, "box_px": data.box_px,
                "num_frequencies": int(data.frequencies.shape[0])}
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        logger.info("writing the preprocessed-image cache %s (%d particles, float16)", target,
                    data.num_particles)
        try:
            _write_cache(target, data, order, chunks, np.dtype("<f2"))
            expected["hartley_dtype"] = "float16"
        except _Float16Overflow:
            logger.info("Hartley values exceed float16; caching them as float32")
            _write_cache(target, data, order, chunks, np.dtype("<f4"))
            expected["hartley_dtype"] = "float32"
        atomic_write_text(meta_path, json.dumps(expected, indent=1))
    else:
        logger.info("reading preprocessed images from the cache %s", target)
    cache = PreprocessedCache(target, order, data.box_px)
    if len(cache) != data.num_particles:
        raise InputError(f"cache holds {len(cache)} rows, expected {data.num_particles}", target)
    return cache


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


class _Prefetcher:
    """A daemon thread running ``load(item)`` for each item into a bounded queue."""

    def __init__(self, load: Callable[[Any], Any], items: Sequence[Any], depth: int) -> None:
        self._load = load
        self._items = list(items)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> bool:
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

    def get(self) -> Any:
        """The next loaded item (re-raises the loader's exception)."""
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended early") from None
        if kind == "error":
            raise value
        if kind == "end":
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
    data: Any,
    batch_size: int,
    generator: torch.Generator,
    options: StreamOptions | None = None,
) -> Iterator[Any]:
    """Batches of one epoch read in chunks (see the module docstring).

    The order is drawn from ``generator`` now; reading starts at the first ``next()``. Closing
    the iterator (or dropping it, or an exception in the consumer) stops the prefetch thread.

    Parameters
    ----------
    data : TrainingData
        Not preloaded; ``data.cache`` (a :class:`PreprocessedCache`) is used when set.
    batch_size : int
    generator : torch.Generator
        The CPU generator of the batch order.
    options : StreamOptions, optional

    Yields
    ------
    Batch
        On ``data.device``; ``indices`` `(B,)` follow the epoch's order.
    """
    opts = options or StreamOptions()
    cache = getattr(data, "cache", None)
    if cache is not None:
        order = cache.order
        _, chunks = storage_layout(data.source, data.num_particles, opts.chunk_images)
    else:
        order, chunks = storage_layout(data.source, data.num_particles, opts.chunk_images)
    plan = plan_epoch(order, chunks, batch_size, opts.window_chunks, generator)
    held = getattr(data, "held", None)
    owned = None  # (N,) bool by particle: held by this rank (sharded data only)
    stored_owned = None  # (N,) bool in storage order
    if held is not None:
        owned = torch.zeros(data.num_particles, dtype=torch.bool)
        owned[held] = True
        stored_owned = owned.numpy()[np.asarray(order, dtype=np.int64)]

    if cache is not None:
        def load(rng: tuple[int, int]) -> Rows:
            keep = None if stored_owned is None else stored_owned[rng[0] : rng[1]]
            return cache.read(*rng, keep=keep)
    else:
        def load(rng: tuple[int, int]) -> Rows:
            ids = order[rng[0] : rng[1]]
            if stored_owned is not None:
                ids = ids[stored_owned[rng[0] : rng[1]]]  # this rank's particles only
            return data.load_rows(torch.from_numpy(np.ascontiguousarray(ids)))

    return _iterate(data, plan, load, opts, owned=owned, stored_owned=stored_owned)


def _cat(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    ctf = None if parts[0][2] is None else torch.cat([p[2] for p in parts])  # type: ignore[misc]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), ctf


def _clone_rows(rows: Rows) -> Rows:
    x, h, c = rows
    return x.clone(), h.clone(), None if c is None else c.clone()


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
    data: Any, plan: EpochPlan, load: Callable[[tuple[int, int]], Rows], opts: StreamOptions,
    owned: Tensor | None = None, stored_owned: np.ndarray | None = None,
) -> Iterator[Any]:
    """The batches of ``plan``; with ``owned`` `(N,)` bool (by particle) and ``stored_owned``
    `(N,)` bool (storage order), ``load`` returns the held rows of a chunk only and each
    global batch yields its held part."""
    from cryospin.train.data import Batch

    if not plan.sizes:
        return
    dev = data.device
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
                block = (x[perm], h[perm], None if c is None else c[perm])  # (m, ...)
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
            pending = (x[need:], h[need:], None if c is None else c[need:])
    finally:
        prefetch.close()
