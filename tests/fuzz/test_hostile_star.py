"""Hostile RELION star input: deleted lines/columns, duplicated columns, non-numeric values,
short rows, unicode and absolute paths, duplicate names, missing optics groups, empty tables,
huge indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cryospin.io import clear_stack_cache, load_particles, read_relion_star
from cryospin.io.star import rotation_from_relion_euler
from tests.fuzz import FUZZ, FUZZ_FEW, expect_input_error, outcome, star_text, write_stack

N, L, PIXEL = 4, 16, 2.0
VERSIONS = ["3.0", "3.1", "5"]


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stars")
    data = np.random.default_rng(0).normal(size=(N, L, L)).astype(np.float32)
    write_stack(d / "s.mrcs", data, PIXEL)
    return d


def _names() -> list[str]:
    return [f"{i:06d}@s.mrcs" for i in range(1, N + 1)]


def _expected(version: str) -> dict[str, dict[str, float]]:
    """Per image name, the values the reader must return (from :func:`star_text`)."""
    out = {}
    for i, name in enumerate(_names()):
        origin_px = (1.5, -2.0) if version == "3.0" else (3.0 / PIXEL, -4.0 / PIXEL)
        out[name] = {"dfu": 15000 + 10 * i, "dfv": 14000 + 10 * i, "rot": 5 * i,
                     "sx": -origin_px[0], "sy": -origin_px[1], "image_index": i}
    return out


def _check_values(ps, version: str) -> None:
    """Every value the reader returned belongs to the right particle (no column shift)."""
    exp = _expected(version)
    assert ps.names is not None
    assert ps.pixel_size_angstrom in (0.0, pytest.approx(PIXEL))
    assert ps.box_px == L
    for k, name in enumerate(ps.names):
        e = exp[name]
        assert int(ps.image_index[k]) == e["image_index"]
        if ps.ctf is not None:
            assert float(ps.ctf.defocus_u_angstrom[k]) == e["dfu"]
            assert float(ps.ctf.defocus_v_angstrom[k]) == e["dfv"]
            assert float(ps.ctf.voltage_kv[k]) == 300
            assert float(ps.ctf.amplitude_contrast[k]) == pytest.approx(0.1)
        if ps.rotations is not None:
            R = rotation_from_relion_euler([e["rot"]], [20.0], [30.0])[0]
            torch.testing.assert_close(ps.rotations[k], R)
        if ps.shifts_px is not None and ps.pixel_size_angstrom > 0:
            sx, sy = ps.shifts_px[k].tolist()
            if (sx, sy) != (0.0, 0.0):  # zero when the origin columns were dropped
                assert (sx, sy) == pytest.approx((e["sx"], e["sy"]))


def _write(d: Path, text: str, name: str = "p.star") -> Path:
    path = d / name
    path.write_text(text, encoding="utf-8")
    return path


def _load(path: Path, **kw):
    clear_stack_cache()
    return load_particles(path, **kw)


@pytest.mark.parametrize("version", VERSIONS)
def test_valid_stars_parse_to_the_written_values(stack_dir: Path, version: str) -> None:
    ps = _load(_write(stack_dir, star_text(_names(), version=version, pixel=PIXEL, box=L)))
    assert len(ps) == N
    _check_values(ps, version)


# ------------------------------------------------------------------ random deletions
@FUZZ
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_deleting_lines(stack_dir: Path, tmp_path_factory, version: str, data) -> None:
    lines = star_text(_names(), version=version, pixel=PIXEL, box=L).splitlines()
    drop = data.draw(st.sets(st.integers(0, len(lines) - 1), min_size=1, max_size=4))
    text = "\n".join(ln for k, ln in enumerate(lines) if k not in drop) + "\n"
    path = _write(tmp_path_factory.mktemp("del"), text)
    kind, ps = outcome(_load, path, datadir=stack_dir)
    if kind == "ok":
        _check_values(ps, version)
    else:
        assert "p.star" in str(ps) or "s.mrcs" in str(ps)


def _table_rows(text: str, block: str) -> tuple[list[str], int, int]:
    lines = text.splitlines()
    start = lines.index(block)
    loop = lines.index("loop_", start)
    k = loop + 1
    while k < len(lines) and lines[k].startswith("_"):
        k += 1
    return lines, loop + 1, k  # header lines [loop+1, k), rows from k


@FUZZ
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_deleting_columns(stack_dir: Path, tmp_path_factory, version: str, data) -> None:
    text = star_text(_names(), version=version, pixel=PIXEL, box=L)
    block = "data_" if version == "3.0" else "data_particles"
    lines, h0, h1 = _table_rows(text, block)
    ncol = h1 - h0
    drop = data.draw(st.sets(st.integers(0, ncol - 1), min_size=1, max_size=3))
    header = [ln for c, ln in enumerate(lines[h0:h1]) if c not in drop]
    rows = [" ".join(f for c, f in enumerate(ln.split()) if c not in drop)
            for ln in lines[h1:h1 + N]]
    new = lines[:h0] + header + rows + lines[h1 + N:]
    path = _write(tmp_path_factory.mktemp("delc"), "\n".join(new) + "\n")
    kind, ps = outcome(_load, path, datadir=stack_dir)
    if kind == "ok":
        _check_values(ps, version)


@pytest.mark.parametrize("version", ["3.0", "3.1"])
@pytest.mark.parametrize("col", ["rlnDefocusU", "rlnImageName", "rlnAngleRot"])
def test_duplicated_column(stack_dir: Path, tmp_path: Path, version: str, col: str) -> None:
    text = star_text(_names(), version=version, pixel=PIXEL, box=L)
    lines, h0, h1 = _table_rows(text, "data_" if version == "3.0" else "data_particles")
    header = lines[h0:h1]
    c = [h.split()[0] for h in header].index(f"_{col}")
    new_header = header + [f"_{col} #{len(header) + 1}"]
    rows = [ln + " " + ln.split()[c] for ln in lines[h1:h1 + N]]
    path = _write(tmp_path, "\n".join(lines[:h0] + new_header + rows + lines[h1 + N:]) + "\n")
    kind, ps = outcome(_load, path, datadir=stack_dir)
    if kind == "ok":  # identical duplicates may be accepted, but must parse right
        _check_values(ps, version)
    else:
        assert col in str(ps)


def test_duplicated_column_with_different_values_is_rejected(stack_dir, tmp_path) -> None:
    text = star_text(_names(), version="3.1", pixel=PIXEL, box=L)
    lines, h0, h1 = _table_rows(text, "data_particles")
    header = lines[h0:h1] + ["_rlnDefocusU #99"]
    rows = [ln + " 999" for ln in lines[h1:h1 + N]]
    path = _write(tmp_path, "\n".join(lines[:h0] + header + rows) + "\n")
    expect_input_error(_load, "p.star", "rlnDefocusU", path=path, datadir=stack_dir)


def test_missing_image_name(stack_dir: Path, tmp_path: Path) -> None:
    text = star_text(_names(), pixel=PIXEL, box=L).replace("_rlnImageName", "_rlnMicName")
    expect_input_error(_load, "p.star", "rlnImageName", path=_write(tmp_path, text))


# ------------------------------------------------------------------ bad values
NUMERIC_PARTICLE_COLS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot",
                         "rlnAngleTilt", "rlnOriginXAngst", "rlnOpticsGroup"]
NUMERIC_OPTICS_COLS = ["rlnVoltage", "rlnImagePixelSize", "rlnImageSize",
                       "rlnAmplitudeContrast", "rlnOpticsGroup"]
NUMERIC_30_COLS = ["rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX", "rlnVoltage"]


def _replace_field(text: str, block: str, col: str, row: int, value: str) -> str:
    lines, h0, h1 = _table_rows(text, block)
    c = [h.split()[0] for h in lines[h0:h1]].index(f"_{col}")
    f = lines[h1 + row].split()
    f[c] = value
    lines[h1 + row] = " ".join(f)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("value", ["abc", "nan", '""', "inf", "1,5"])
@pytest.mark.parametrize("where", [("data_particles", c) for c in NUMERIC_PARTICLE_COLS]
                         + [("data_optics", c) for c in NUMERIC_OPTICS_COLS]
                         + [("data_", c) for c in NUMERIC_30_COLS])
def test_non_numeric_values(stack_dir, tmp_path, value: str, where: tuple[str, str]) -> None:
    block, col = where
    version = "3.0" if block == "data_" else "3.1"
    text = star_text(_names(), version=version, pixel=PIXEL, box=L)
    row = 0 if block == "data_optics" else 2
    text = _replace_field(text, block, col, row, value)
    path = _write(tmp_path, text)
    kind, val = outcome(_load, path, datadir=stack_dir)
    assert kind == "input_error", f"{col}={value} accepted: {val}"
    assert "p.star" in str(val)
    assert col in str(val) or "optics group" in str(val), str(val)


@FUZZ
@given(version=st.sampled_from(VERSIONS), row=st.integers(0, N - 1), keep=st.integers(0, 12),
       junk=st.sampled_from(["", " 1.0 2.0", " abc", " @@@", " 1@s.mrcs"]))
def test_rows_with_too_few_or_too_many_fields(stack_dir, tmp_path_factory, version: str,
                                             row: int, keep: int, junk: str) -> None:
    text = star_text(_names(), version=version, pixel=PIXEL, box=L)
    lines, h0, h1 = _table_rows(text, "data_" if version == "3.0" else "data_particles")
    fields = lines[h1 + row].split()
    lines[h1 + row] = " ".join(fields[:keep]) + junk
    path = _write(tmp_path_factory.mktemp("short"), "\n".join(lines) + "\n")
    kind, ps = outcome(_load, path, datadir=stack_dir)
    if kind == "ok":  # only an unchanged row, or one emptied to a blank line, may parse
        now = lines[h1 + row].split()
        assert now == fields or (now == [] and len(ps) == N - 1), (now, len(ps))
        _check_values(ps, version)


@FUZZ_FEW
@given(index=st.sampled_from(["0", "-3", "5", "2147483648", "9223372036854775807",
                              "9223372036854775808", "99999999999999999999999", "1e3", "0x1",
                              "１", "", "abc", "1.5"]))
def test_bad_or_huge_image_index(stack_dir, tmp_path_factory, index: str) -> None:
    names = _names()
    names[1] = f"{index}@s.mrcs"
    path = _write(tmp_path_factory.mktemp("idx"), star_text(names, pixel=PIXEL, box=L))
    msg = expect_input_error(_load, "p.star", path=path, datadir=stack_dir)
    assert "row 2" in msg or "points past the end" in msg, msg
    kind, val = outcome(_load, path, datadir=stack_dir, metadata_only=True)
    if kind == "ok":  # without the stacks, only what can be known is checked
        assert int(val.image_index[1]) == int(index) - 1 >= 0


# ------------------------------------------------------------------ paths
@pytest.mark.parametrize("folder", ["données_粒子", "with space", "x@y"])
def test_unicode_and_odd_folder_names(tmp_path: Path, folder: str) -> None:
    d = tmp_path / folder
    d.mkdir()
    data = np.random.default_rng(3).normal(size=(N, L, L)).astype(np.float32)
    write_stack(d / "s_é.mrcs", data, PIXEL)
    names = [f"{i}@{folder}/s_é.mrcs" for i in range(1, N + 1)]
    path = _write(tmp_path, star_text(names, pixel=PIXEL, box=L))
    if " " in folder:  # a space splits the STAR field: RELION cannot write this either
        outcome(_load, path)
        return
    ps = _load(path)
    np.testing.assert_array_equal(ps.images_numpy(), data)
    # absolute paths resolve too
    names = [f"{i}@{d / 's_é.mrcs'}" for i in range(1, N + 1)]
    ps = _load(_write(tmp_path / folder, star_text(names, pixel=PIXEL, box=L), "abs.star"))
    np.testing.assert_array_equal(ps.images_numpy([3, 0]), data[[3, 0]])


def test_relative_to_star_folder_not_cwd(stack_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    sub = stack_dir / "sub"
    sub.mkdir(exist_ok=True)
    path = _write(sub, star_text([f"{i}@../s.mrcs" for i in range(1, N + 1)], pixel=PIXEL,
                                 box=L))
    assert len(_load(path)) == N
    expect_input_error(_load, "p.star", "not found",
                       path=_write(tmp_path, star_text(["1@nowhere/zz.mrcs"], pixel=PIXEL)))


def test_duplicate_particle_names_allowed(stack_dir: Path, tmp_path: Path) -> None:
    names = ["2@s.mrcs", "2@s.mrcs", "1@s.mrcs", "2@s.mrcs"]
    ps = _load(_write(tmp_path, star_text(names, pixel=PIXEL, box=L)), datadir=stack_dir)
    assert len(ps) == 4 and ps.image_index.tolist() == [1, 1, 0, 1]
    imgs = ps.images_numpy()
    np.testing.assert_array_equal(imgs[0], imgs[1])
    assert float(ps.ctf.defocus_u_angstrom[3]) == 15030  # rows keep their own metadata


# ------------------------------------------------------------------ optics and tables
def test_optics_group_absent_from_data_optics(stack_dir: Path, tmp_path: Path) -> None:
    text = star_text(_names(), pixel=PIXEL, box=L)
    text = _replace_field(text, "data_particles", "rlnOpticsGroup", 2, "7")
    expect_input_error(_load, "p.star", "[7]", "data_optics", path=_write(tmp_path, text),
                       datadir=stack_dir)


def test_duplicated_optics_group(stack_dir: Path, tmp_path: Path) -> None:
    text = star_text(_names(), pixel=PIXEL, box=L)
    lines, h0, h1 = _table_rows(text, "data_optics")
    lines.insert(h1 + 1, lines[h1].replace("opticsGroup1", "other").replace(" 300 ", " 200 "))
    expect_input_error(_load, "p.star", "optics group [1] defined more than once",
                       path=_write(tmp_path, "\n".join(lines)), datadir=stack_dir)


def test_empty_particle_block(stack_dir: Path, tmp_path: Path) -> None:
    text = star_text(_names(), pixel=PIXEL, box=L)
    lines, h0, h1 = _table_rows(text, "data_particles")
    expect_input_error(_load, "p.star", path=_write(tmp_path, "\n".join(lines[:h1]) + "\n"))
    expect_input_error(_load, "p.star", path=_write(tmp_path, "\n".join(lines[:h0 - 1]) + "\n"))


@pytest.mark.parametrize("content", [b"", b"\x00\xff\xfe garbage \x89PNG", b"data_\n",
                                     b"data_particles\nloop_\n", b"loop_\n_rlnImageName\n",
                                     "data_\nloop_\n_rlnImageName #1\n1@s.mrcs\n".encode("utf-16")])
def test_not_a_star(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "p.star"
    path.write_bytes(content)
    expect_input_error(_load, "p.star", path=path)
    expect_input_error(read_relion_star, "p.star", path=path)


def test_star_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d.star").mkdir()
    expect_input_error(_load, "d.star", path=tmp_path / "d.star")


@pytest.mark.parametrize("col, value", [("rlnImageSize", "0"), ("rlnImageSize", "-16"),
                                        ("rlnImageSize", "16.5"), ("rlnImagePixelSize", "-2")])
def test_nonsense_optics_values_with_metadata_only(tmp_path: Path, col: str, value: str) -> None:
    text = _replace_field(star_text(_names(), pixel=PIXEL, box=L), "data_optics", col, 0, value)
    expect_input_error(_load, "p.star", col, path=_write(tmp_path, text), metadata_only=True)


def test_zero_pixel_size_means_unknown_and_falls_back_to_the_header(stack_dir, tmp_path) -> None:
    text = _replace_field(star_text(_names(), pixel=PIXEL, box=L), "data_optics",
                          "rlnImagePixelSize", 0, "0")
    ps = _load(_write(tmp_path, text), datadir=stack_dir)
    assert ps.pixel_size_angstrom == pytest.approx(PIXEL)  # from the stack header
    _check_values(ps, "3.1")


@FUZZ
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_random_text_mutations(stack_dir: Path, tmp_path_factory, version: str, data) -> None:
    """Overwrite a random span of a valid star with random text (or bytes)."""
    raw = star_text(_names(), version=version, pixel=PIXEL, box=L).encode()
    start = data.draw(st.integers(0, len(raw) - 1))
    stop = data.draw(st.integers(start, min(len(raw), start + 40)))
    junk = data.draw(st.one_of(st.text(max_size=20).map(lambda t: t.encode("utf-8")),
                               st.binary(max_size=20)))
    path = tmp_path_factory.mktemp("mut") / "p.star"
    path.write_bytes(raw[:start] + junk + raw[stop:])
    kind, ps = outcome(_load, path, datadir=stack_dir)
    if kind == "ok":
        assert len(ps) <= N and ps.box_px == L


def test_short_row_without_image_name(stack_dir: Path, tmp_path: Path) -> None:
    text = star_text(_names(), pixel=PIXEL, box=L)
    lines, h0, h1 = _table_rows(text, "data_particles")
    lines.insert(h1 + 2, "")  # a blank line is fine
    path = _write(tmp_path, "\n".join(lines) + "\n")
    assert len(_load(path, datadir=stack_dir)) == N
