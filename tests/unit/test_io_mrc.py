"""MRC maps and stacks: axis order, header facts, lazy reads, atomic writes, bad input."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.io.mrc import (
    ImageStack,
    StackWriter,
    clear_stack_cache,
    open_stack,
    read_map,
    write_map,
    write_stack,
)
from cryospin.io.mrc_header import read_header


def _stack(n: int = 7, L: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, L, L)).astype(np.float32)


def test_write_map_read_map_round_trip(tmp_path):
    vol = np.random.default_rng(1).standard_normal((10, 10, 10)).astype(np.float32)
    out = tmp_path / "v.mrc"
    write_map(out, torch.from_numpy(vol), 1.7)
    back, vox = read_map(out)
    np.testing.assert_array_equal(back, vol)
    assert vox == pytest.approx(1.7, rel=1e-6)
    with mrcfile.open(out) as m:  # RELION convention: origin 0, nstart 0, axis order 1,2,3
        assert (m.header.nxstart, m.header.nystart, m.header.nzstart) == (0, 0, 0)
        assert float(m.header.origin.x) == 0.0
        assert (m.header.mapc, m.header.mapr, m.header.maps) == (1, 2, 3)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_write_map_origin(tmp_path):
    out = tmp_path / "v.mrc"
    write_map(out, np.zeros((4, 4, 4)), 1.0, origin_angstrom=(1.0, 2.0, 3.0))
    assert read_header(out).origin_xyz_angstrom == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("order", [(3, 1, 2), (2, 3, 1), (1, 3, 2), (3, 2, 1)])
def test_read_map_undoes_axis_permutation(tmp_path, order):
    """A volume stored with mapc/mapr/maps = ``order`` reads back as [z, y, x]."""
    rng = np.random.default_rng(2)
    vol_zyx = rng.standard_normal((5, 6, 7)).astype(np.float32)  # Z=5, Y=6, X=7
    # stored array axes are (maps, mapr, mapc); axis k of vol_zyx is letter 3-k (z=3, y=2, x=1)
    mapc, mapr, maps = order
    stored = np.transpose(vol_zyx, [3 - maps, 3 - mapr, 3 - mapc])
    out = tmp_path / "perm.mrc"
    with mrcfile.new(out) as m:
        m.set_data(np.ascontiguousarray(stored))
        m.header.mapc, m.header.mapr, m.header.maps = mapc, mapr, maps
        m.voxel_size = 2.0
    back, vox = read_map(out)
    assert back.shape == (5, 6, 7)
    np.testing.assert_array_equal(back, vol_zyx)
    assert vox == pytest.approx(2.0)


def test_image_stack_reads_in_requested_order(tmp_path):
    imgs = _stack()
    out = tmp_path / "s.mrcs"
    write_stack(out, imgs, 1.5)
    s = ImageStack(out)
    assert len(s) == 7 and s.box_px == 16
    assert s.pixel_size_angstrom == pytest.approx(1.5)
    idx = [5, 0, 1, 2, 6, 1, 3]
    np.testing.assert_array_equal(s.read(idx), imgs[idx])
    np.testing.assert_array_equal(s.read(slice(2, 5)), imgs[2:5])
    np.testing.assert_array_equal(s.read(), imgs)
    assert s.read([]).shape == (0, 16, 16)
    assert s.read(3).shape == (1, 16, 16)


def test_image_stack_other_modes_become_float32(tmp_path):
    data = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    out = tmp_path / "i16.mrcs"
    with mrcfile.new(out) as m:
        m.set_data(data)
    got = ImageStack(out).read([1, 0])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data[[1, 0]].astype(np.float32))


def test_pixel_size_zero_when_header_zero(tmp_path):
    out = tmp_path / "s.mrcs"
    with mrcfile.new(out) as m:
        m.set_data(_stack(2, 8))
        m.header.cella = (0.0, 0.0, 0.0)
    assert ImageStack(out).pixel_size_angstrom == 0.0


def test_out_of_range_index(tmp_path):
    out = tmp_path / "s.mrcs"
    write_stack(out, _stack(3, 8), 1.0)
    with pytest.raises(InputError, match="out of range: the stack has 3 images"):
        ImageStack(out).read([0, 3])


def test_missing_map_id_warns_and_reads(tmp_path):
    imgs = _stack(2, 8)
    out = tmp_path / "nomap.mrcs"
    write_stack(out, imgs, 1.0)
    raw = bytearray(out.read_bytes())
    raw[208:212] = b"\0\0\0\0"
    out.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="nomap.mrcs.*MAP"):
        s = ImageStack(out)
    np.testing.assert_array_equal(s.read([1]), imgs[[1]])


def test_truncated_mrc(tmp_path):
    out = tmp_path / "t.mrcs"
    write_stack(out, _stack(4, 8), 1.0)
    out.write_bytes(out.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"t\.mrcs: truncated MRC"):
        ImageStack(out)
    short = tmp_path / "short.mrc"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match="truncated MRC"):
        read_map(short)


def test_non_square_images(tmp_path):
    out = tmp_path / "rect.mrcs"
    with mrcfile.new(out) as m:
        m.set_data(np.zeros((2, 8, 10), np.float32))
    with pytest.raises(InputError, match=r"rect\.mrcs: images are not square"):
        ImageStack(out)


def test_unsupported_mode(tmp_path):
    out = tmp_path / "c.mrc"
    with mrcfile.new(out) as m:
        m.set_data(np.zeros((2, 4, 4), np.complex64))  # mode 4
    with pytest.raises(InputError, match="unsupported MRC mode 4"):
        ImageStack(out)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.mrcs: file not found"):
        ImageStack(tmp_path / "nope.mrcs")
    with pytest.raises(InputError, match="file not found"):
        read_map(tmp_path / "nope.map")


def test_error_is_one_line(tmp_path):
    out = tmp_path / "t.mrcs"
    out.write_bytes(b"\0" * 10)
    with pytest.raises(InputError) as info:
        ImageStack(out)
    assert "\n" not in str(info.value) and str(out) in str(info.value)


def test_stack_writer_chunks_and_header(tmp_path):
    imgs = _stack(10, 12)
    out = tmp_path / "w.mrcs"
    with StackWriter(out, 10, 12, 2.5) as w:
        assert not out.exists()  # written under a temporary name
        for start in range(0, 10, 3):
            w.write(imgs[start : start + 3])
    with mrcfile.open(out) as m:
        np.testing.assert_array_equal(m.data, imgs)
        assert float(m.voxel_size.x) == pytest.approx(2.5)
        assert m.header.dmean == pytest.approx(float(imgs.astype(np.float64).mean()), abs=1e-5)
        assert m.header.dmax == pytest.approx(float(imgs.max()))
        assert m.header.rms == pytest.approx(float(imgs.astype(np.float64).std()), rel=1e-5)
        assert m.is_image_stack()
    assert ImageStack(out).pixel_size_angstrom == pytest.approx(2.5)


def test_stack_writer_is_atomic_on_error(tmp_path):
    out = tmp_path / "w.mrcs"
    with pytest.raises(RuntimeError, match="boom"):
        with StackWriter(out, 4, 8, 1.0) as w:
            w.write(_stack(2, 8))
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_stack_writer_requires_all_images(tmp_path):
    out = tmp_path / "w.mrcs"
    with pytest.raises(ValueError, match="got 2 of 4 images"):
        with StackWriter(out, 4, 8, 1.0) as w:
            w.write(_stack(2, 8))
    assert not out.exists()
    with pytest.raises(ValueError, match="too many"):
        with StackWriter(out, 1, 8, 1.0) as w:
            w.write(_stack(2, 8))


def test_open_stack_caches_handles(tmp_path):
    clear_stack_cache()
    out = tmp_path / "s.mrcs"
    write_stack(out, _stack(3, 8), 1.0)
    a = open_stack(out)
    assert open_stack(out) is a
    write_stack(out, _stack(5, 8), 1.0)  # rewritten file is reopened
    b = open_stack(out)
    assert b is not a and len(b) == 5
    clear_stack_cache()


def test_no_warning_for_normal_stack(tmp_path):
    out = tmp_path / "s.mrcs"
    write_stack(out, _stack(2, 8), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageStack(out).read([0])
