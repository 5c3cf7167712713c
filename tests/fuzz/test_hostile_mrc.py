"""Hostile MRC/MRCS input: truncation, corrupted headers, modes, byte order, NaN/Inf,
constant images, non-MRC files."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryospin.errors import InputError
from cryospin.io import ImageStack, clear_stack_cache, load_particles, read_header, read_map
from tests.fuzz import FUZZ, expect_input_error, outcome, write_stack

N, L = 3, 8


def _good_stack(tmp: Path, name: str = "s.mrcs") -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(1).normal(size=(N, L, L)).astype(np.float32)
    return write_stack(tmp / name, data), data


def _read_all(path: Path) -> np.ndarray:
    clear_stack_cache()
    return ImageStack(path).read()


# ------------------------------------------------------------------ truncation
@FUZZ
@given(frac=st.floats(0.0, 1.0, exclude_max=True))
def test_any_truncation_is_an_input_error(tmp_path_factory, frac: float) -> None:
    tmp = tmp_path_factory.mktemp("trunc")
    path, _ = _good_stack(tmp)
    raw = path.read_bytes()
    cut = int(frac * len(raw))
    path.write_bytes(raw[:cut])
    msg = expect_input_error(_read_all, "s.mrcs", "truncated", path=path)
    assert "\n" not in msg
    expect_input_error(read_map, "truncated", path=path)


# ------------------------------------------------------------------ header corruption
# (offset, struct format) of the header fields a corruption is most likely to break
_FIELDS = {
    "nx": (0, "<i"), "ny": (4, "<i"), "nz": (8, "<i"), "mode": (12, "<i"),
    "mapc": (64, "<i"), "mapr": (68, "<i"), "maps": (72, "<i"), "nsymbt": (92, "<i"),
    "cella_x": (40, "<f"), "mx": (28, "<i"),
}


@FUZZ
@given(field=st.sampled_from(sorted(_FIELDS)),
       value=st.one_of(st.integers(-2**31, 2**31 - 1),
                       st.sampled_from([0, 1, -1, 2**31 - 1, -2**31, 7, 8, 9, 1024, 10**9])))
def test_corrupted_header_field(tmp_path_factory, field: str, value: int) -> None:
    tmp = tmp_path_factory.mktemp("hdr")
    path, data = _good_stack(tmp)
    off, fmt = _FIELDS[field]
    raw = bytearray(path.read_bytes())
    raw[off:off + 4] = struct.pack(fmt, float(value) if fmt == "<f" else value)
    path.write_bytes(bytes(raw))
    kind, val = outcome(_read_all, path)
    if kind == "input_error":
        assert "s.mrcs" in str(val)
        return
    # a parse must be consistent with the header it claims to have read
    info = read_header(path)
    nz, ny, nx = info.shape_file
    assert val.shape == (nz, ny, nx) and nx == ny
    assert info.data_offset + nx * ny * nz * info.dtype.itemsize <= len(raw)
    if field in ("cella_x", "mx") or (field in ("mapc", "mapr", "maps") and value == 0):
        pass  # only metadata changed (or axis order reset to the default): same pixels
    elif (nz, ny, nx) == (N, L, L) and info.mode == 2 and info.data_offset == 1024:
        pass  # e.g. nz made smaller then re-equal, mode unchanged
    else:
        return
    np.testing.assert_array_equal(val, data)
    ImageStack(path)  # the pixel size must be finite and not negative
    assert np.isfinite(ImageStack(path).pixel_size_angstrom)
    assert ImageStack(path).pixel_size_angstrom >= 0


@FUZZ
@given(offsets=st.lists(st.integers(0, 1023), min_size=1, max_size=12),
       values=st.binary(min_size=12, max_size=12))
def test_random_header_bytes(tmp_path_factory, offsets: list[int], values: bytes) -> None:
    tmp = tmp_path_factory.mktemp("hdrb")
    path, _ = _good_stack(tmp)
    raw = bytearray(path.read_bytes())
    for k, off in enumerate(offsets):
        raw[off] = values[k]
    path.write_bytes(bytes(raw))
    kind, val = outcome(_read_all, path)
    if kind == "ok":
        assert val.dtype == np.float32 and val.ndim == 3 and val.shape[1] == val.shape[2]
    outcome(read_map, path)  # InputError or a parse, nothing else
    if kind == "ok":
        assert np.isfinite(ImageStack(path).pixel_size_angstrom)


@pytest.mark.parametrize("dims", [(-8, 8, 3), (8, -8, 3), (8, 8, -3), (0, 8, 3), (8, 8, 0),
                                  (2**31 - 1, 2**31 - 1, 2**31 - 1), (8, 8, 10**9),
                                  (65536, 65536, 65536)])
def test_bad_or_huge_dimensions(tmp_path: Path, dims: tuple[int, int, int]) -> None:
    path, _ = _good_stack(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[0:12] = struct.pack("<3i", *dims)
    path.write_bytes(bytes(raw))
    expect_input_error(_read_all, "s.mrcs", path=path)
    expect_input_error(read_map, "s.mrcs", path=path)


@pytest.mark.parametrize("nsymbt", [-1, 2**31 - 1, 4, 10**6])
def test_extended_header_size_disagreeing_with_file(tmp_path: Path, nsymbt: int) -> None:
    path, _ = _good_stack(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[92:96] = struct.pack("<i", nsymbt)
    path.write_bytes(bytes(raw))
    expect_input_error(_read_all, "s.mrcs", path=path)


def test_file_longer_than_header_says_reads_the_announced_images(tmp_path: Path) -> None:
    path, data = _good_stack(tmp_path)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 100)  # trailing junk: the header's sizes win, with a warning
    with pytest.warns(UserWarning, match="100 bytes more"):
        np.testing.assert_array_equal(_read_all(path), data)


@pytest.mark.parametrize("field, value", [("mode", 12), ("mode", 0), ("nz", 2)])
def test_header_announcing_less_data_warns(tmp_path: Path, field: str, value: int) -> None:
    """A corrupted mode/size that shrinks the data block cannot be told from a valid file
    with trailing bytes, so it is read -- but never silently."""
    path, _ = _good_stack(tmp_path)
    off = _FIELDS[field][0]
    raw = bytearray(path.read_bytes())
    raw[off:off + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="bytes more than its header announces"):
        _read_all(path)


def test_wrong_machine_stamp_falls_back_to_the_other_byte_order(tmp_path: Path) -> None:
    data = np.arange(N * L * L, dtype=np.float32).reshape(N, L, L)
    path = write_stack(tmp_path / "be.mrcs", data.astype(">f4"))
    raw = bytearray(path.read_bytes())
    raw[212:214] = b"\x44\x44"  # claims little endian
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(_read_all(path), data)


# ------------------------------------------------------------------ modes and byte order
@pytest.mark.parametrize("dtype, mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2),
                                         (np.uint16, 6), (np.float16, 12)])
@pytest.mark.parametrize("order", ["<", ">"])
def test_supported_modes_read_exact_values(tmp_path: Path, dtype, mode: int, order: str) -> None:
    rng = np.random.default_rng(mode)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=(N, L, L), endpoint=True).astype(dtype)
    else:
        data = rng.normal(scale=100, size=(N, L, L)).astype(dtype)
    path = write_stack(tmp_path / "m.mrcs", data.astype(np.dtype(dtype).newbyteorder(order)))
    with mrcfile.open(path, permissive=True) as m:  # what was actually written
        assert int(m.header.mode) == mode
    stamp = path.read_bytes()[212]
    if order == ">" and dtype is not np.int8:  # int8 has no byte order
        assert stamp == 0x11, "mrcfile did not write a big-endian file"
    clear_stack_cache()
    stack = ImageStack(path)
    np.testing.assert_array_equal(stack.read(), data.astype(np.float32))
    np.testing.assert_array_equal(stack.read([2, 0]), data[[2, 0]].astype(np.float32))
    assert stack.pixel_size_angstrom == pytest.approx(2.0)
    vol, vox = read_map(path)
    np.testing.assert_array_equal(vol, data.astype(np.float32))


@pytest.mark.parametrize("mode", [3, 4, 101, 5, -1, 2**20])
def test_unsupported_modes_rejected(tmp_path: Path, mode: int) -> None:
    path, _ = _good_stack(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[12:16] = struct.pack("<i", mode)
    path.write_bytes(bytes(raw))
    msg = expect_input_error(_read_all, "s.mrcs", path=path)
    if mode in (3, 4, 101):
        assert f"mode {mode}" in msg


def test_complex_map_written_by_mrcfile_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.ones((4, 4, 4), np.complex64))
    expect_input_error(read_map, "c.mrc", "mode 4", path=path)


def test_big_endian_without_machine_stamp(tmp_path: Path) -> None:
    data = np.arange(N * L * L, dtype=np.float32).reshape(N, L, L)
    path = write_stack(tmp_path / "be.mrcs", data.astype(">f4"))
    raw = bytearray(path.read_bytes())
    raw[212:216] = b"\0\0\0\0"  # old writers leave the stamp empty
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(_read_all(path), data)


# ------------------------------------------------------------------ pixel values
def test_nan_inf_pixels_counted_with_image_indices(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(6, L, L)).astype(np.float32)
    data[1, 0, :3] = np.nan
    data[4, 2, 2] = np.inf
    data[5, 1, 1] = -np.inf
    path = write_stack(tmp_path / "nan.mrcs", data)
    clear_stack_cache()
    msg = expect_input_error(load_particles, "nan.mrcs", "5 NaN/Inf pixels", "3 of 6",
                             path=path, no_ctf=True)
    assert "1, 4, 5" in msg
    # selecting only clean particles is fine; the indices reported are dataset indices
    assert len(load_particles(path, no_ctf=True, ind=np.array([0, 2, 3]))) == 3
    ps = load_particles(path, no_ctf=True, check_finite=False)
    msg = expect_input_error(ps.subset([5, 4]).check_finite, "2 of 2")


def test_constant_images_load_with_a_warning(tmp_path: Path) -> None:
    """Decision: zero-variance images are legal input (blank boxes happen in real data); the
    scan at load time warns, naming how many and which, and does not fail."""
    data = np.random.default_rng(0).normal(size=(5, L, L)).astype(np.float32)
    data[0] = 0.0
    data[3] = 7.5
    path = write_stack(tmp_path / "flat.mrcs", data)
    clear_stack_cache()
    with pytest.warns(UserWarning, match=r"2 of 5 images are constant.*0, 3"):
        ps = load_particles(path, no_ctf=True)
    np.testing.assert_array_equal(ps.images_numpy([3]), data[[3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_particles(path, no_ctf=True, ind=[1, 2, 4])  # no constant image selected: silent


# ------------------------------------------------------------------ not an MRC at all
@FUZZ
@given(blob=st.binary(min_size=0, max_size=3000))
def test_random_bytes(tmp_path_factory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("rnd") / "r.mrcs"
    path.write_bytes(blob)
    kind, _ = outcome(_read_all, path)
    outcome(read_map, path)
    outcome(load_particles, path, no_ctf=True)
    if len(blob) < 1024:
        assert kind == "input_error"


def test_empty_file_and_directory_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.mrcs").write_bytes(b"")
    expect_input_error(_read_all, "empty.mrcs", path=tmp_path / "empty.mrcs")
    expect_input_error(load_particles, "empty.mrcs", path=tmp_path / "empty.mrcs", no_ctf=True)
    (tmp_path / "dir.mrcs").mkdir()
    expect_input_error(_read_all, "dir.mrcs", path=tmp_path / "dir.mrcs")
    expect_input_error(read_map, "dir.mrcs", path=tmp_path / "dir.mrcs")
    expect_input_error(load_particles, "dir.mrcs", path=tmp_path / "dir.mrcs", no_ctf=True)
    expect_input_error(read_map, "nope.mrc", "not found", path=tmp_path / "nope.mrc")


def test_text_file_named_mrc(tmp_path: Path) -> None:
    path = tmp_path / "notes.mrc"
    path.write_text("this is not a map\n" * 200)
    expect_input_error(read_map, "notes.mrc", "not an MRC file", path=path)


@pytest.mark.parametrize("rows", [3, 200])  # shorter and longer than an MRC header
def test_star_file_given_as_a_map_or_stack(tmp_path: Path, rows: int) -> None:
    """Not "unsupported MRC mode 544499813" ("a_da" of "data_" read as the mode)."""
    path = tmp_path / "particles.star"
    path.write_text("\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n"
                    + "".join(f"{i + 1:06d}@stack_0001.mrcs 15000.0\n" for i in range(rows)))
    for reader in (read_map, _read_all):
        msg = expect_input_error(reader, "particles.star: not an MRC file (no MRC header;",
                                 "text", path=path)
        assert "mode" not in msg


def test_binary_file_without_map_word_or_sane_header(tmp_path: Path) -> None:
    path = tmp_path / "blob.mrc"
    path.write_bytes(bytes(range(256)) * 8)  # nx = 0x03020100, mode 0x0f0e0d0c, no "MAP "
    expect_input_error(read_map, "blob.mrc: not an MRC file (no MRC header;", '"MAP "',
                       path=path)


def test_missing_map_word_alone_still_reads(tmp_path: Path) -> None:
    """Old writers leave bytes 208-211 empty: a sane mode and dimensions are enough."""
    path, data = _good_stack(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"\0\0\0\0"
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(read_map(path)[0], data)


def test_index_out_of_range_in_read(tmp_path: Path) -> None:
    path, _ = _good_stack(tmp_path)
    clear_stack_cache()
    stack = ImageStack(path)
    with pytest.raises(InputError, match="out of range"):
        stack.read([0, N])
    with pytest.raises(InputError, match="out of range"):
        stack.read(-1)
