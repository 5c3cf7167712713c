"""Bad input through the command line: one clear line naming the file, exit status 2, no
traceback (issue: foundation, "Bad input")."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryospin.cli.main import main

BOX = 16
PIXEL = 2.0


def _stack(path: Path, n: int = 4, box: tuple[int, int] = (BOX, BOX), fill=None) -> Path:
    data = np.random.default_rng(0).normal(size=(n, *box)).astype(np.float32)
    if fill is not None:
        fill(data)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = PIXEL
    return path


CTF_COLUMNS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
               "rlnSphericalAberration", "rlnAmplitudeContrast"]


def _star(path: Path, names: list[str], *, drop: tuple[str, ...] = (),
          pixel: float | list[float] = PIXEL, box: int = BOX) -> Path:
    cols = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
            "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOpticsGroup"]
    cols = [c for c in cols if c not in drop]
    optics_cols = ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage",
                   "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                   "rlnImageSize", "rlnImageDimensionality"]
    optics_cols = [c for c in optics_cols if c not in drop]
    pixels = pixel if isinstance(pixel, list) else [pixel]
    lines = ["", "data_optics", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(optics_cols)]
    for g, p in enumerate(pixels, start=1):
        row = {"rlnOpticsGroup": g, "rlnOpticsGroupName": f"opticsGroup{g}", "rlnVoltage": 300,
               "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
               "rlnImagePixelSize": p, "rlnImageSize": box, "rlnImageDimensionality": 2}
        lines.append(" ".join(str(row[c]) for c in optics_cols))
    lines += ["", "data_particles", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for i, name in enumerate(names):
        row = {"rlnImageName": name, "rlnDefocusU": 15000, "rlnDefocusV": 14000,
               "rlnDefocusAngle": 10, "rlnPhaseShift": 0, "rlnAngleRot": 10 * i,
               "rlnAngleTilt": 20, "rlnAnglePsi": 30, "rlnOpticsGroup": 1 + i % len(pixels)}
        lines.append(" ".join(str(row[c]) for c in cols))
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_expect_error(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _backproject(star: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["backproject", str(star), "-o", str(tmp_path / "out"), *extra]


def test_missing_file(tmp_path: Path, capsys) -> None:
    _run_expect_error(_backproject(tmp_path / "nope.star", tmp_path), capsys, "nope.star")


def test_rows_past_end_of_stack(tmp_path: Path, capsys) -> None:
    _stack(tmp_path / "s.mrcs", n=4)
    star = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 7)])
    _run_expect_error(_backproject(star, tmp_path), capsys, "s.mrcs")


@pytest.mark.parametrize("index", ["0", "-1"])
def test_index_zero_or_negative(tmp_path: Path, capsys, index: str) -> None:
    _stack(tmp_path / "s.mrcs", n=4)
    star = _star(tmp_path / "p.star", ["1@s.mrcs", f"{index}@s.mrcs"])
    _run_expect_error(_backproject(star, tmp_path), capsys, "p.star")


def test_non_square_images(tmp_path: Path, capsys) -> None:
    _stack(tmp_path / "s.mrcs", n=2, box=(BOX, BOX + 2))
    star = _star(tmp_path / "p.star", ["1@s.mrcs", "2@s.mrcs"])
    _run_expect_error(_backproject(star, tmp_path), capsys, "s.mrcs")


def test_boxes_differ_between_stacks(tmp_path: Path, capsys) -> None:
    _stack(tmp_path / "a.mrcs", n=2)
    _stack(tmp_path / "b.mrcs", n=2, box=(BOX + 4, BOX + 4))
    star = _star(tmp_path / "p.star", ["1@a.mrcs", "1@b.mrcs"], drop=("rlnImageSize",))
    _run_expect_error(_backproject(star, tmp_path), capsys, "mrcs")


def test_missing_ctf_columns_are_named_and_no_ctf_proceeds(tmp_path: Path, capsys) -> None:
    _stack(tmp_path / "s.mrcs", n=4)
    star = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 3, 4)],
                 drop=("rlnDefocusU", "rlnVoltage"))
    line = _run_expect_error(_backproject(star, tmp_path), capsys, "p.star", "rlnDefocusU",
                             "rlnVoltage")
    assert "--no-ctf" in line
    assert main(_backproject(star, tmp_path, "--no-ctf")) == 0
    assert (tmp_path / "out" / "map.mrc").is_file()


def test_nan_and_inf_pixels_counted_by_image(tmp_path: Path, capsys) -> None:
    def poison(data: np.ndarray) -> None:
        data[1, 0, :3] = np.nan
        data[3, 5, 5] = np.inf

    _stack(tmp_path / "s.mrcs", n=4, fill=poison)
    star = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 3, 4)])
    line = _run_expect_error(_backproject(star, tmp_path), capsys, "s.mrcs")
    assert "4" in line and ("NaN" in line or "nan" in line.lower())


def test_conflicting_pixel_sizes(tmp_path: Path, capsys) -> None:
    _stack(tmp_path / "s.mrcs", n=4)
    star = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 3, 4)], pixel=[2.0, 2.5])
    _run_expect_error(_backproject(star, tmp_path), capsys, "p.star", "pixel")


def test_truncated_mrc(tmp_path: Path, capsys) -> None:
    path = _stack(tmp_path / "s.mrcs", n=4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    star = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 3, 4)])
    _run_expect_error(_backproject(star, tmp_path), capsys, "s.mrcs")


def test_outputs_not_left_half_written(tmp_path: Path) -> None:
    _stack(tmp_path / "s.mrcs", n=4)
    star = _star(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 3, 4)])
    assert main(_backproject(star, tmp_path)) == 0
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if ".tmp." in p.name]
    assert leftovers == []
