"""MRC maps and image stacks: validated headers, lazy memory-mapped reads, atomic writes.

The header (its checks and the facts cryospin uses) is :mod:`cryospin.io.mrc_header`.

Conventions (``docs/conventions.md``): images are returned as `(n, L, L)` float32 arrays
indexed ``[y, x]``; volumes as `(Z, Y, X)` float32 arrays indexed ``[z, y, x]`` whatever the
file's axis order (``mapc/mapr/maps``). Written maps have origin 0 and ``nxstart = 0``
(RELION's choice): the box centre is voxel ``[L//2, L//2, L//2]``.

Stacks are never read whole unless asked: :class:`ImageStack` memory-maps the file and
:func:`open_stack` keeps a small cache of open stacks so that reading many particles from
the same file never opens it once per image.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import mrcfile
import numpy as np

from cryospin.atomic import atomic_path
from cryospin.errors import InputError, OutputError
from cryospin.io.mrc_header import MrcHeaderInfo, read_header

if TYPE_CHECKING:  # annotations only: reading and writing MRC needs no torch
    from torch import Tensor

__all__ = [
    "read_map",
    "read_cubic_map",
    "write_map",
    "looks_like_3d_map",
    "ImageStack",
    "open_stack",
    "clear_stack_cache",
    "write_stack",
    "StackWriter",
    "release_memmap_rows",
]

_STACK_CACHE_SIZE = 32


def _raw_memmap(info: MrcHeaderInfo) -> np.memmap:
    """Read-only memory map of the data block, shape ``(nz, ny, nx)`` as stored."""
    try:
        return np.memmap(
            info.path, dtype=info.dtype, mode="r", offset=info.data_offset, shape=info.shape_file
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot memory-map MRC data ({exc})", info.path) from None


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a 3D map as a float32 `(Z, Y, X)` array indexed ``[z, y, x]`` and its voxel size.

    The file's axis order (``mapc/mapr/maps``) is undone, so the result is always ``[z, y, x]``.
    ``nxstart``/``origin`` only place the box in a larger frame and do not change the array.

    Parameters
    ----------
    path : path to an ``.mrc``/``.map`` file.

    Returns
    -------
    volume : `(Z, Y, X)` float32
    voxel_size_angstrom : float
        Voxel size along x (Å). A warning names all three sizes when voxels are not cubic.
    """
    info = read_header(path)
    raw = _raw_memmap(info)
    # stored axes are (sections, rows, columns) = (maps, mapr, mapc); want (z, y, x) = (3, 2, 1)
    stored = (info.axis_order[2], info.axis_order[1], info.axis_order[0])
    perm = [stored.index(3), stored.index(2), stored.index(1)]
    volume = np.ascontiguousarray(np.transpose(raw, perm), dtype=np.float32)
    vx, vy, vz = info.voxel_size_xyz_angstrom
    if max(vx, vy, vz) > 0 and (abs(vx - vy) > 1e-3 * vx or abs(vx - vz) > 1e-3 * vx):
        warnings.warn(
            f"{path}: voxels are not cubic (x {vx:.4f}, y {vy:.4f}, z {vz:.4f} Å); "
            f"using the x size", stacklevel=2,
        )
    return volume, vx


def read_cubic_map(path: str | Path) -> tuple[np.ndarray, float]:
    """A cubic map `(L, L, L)` float64 ``[z, y, x]`` (a writable copy) and its voxel size
    (Å; 0 when the file gives none), as :func:`read_map` reads it.

    Raises
    ------
    InputError
        When the map is not a cube.
    """
    volume, apix = read_map(path)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"expected a cubic map, got shape {volume.shape}", path)
    return np.array(volume, dtype=np.float64), float(apix)


def looks_like_3d_map(path: str | Path) -> bool:
    """Whether the MRC file ``path`` holds a 3D map rather than a stack of particle images.

    The header must say so -- a 3D crystallographic space group (``ISPG`` 1-230; stacks have
    0) and a cubic grid (``nx = ny = nz``) -- and the data must agree: neighbouring sections
    around the centre correlate (median Pearson r > 0.5), as slices of a density do and
    independent particle images do not. The second test keeps a real stack that happens to
    hold as many images as pixels per side, written with ``ISPG`` 1 as some programs do.
    Reads the header and five central sections.
    """
    return _looks_like_3d_map(read_header(path))


def _looks_like_3d_map(info: MrcHeaderInfo) -> bool:
    """:func:`looks_like_3d_map` for the file whose header is ``info``."""
    nz, ny, nx = info.shape_file
    if not (1 <= info.ispg <= 230 and nx == ny == nz and nz >= 3):
        return False
    raw = _raw_memmap(info)
    mid = nz // 2
    sections = np.asarray(raw[max(mid - 2, 0):min(mid + 3, nz)], dtype=np.float64)  # (s, Y, X)
    flat = sections.reshape(sections.shape[0], -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    r = [float(flat[i] @ flat[i + 1] / (norms[i] * norms[i + 1]))
         for i in range(flat.shape[0] - 1) if norms[i] > 0 and norms[i + 1] > 0]
    return bool(r) and float(np.median(r)) > 0.5


def write_map(
    path: str | Path,
    volume: Tensor | np.ndarray,
    voxel_size_angstrom: float,
    origin_angstrom: Sequence[float] | None = None,
) -> None:
    """Write a `(Z, Y, X)` volume (``[z, y, x]``, numpy array or tensor) as float32 MRC, atomically.

    Header: voxel size set, ``mapc/mapr/maps = 1/2/3``, ``nxstart = nystart = nzstart = 0`` and
    origin ``origin_angstrom`` (x, y, z; default 0) -- RELION's convention, so the map's centre
    of rotation is voxel ``[L//2, L//2, L//2]`` and RELION/ChimeraX overlay it as expected.
    """
    arr = _as_numpy_float32(volume)
    if arr.ndim != 3:
        raise ValueError(f"write_map expects a (Z, Y, X) volume, got shape {arr.shape}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            mrc.voxel_size = float(voxel_size_angstrom)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
            ox, oy, oz = (0.0, 0.0, 0.0) if origin_angstrom is None else origin_angstrom
            mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = ox, oy, oz


def _as_numpy_float32(x: Tensor | np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (a tensor detached and copied to the CPU)."""
    if hasattr(x, "detach"):  # a tensor (torch not imported here: see above)
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


class ImageStack:
    """A lazy, memory-mapped MRC image stack `(n, L, L)` (``[y, x]`` per image).

    Opening reads and validates the header only. :meth:`read` copies just the requested
    images, coalescing consecutive indices into contiguous slices. A file without the
    ``"MAP "`` ID string is opened permissively with a warning naming the file.

    Attributes
    ----------
    path : Path
    box_px : int
        Image side ``L`` (pixels).
    pixel_size_angstrom : float
        From the header (``cella.x / mx``); 0 when the header says 0.
    space_group : int
        The header's ``ISPG`` (0 for a stack).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        info = read_header(self.path)
        if not info.has_map_id:
            warnings.warn(
                f"{self.path}: MRC header lacks the 'MAP ' ID string; reading it permissively",
                stacklevel=2,
            )
        if info.axis_order != (1, 2, 3):
            raise InputError(
                f"image stacks must have axis order 1,2,3, got {info.axis_order}", self.path
            )
        nz, ny, nx = info.shape_file
        if nx != ny:
            raise InputError(f"images are not square ({ny} rows x {nx} columns)", self.path)
        self._info = info
        self.box_px = nx
        self.pixel_size_angstrom = float(info.voxel_size_xyz_angstrom[0])
        self.space_group = int(info.ispg)
        self._n = nz
        self._data: np.memmap | None = None

    def looks_like_3d_map(self) -> bool:
        """Whether the file holds a 3D map rather than particle images
        (:func:`looks_like_3d_map`, from the header read at opening)."""
        return _looks_like_3d_map(self._info)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"ImageStack({str(self.path)!r}, n={self._n}, box_px={self.box_px})"

    @property
    def data(self) -> np.memmap:
        """The raw memory map `(n, L, L)` in the file's dtype (opened on first use)."""
        if self._data is None:
            self._data = _raw_memmap(self._info)
        return self._data

    def release(self, start: int, stop: int) -> None:
        """Hand back the resident pages of images ``[start, stop)`` (see
        :func:`release_memmap_rows`); they are read from the file again when needed."""
        if self._data is not None:
            release_memmap_rows(self._data, start, stop)

    def close(self) -> None:
        """Drop the memory map (reopened on the next read)."""
        self._data = None

    def read(self, indices: int | Sequence[int] | np.ndarray | slice | None = None) -> np.ndarray:
        """Images at 0-based ``indices`` (int, sequence, array or slice; None = all).

        Returns
        -------
        `(n, L, L)` float32, in the requested order.

        Raises
        ------
        InputError
            An index outside ``[0, len)``.
        """
        if indices is None:
            idx = np.arange(self._n)
        elif isinstance(indices, slice):
            idx = np.arange(self._n)[indices]
        else:
            idx = np.atleast_1d(np.asarray(indices)).astype(np.int64, copy=False).ravel()
        if idx.size == 0:
            return np.empty((0, self.box_px, self.box_px), np.float32)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self._n:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"image index {bad} (0-based) out of range: the stack has {self._n} images",
                self.path,
            )
        data = self.data
        if idx.size == 1 or bool(np.all(np.diff(idx) == 1)):  # one contiguous run
            return np.array(data[lo : hi + 1], dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        uniq, inverse = np.unique(sorted_idx, return_inverse=True)
        out_u = np.empty((uniq.size, self.box_px, self.box_px), np.float32)
        # runs of consecutive indices -> one contiguous slice each
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [uniq.size]])
        for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
            a = int(uniq[s])
            out_u[s:e] = data[a : a + (e - s)]
        out = np.empty((idx.size, self.box_px, self.box_px), np.float32)
        out[order] = out_u[inverse]
        return out


_cache_lock = threading.Lock()
_stack_cache: collections.OrderedDict[tuple[str, int, int], ImageStack] = (
    collections.OrderedDict()
)


def open_stack(path: str | Path) -> ImageStack:
    """An :class:`ImageStack` for ``path`` from a small LRU cache of open stacks.

    The cache key includes the file's size and modification time, so a rewritten file is
    reopened. At most 32 stacks are kept open.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return ImageStack(p)  # raises the proper InputError
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        stack = _stack_cache.get(key)
        if stack is not None:
            _stack_cache.move_to_end(key)
            return stack
    stack = ImageStack(p)
    with _cache_lock:
        _stack_cache[key] = stack
        while len(_stack_cache) > _STACK_CACHE_SIZE:
            _, old = _stack_cache.popitem(last=False)
            old.close()
    return stack


def clear_stack_cache() -> None:
    """Close and forget every cached stack."""
    with _cache_lock:
        for s in _stack_cache.values():
            s.close()
        _stack_cache.clear()


def write_stack(path: str | Path, images: Tensor | np.ndarray, pixel_size_angstrom: float
                ) -> None:
    """Write `(N, L, L)` images (``[y, x]``; array or tensor) as a float32 ``.mrcs``, atomically."""
    arr = _as_numpy_float32(images)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"write_stack expects (N, L, L) images, got shape {arr.shape}")
    with StackWriter(path, arr.shape[0], arr.shape[1], pixel_size_angstrom) as writer:
        writer.write(arr)


class StackWriter:
    """Incremental writer of a float32 MRC stack `(n, L, L)`, atomic on success.

    Chunks are written in order through :meth:`write` into a temporary file next to ``path``;
    leaving the ``with`` block without error checks that exactly ``n`` images were written,
    fills in the header statistics (accumulated chunk by chunk, never re-reading the file)
    and renames the file onto ``path``. On error the temporary file is removed.

    Examples
    --------
    >>> with StackWriter("particles.mrcs", n=20000, box_px=128, pixel_size_angstrom=1.5) as w:
    ...     for chunk in chunks:          # each (b, 128, 128)
    ...         w.write(chunk)
    """

    def __init__(self, path: str | Path, n: int, box_px: int, pixel_size_angstrom: float) -> None:
        if n <= 0 or box_px <= 0:
            raise ValueError(f"StackWriter needs n > 0 and box_px > 0, got {n}, {box_px}")
        self.path = Path(path)
        self.n = int(n)
        self.box_px = int(box_px)
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.n_written = 0
        self._exit = contextlib.ExitStack()
        self._mrc: Any = None
        self._min = np.inf
        self._max = -np.inf
        self._sum = 0.0
        self._sumsq = 0.0

    def __enter__(self) -> StackWriter:
        tmp = self._exit.enter_context(atomic_path(self.path))
        try:
            self._mrc = mrcfile.new_mmap(
                tmp, shape=(self.n, self.box_px, self.box_px), mrc_mode=2, overwrite=True
            )
        except OSError as exc:
            self._exit.close()
            raise OutputError(f"cannot create MRC stack ({exc})", self.path) from None
        self._mrc.set_image_stack()
        return self

    def write(self, images: Tensor | np.ndarray) -> None:
        """Append `(b, L, L)` (or one `(L, L)`) images."""
        arr = _as_numpy_float32(images)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[1:] != (self.box_px, self.box_px):
            raise ValueError(
                f"chunk of shape {arr.shape} does not match box {self.box_px}x{self.box_px}"
            )
        b = arr.shape[0]
        if self.n_written + b > self.n:
            raise ValueError(f"too many images: {self.n_written + b} > {self.n}")
        if self._mrc is None:
            raise RuntimeError("StackWriter.write called outside its `with` block")
        self._mrc.data[self.n_written : self.n_written + b] = arr
        self._min = min(self._min, float(arr.min()))
        self._max = max(self._max, float(arr.max()))
        self._sum += float(arr.sum(dtype=np.float64))
        self._sumsq += float(np.einsum("i,i->", arr.ravel(), arr.ravel(), dtype=np.float64))
        self.n_written += b

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        mrc, self._mrc = self._mrc, None
        if exc_type is not None:  # the caller failed: close, remove the temporary file
            mrc.close()
            self._exit.__exit__(exc_type, exc, tb)
            return
        with self._exit:  # renames the temporary file on success, removes it on error
            try:
                self._finish_header(mrc)
            finally:
                mrc.close()

    def _finish_header(self, mrc: mrcfile.mrcmemmap.MrcMemmap) -> None:
        if self.n_written != self.n:
            raise ValueError(f"{self.path}: StackWriter got {self.n_written} of {self.n} images")
        count = self.n * self.box_px * self.box_px
        mean = self._sum / count
        mrc.voxel_size = self.pixel_size_angstrom
        h = mrc.header
        h.dmin, h.dmax, h.dmean = self._min, self._max, mean
        h.rms = float(np.sqrt(max(self._sumsq / count - mean * mean, 0.0)))
        mrc.flush()


def release_memmap_rows(arr: np.ndarray, start: int, stop: int) -> None:
    """``madvise(MADV_DONTNEED)`` the resident pages of rows ``[start, stop)`` of a numpy memory
    map (read-only data: the pages are re-read from the file if touched again). Keeps a pass
    over a stack larger than RAM from growing the resident memory; a no-op where unsupported."""
    if not isinstance(arr, np.memmap):  # an array in memory: nothing to hand back
        return
    mm = getattr(arr, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None or not hasattr(mm, "madvise") or stop <= start:
        return
    try:
        base = int(arr.offset) % mmap.ALLOCATIONGRANULARITY  # row 0 within the mapping
        row = int(arr.strides[0])
        lo = base + start * row
        hi = min(base + stop * row, len(mm))
        lo -= lo % mmap.PAGESIZE
        if hi > lo:
            mm.madvise(advice, lo, hi - lo)
    except (OSError, ValueError, AttributeError):  # closed map or an exotic platform
        return
