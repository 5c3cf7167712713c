"""Hostile cryoSPARC .cs input: wrong field dtypes/shapes, missing blob fields, out-of-range
indices, zero rows, bytes vs str paths, truncated or forged .npy files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cryospin.io import clear_stack_cache, load_particles, read_cryosparc, read_cs_table
from cryospin.io.cs import rotation_from_cryosparc_pose
from tests.fuzz import FUZZ, expect_input_error, outcome, write_stack

N, L, PIXEL = 5, 16, 2.0


def _fields() -> list[tuple]:
    return [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
            ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
            ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
            ("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/psize_A", "<f4"), ("alignments3D/split", "<u4")]


def _values(n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "uid": np.arange(n), "blob/path": np.array([b"J3/extract/s.mrcs"] * n),
        "blob/idx": np.arange(n) % N, "blob/shape": np.full((n, 2), L),
        "blob/psize_A": np.full(n, PIXEL), "ctf/accel_kv": np.full(n, 300.0),
        "ctf/cs_mm": np.full(n, 2.7), "ctf/amp_contrast": np.full(n, 0.07),
        "ctf/df1_A": 15000 + 10.0 * np.arange(n), "ctf/df2_A": 14000 + 10.0 * np.arange(n),
        "ctf/df_angle_rad": np.full(n, 0.25), "alignments3D/shift": rng.uniform(-3, 3, (n, 2)),
        "alignments3D/pose": rng.uniform(-1, 1, (n, 3)), "alignments3D/psize_A": np.full(n, PIXEL),
        "alignments3D/split": np.arange(n) % 2,
    }


def _table(n: int = N, *, drop: tuple[str, ...] = (), dtypes: dict | None = None,
           values: dict | None = None) -> np.ndarray:
    """A particle .cs table; ``dtypes`` replaces a field's dtype spec, ``values`` its values."""
    specs = []
    for f in _fields():
        if f[0] in drop:
            continue
        specs.append((f[0], *dtypes[f[0]]) if dtypes and f[0] in dtypes else f)
    t = np.zeros(n, dtype=specs)
    vals = _values(n)
    vals.update(values or {})
    for name in t.dtype.names:
        t[name] = vals[name]
    return t


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("cs")
    (d / "J3" / "extract").mkdir(parents=True)
    data = np.random.default_rng(0).normal(size=(N, L, L)).astype(np.float32)
    write_stack(d / "J3" / "extract" / "s.mrcs", data, PIXEL)
    return d, data


def _save(d: Path, table, name: str = "p.cs") -> Path:
    path = d / name
    with open(path, "wb") as fh:  # np.save would append .npy
        np.save(fh, table, allow_pickle=False)
    return path


def _load(path: Path, **kw):
    clear_stack_cache()
    return load_particles(path, **kw)


def _check(ps, table: np.ndarray) -> None:
    assert len(ps) == len(table) and ps.box_px == L
    assert ps.pixel_size_angstrom == pytest.approx(PIXEL)
    np.testing.assert_array_equal(ps.image_index, np.asarray(table["blob/idx"], np.int64))
    if ps.ctf is not None:
        np.testing.assert_allclose(ps.ctf.defocus_u_angstrom.numpy(), table["ctf/df1_A"])
    if ps.rotations is not None:
        torch.testing.assert_close(
            ps.rotations,
            rotation_from_cryosparc_pose(np.asarray(table["alignments3D/pose"], np.float64)))
        np.testing.assert_allclose(ps.shifts_px.numpy(), -table["alignments3D/shift"],
                                   rtol=1e-6)


def test_valid_table_parses(project) -> None:
    d, data = project
    t = _table()
    ps = _load(_save(d, t))
    _check(ps, t)
    np.testing.assert_array_equal(ps.images_numpy(), data)


@pytest.mark.parametrize("kind", ["S", "U"])
@pytest.mark.parametrize("raw", ["J3/extract/s.mrcs", ">J3/extract/s.mrcs", "P9/J3/extract/s.mrcs",
                                 "ABS"])
def test_bytes_and_str_paths(project, kind: str, raw: str) -> None:
    d, _ = project
    if raw == "ABS":
        raw = str(d / "J3" / "extract" / "s.mrcs")
    t = _table(dtypes={"blob/path": (f"{kind}200",)},
               values={"blob/path": np.array([raw] * N)})
    _check(_load(_save(d, t)), t)


@pytest.mark.parametrize("raw", [b"\xff\xfe/bad.mrcs", b"", b"J3/extract/missing.mrcs"])
def test_unresolvable_paths(project, raw: bytes) -> None:
    d, _ = project
    t = _table(values={"blob/path": np.array([raw] * N)})
    expect_input_error(_load, "p.cs", "not found", path=_save(d, t))


@pytest.mark.parametrize("spec, values", [(("<u4",), np.arange(N)),
                                          (("S20", (2,)), np.full((N, 2), b"s.mrcs"))])
def test_blob_path_not_text(project, spec, values) -> None:
    d, _ = project
    t = _table(dtypes={"blob/path": spec}, values={"blob/path": values})
    expect_input_error(_load, "p.cs", "blob/path", path=_save(d, t))


@pytest.mark.parametrize("field", ["blob/path", "blob/idx"])
def test_missing_blob_fields(project, field: str) -> None:
    d, _ = project
    expect_input_error(_load, "p.cs", field, path=_save(d, _table(drop=(field,))))


@pytest.mark.parametrize("idx_dtype, idx, needle", [
    ("<u4", [0, 1, 2, 3, N], "past the end"),
    ("<u4", [0, 1, 2, 3, 2**32 - 1], "past the end"),
    ("<i8", [0, 1, -1, 3, 4], "negative"),
    ("<u8", [0, 1, 2, 3, 2**64 - 1], "blob/idx"),
    ("<f4", [0, 1, 2.5, 3, 4], "blob/idx"),
    ("<f4", [0, 1, np.nan, 3, 4], "blob/idx"),
    ("S4", [b"0", b"1", b"x", b"3", b"4"], "blob/idx"),
])
def test_bad_blob_idx(project, idx_dtype: str, idx, needle: str) -> None:
    d, _ = project
    t = _table(dtypes={"blob/idx": (idx_dtype,)}, values={"blob/idx": np.array(idx, idx_dtype)})
    expect_input_error(_load, "p.cs", needle, path=_save(d, t))


def test_float_blob_idx_with_integer_values_is_fine(project) -> None:
    d, _ = project
    t = _table(dtypes={"blob/idx": ("<f8",)})
    _check(_load(_save(d, t)), t)


@pytest.mark.parametrize("field, spec, values", [
    ("blob/shape", ("<u4", (1,)), np.full((N, 1), L)),
    ("blob/shape", ("<u4", (3,)), np.full((N, 3), L)),
    ("blob/shape", ("<i4", (2,)), np.full((N, 2), -L)),
    ("blob/shape", ("<u4", (2,)), np.zeros((N, 2))),
    ("blob/psize_A", ("S8",), np.array([b"abc"] * N)),
    ("blob/psize_A", ("<f4",), np.full(N, -2.0)),
    ("ctf/df1_A", ("S8",), np.array([b"abc"] * N)),
    ("ctf/df1_A", ("<f4", (2,)), np.ones((N, 2))),
    ("ctf/accel_kv", ("<f4",), np.array([300, 300, np.inf, 300, 300])),
    ("alignments3D/pose", ("<f4", (4,)), np.ones((N, 4))),
    ("alignments3D/pose", ("<f4",), np.ones(N)),
    ("alignments3D/pose", ("S8", (3,)), np.array([[b"a", b"b", b"c"]] * N)),
    ("alignments3D/shift", ("<f4", (3,)), np.ones((N, 3))),
    ("alignments3D/shift", ("<f4", (2,)), np.array([[0, 0]] * 4 + [[np.nan, 0]])),
    ("alignments3D/psize_A", ("<f4",), np.full(N, np.nan)),
    ("alignments3D/split", ("<f4",), np.array([0, 1, 0.5, 1, 0])),
])
def test_wrong_field_dtypes_and_shapes(project, field: str, spec: tuple, values) -> None:
    d, _ = project
    t = _table(dtypes={field: spec}, values={field: values})
    expect_input_error(_load, "p.cs", field, path=_save(d, t))
    kind, val = outcome(_load, _save(d, t), metadata_only=True)
    if kind == "input_error":
        assert "p.cs" in str(val)


def test_zero_rows(project, tmp_path: Path) -> None:
    d, _ = project
    expect_input_error(_load, "z.cs", "no particles", path=_save(d, _table(0), "z.cs"))


def test_zero_row_shared_schema(shared_data: Path) -> None:
    path = shared_data / "formats" / "cryosparc" / "4k_dataset.cs"
    assert len(read_cs_table(path)) == 0
    expect_input_error(_load, "4k_dataset.cs", "no particles", path=path)
    expect_input_error(read_cryosparc, "4k_dataset.cs", path=path, metadata_only=True)


# ------------------------------------------------------------------ the file itself
@FUZZ
@given(frac=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_npy(project, frac: float) -> None:
    d, _ = project
    raw = _save(d, _table(), "full.cs").read_bytes()
    path = d / "t.cs"
    path.write_bytes(raw[: int(frac * len(raw))])
    expect_input_error(_load, "t.cs", path=path)


@FUZZ
@given(blob=st.binary(max_size=2000), with_magic=st.booleans())
def test_random_bytes(project, blob: bytes, with_magic: bool) -> None:
    d, _ = project
    path = d / "r.cs"
    path.write_bytes((b"\x93NUMPY\x01\x00" if with_magic else b"") + blob)
    kind, _ = outcome(_load, path)
    assert kind == "input_error"


@pytest.mark.parametrize("shape", ["(10**15,)", "(2**62,)", "(-5,)", "(5, 5)", "()"])
def test_forged_npy_header(project, shape: str) -> None:
    """A header announcing a huge array must be refused from the file size, not allocated."""
    d, _ = project
    descr = np.lib.format.dtype_to_descr(_table().dtype)
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape}, }}"
    hdr = header.encode("latin1")
    hdr += b" " * ((64 - (10 + len(hdr) + 1) % 64) % 64) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr + _table(1).tobytes()
    path = d / "f.cs"
    path.write_bytes(raw)
    expect_input_error(_load, "f.cs", path=path)


def test_npz_object_and_plain_arrays(project) -> None:
    d, _ = project
    np.savez(d / "z.npz", a=np.arange(3))
    (d / "z.cs").write_bytes((d / "z.npz").read_bytes())
    expect_input_error(_load, "z.cs", path=d / "z.cs")
    with open(d / "o.cs", "wb") as fh:
        np.save(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    expect_input_error(_load, "o.cs", path=d / "o.cs")
    expect_input_error(_load, "plain.cs", "structured", path=_save(d, np.arange(10.0),
                                                                     "plain.cs"))
    expect_input_error(_load, "two.cs", path=_save(d, np.stack([_table(), _table()]), "two.cs"))
    (d / "dir.cs").mkdir(exist_ok=True)
    expect_input_error(_load, "dir.cs", path=d / "dir.cs")
