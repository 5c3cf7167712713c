"""The on-disk cache of preprocessed training rows (``DataConfig.cache_dir``), float16.

The cache stores, once, the preprocessed images `(N, L, L)`, the Hartley values on the loss
disc `(N, P)` (divided by ``L``) and the CTF `(N, P)` as float16 ``.npy`` files in storage order
(:func:`cryospin.sources.storage_layout`), under a folder named by a hash of everything they
depend on (stack files with sizes and modification times, particle selection, preprocessing
configuration, normalisation, disc): a change of any input rebuilds it. Streamed epochs then
read contiguous rows of these files and skip the FFTs. Hartley values that would overflow
float16 are stored as float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from cryospin.atomic import atomic_path, atomic_write_text
from cryospin.errors import InputError, OutputError
from cryospin.forward.ctf import CTFParams
from cryospin.io.mrc import release_memmap_rows
from cryospin.sources import StackedImageSource, storage_layout
from cryospin.train.config import DataConfig
from cryospin.train.rows import RowReader, Rows

__all__ = ["PreprocessedCache", "cache_key", "open_cache"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1


def cache_key(reader: RowReader, config: DataConfig | None) -> str | None:
    """Hash of everything the rows of ``reader`` depend on; None when not cacheable.

    Cacheable when ``reader.stored`` is a :class:`~cryospin.sources.StackedImageSource`
    (stack files are identified by resolved path, size and modification time).
    """
    src = reader.stored
    if not isinstance(src, StackedImageSource):
        return None
    h = hashlib.sha256()
    stacks = []
    for p in src.stack_paths:
        try:
            st = Path(p).stat()
        except OSError:
            return None
        stacks.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    cfg = {}
    if config is not None:
        cfg = dataclasses.asdict(config)
        for k in ("cache_dir", "max_memory_gb", "max_preload_gb"):  # do not change the values
            cfg.pop(k, None)
    meta = {
        "version": _CACHE_VERSION,
        "stacks": stacks,
        "box_px": reader.box_px,
        "num_particles": reader.num_particles,
        "image_scale": repr(float(reader.image_scale)),
        "use_ctf": bool(reader.use_ctf),
        "config": repr(sorted(cfg.items())),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for arr in (src.stack_index, src.image_index):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update(reader.frequencies.detach().cpu().to(torch.float32).numpy().tobytes())
    if reader.whitening is not None:
        h.update(b"whitening")
        h.update(reader.whitening.detach().cpu().to(torch.float64).numpy().tobytes())
    ctf = src.ctf
    if reader.use_ctf and isinstance(ctf, CTFParams):
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
        def rows(arr: np.ndarray, scale: float = 1.0) -> Tensor:
            view = arr[start:stop]  # a view of the memory map: nothing read yet
            block = np.array(view if keep is None else view[keep], dtype=np.float32)
            if scale != 1.0:
                block *= scale
            release_memmap_rows(arr, start, stop)
            return torch.from_numpy(block)

        return Rows(rows(self.images), rows(self.hartley, float(self.box_px)),
                    None if self.ctf is None else rows(self.ctf))


def _npy_header(fh: BinaryIO, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_2_0(
        fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
             "shape": shape},
    )


class _Float16Overflow(Exception):
    pass


def _write_cache(
    folder: Path, reader: RowReader, order: np.ndarray, chunks: Sequence[tuple[int, int]],
    hartley_dtype: np.dtype,
) -> None:
    """Preprocess every chunk once and append it to the ``.npy`` files (sequential writes)."""
    n, L, P = reader.num_particles, reader.box_px, int(reader.frequencies.shape[0])
    names = ["images", "hartley"] + (["ctf"] if reader.use_ctf else [])
    shapes = {"images": (n, L, L), "hartley": (n, P), "ctf": (n, P)}
    dtypes = {"images": np.dtype("<f2"), "hartley": hartley_dtype, "ctf": np.dtype("<f2")}
    limit = float(np.finfo(np.float16).max)
    with contextlib.ExitStack() as stack:
        handles = {}
        for name in names:
            tmp = stack.enter_context(atomic_path(folder / f"{name}.npy"))
            fh = stack.enter_context(open(tmp, "wb"))
            _npy_header(fh, dtypes[name], shapes[name])
            handles[name] = fh
        for a, b in chunks:
            x, h, c = reader.read(torch.from_numpy(order[a:b]))
            values = {"images": x, "hartley": h / float(L), "ctf": c}
            for name in names:
                value = values[name]
                assert value is not None  # "ctf" is written only with use_ctf
                v = value.numpy()
                if dtypes[name] == np.float16 and float(np.abs(v).max(initial=0.0)) > limit:
                    raise _Float16Overflow(name)
                handles[name].write(np.ascontiguousarray(v, dtype=dtypes[name]).tobytes())
        for fh in handles.values():
            fh.flush()


def open_cache(
    reader: RowReader, config: DataConfig | None, folder: str | Path, chunks_of: int = 256
) -> PreprocessedCache | None:
    """Open the cache of the rows of ``reader`` (preprocessed with ``config``) under
    ``folder``, building it first when absent or stale.

    Returns None (with a log line) when the reader's particles cannot be cached. The cache
    lives in ``folder/cryospin-cache-<key>``; ``meta.json`` is written last, so an interrupted
    build is rebuilt next time.
    """
    key = cache_key(reader, config)
    if key is None:
        logger.info("preprocessed-image cache disabled: the particle source has no stack files")
        return None
    n, box_px = reader.num_particles, reader.box_px
    root = Path(folder).expanduser()
    target = root / f"cryospin-cache-{key}"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the cache folder ({exc.strerror})", target) from None
    order, chunks = storage_layout(reader.stored, n, chunks_of)
    meta_path = target / "meta.json"
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
    expected = {"key": key, "num_particles": n, "box_px": box_px,
                "num_frequencies": int(reader.frequencies.shape[0])}
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        logger.info("writing the preprocessed-image cache %s (%d particles, float16)", target, n)
        try:
            _write_cache(target, reader, order, chunks, np.dtype("<f2"))
            expected["hartley_dtype"] = "float16"
        except _Float16Overflow:
            logger.info("Hartley values exceed float16; caching them as float32")
            _write_cache(target, reader, order, chunks, np.dtype("<f4"))
            expected["hartley_dtype"] = "float32"
        atomic_write_text(meta_path, json.dumps(expected, indent=1))
    else:
        logger.info("reading preprocessed images from the cache %s", target)
    cache = PreprocessedCache(target, order, box_px)
    if len(cache) != n:
        raise InputError(f"cache holds {len(cache)} rows, expected {n}", target)
    return cache
