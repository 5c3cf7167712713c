"""Hostile input to load_particles' dispatch and .txt stack lists, and the CLI contract:
malformed input exits with status 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cryospin.cli.main import main
from cryospin.io import clear_stack_cache, load_particles
from cryospin.rotations import random_rotations
from tests.fuzz import expect_input_error, star_text, write_stack

N, L, PIXEL = 4, 16, 2.0


@pytest.fixture
def stacks(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N, L, L)).astype(np.float32)
    b = rng.normal(size=(2, L, L)).astype(np.float32)
    (tmp_path / "sub").mkdir()
    write_stack(tmp_path / "a.mrcs", a, PIXEL)
    write_stack(tmp_path / "sub" / "b.mrcs", b, PIXEL)
    return tmp_path, a, b


def _load(path: Path, **kw):
    clear_stack_cache()
    return load_particles(path, **kw)


# ------------------------------------------------------------------ .txt stack lists
@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only a comment\n", "\t\n# x\n\n"])
def test_empty_lists(tmp_path: Path, text: str) -> None:
    (tmp_path / "l.txt").write_text(text)
    expect_input_error(_load, "l.txt", "empty", path=tmp_path / "l.txt", no_ctf=True)


def test_blank_lines_comments_and_crlf(stacks, monkeypatch) -> None:
    d, a, b = stacks
    monkeypatch.chdir("/")  # paths are relative to the list's folder, not the cwd
    (d / "l.txt").write_bytes(b"# stacks\r\n\r\na.mrcs  \r\n   \r\n  # b next\r\nsub/b.mrcs\r\n")
    ps = _load(d / "l.txt", no_ctf=True)
    assert len(ps) == N + 2 and ps.box_px == L and ps.pixel_size_angstrom == PIXEL
    np.testing.assert_array_equal(ps.images_numpy(), np.concatenate([a, b]))


def test_absolute_paths_and_datadir(stacks, tmp_path_factory) -> None:
    d, a, b = stacks
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "abs.txt").write_text(f"{d / 'sub' / 'b.mrcs'}\n")
    np.testing.assert_array_equal(_load(other / "abs.txt", no_ctf=True).images_numpy(), b)
    (other / "rel.txt").write_text("a.mrcs\n")
    expect_input_error(_load, "a.mrcs", "not found", path=other / "rel.txt", no_ctf=True)
    assert len(_load(other / "rel.txt", no_ctf=True, datadir=d)) == N


@pytest.mark.parametrize("line", ["missing.mrcs", "1@a.mrcs", "sub", "l.txt"])
def test_missing_or_bad_stack_named_with_its_line(stacks, line: str) -> None:
    d, _, _ = stacks
    (d / "l.txt").write_text(f"a.mrcs\n\n{line}\n")
    msg = expect_input_error(_load, "l.txt", path=d / "l.txt", no_ctf=True)
    assert "line 3" in msg and line in msg


def test_list_not_utf8_or_a_directory(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_bytes(b"\xff\xfe\x00a\x00.mrcs")
    expect_input_error(_load, "l.txt", path=tmp_path / "l.txt", no_ctf=True)
    (tmp_path / "d.txt").mkdir()
    expect_input_error(_load, "d.txt", path=tmp_path / "d.txt", no_ctf=True)


def test_plain_stacks_need_ctf_or_no_ctf(stacks) -> None:
    d, _, _ = stacks
    expect_input_error(_load, "a.mrcs", "ctf", path=d / "a.mrcs")


def test_mixed_boxes_and_pixel_sizes_in_list(stacks) -> None:
    d, _, _ = stacks
    write_stack(d / "big.mrcs", np.zeros((1, L + 2, L + 2), np.float32), PIXEL)
    write_stack(d / "px.mrcs", np.ones((1, L, L), np.float32), 3.0)
    (d / "l.txt").write_text("a.mrcs\nbig.mrcs\n")
    expect_input_error(_load, "l.txt", "boxes", path=d / "l.txt", no_ctf=True)
    (d / "l.txt").write_text("a.mrcs\npx.mrcs\n")
    expect_input_error(_load, "l.txt", "pixel", path=d / "l.txt", no_ctf=True)


# ------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("name", ["p.json", "p", "p.star.bak", "p.mrc.gz"])
def test_unknown_suffix(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("x")
    expect_input_error(_load, name, "unknown particle file type", path=tmp_path / name)


def test_missing_file(tmp_path: Path) -> None:
    for name in ("p.star", "p.cs", "p.txt", "p.mrcs"):
        expect_input_error(_load, name, "not found", path=tmp_path / name)


@pytest.mark.parametrize("content", [b"1 2 x\n", b"0.5\n", b"[0, 1]\n", b"\xff\xfe", b"7\n"])
def test_bad_index_text_files(stacks, content: bytes) -> None:
    d, _, _ = stacks
    (d / "ind.txt").write_bytes(content)
    expect_input_error(_load, "ind.txt", path=d / "a.mrcs", no_ctf=True, ind=d / "ind.txt")


def test_index_selection_order_and_duplicates(stacks) -> None:
    d, a, _ = stacks
    (d / "ind.txt").write_text("3\n0\n3\n")
    ps = _load(d / "a.mrcs", no_ctf=True, ind=d / "ind.txt")
    np.testing.assert_array_equal(ps.images_numpy(), a[[3, 0, 3]])


# ------------------------------------------------------------------ through the CLI
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cases(d: Path) -> dict[str, list[str]]:
    """name -> backproject arguments (particles and extra flags) of one hostile input."""
    names = [f"{i}@a.mrcs" for i in range(1, N + 1)]
    (d / "ok.star").write_text(star_text(names, pixel=PIXEL, box=L))
    (d / "junk.mrcs").write_bytes(os.urandom(1500))
    (d / "trunc.mrcs").write_bytes((d / "a.mrcs").read_bytes()[:-7])
    (d / "nan.star").write_text(star_text(names, pixel=PIXEL, box=L).replace(" 15010 ",
                                                                              " abc "))
    (d / "huge.star").write_text(star_text(["1@a.mrcs", "99999999999999999999999@a.mrcs"],
                                           pixel=PIXEL, box=L))
    (d / "dup.star").write_text(star_text(names, pixel=PIXEL, box=L).replace(
        "_rlnDefocusV #3", "_rlnDefocusU #3"))
    with open(d / "bad.cs", "wb") as fh:
        t = np.zeros(N, dtype=[("blob/path", "S20"), ("blob/idx", "S4")])
        t["blob/path"], t["blob/idx"] = b"a.mrcs", b"x"
        np.save(fh, t)
    (d / "trunc.cs").write_bytes((d / "bad.cs").read_bytes()[:100])
    (d / "evil.pkl").write_bytes(pickle.dumps(_Evil(d / "pwned")))
    (d / "ctf8.pkl").write_bytes(pickle.dumps(np.zeros((N, 8), np.float32)))
    rot = random_rotations(N).double().numpy()
    (d / "pose_short.pkl").write_bytes(pickle.dumps((rot[:2], np.zeros((2, 2)))))
    (d / "pose_dict.pkl").write_bytes(pickle.dumps({"rot": rot}))
    (d / "empty.txt").write_text("\n# nothing\n")
    return {
        "junk_mrcs": ["junk.mrcs", "--no-ctf"],
        "truncated_mrcs": ["trunc.mrcs", "--no-ctf"],
        "non_numeric_star": ["nan.star"],
        "huge_index_star": ["huge.star"],
        "duplicated_column_star": ["dup.star"],
        "bad_dtype_cs": ["bad.cs", "--no-ctf"],
        "truncated_cs": ["trunc.cs", "--no-ctf"],
        "malicious_pose_pkl": ["ok.star", "--poses", "evil.pkl"],
        "malicious_ctf_pkl": ["a.mrcs", "--ctf", "evil.pkl"],
        "malicious_ind_pkl": ["ok.star", "--ind", "evil.pkl"],
        "ctf_8_columns": ["a.mrcs", "--ctf", "ctf8.pkl"],
        "pose_row_mismatch": ["ok.star", "--poses", "pose_short.pkl"],
        "pose_is_a_dict": ["ok.star", "--poses", "pose_dict.pkl"],
        "empty_txt": ["empty.txt", "--no-ctf"],
        "directory": ["sub", "--no-ctf"],
    }


CASE_NAMES = ["junk_mrcs", "truncated_mrcs", "non_numeric_star", "huge_index_star",
              "duplicated_column_star", "bad_dtype_cs", "truncated_cs", "malicious_pose_pkl",
              "malicious_ctf_pkl", "malicious_ind_pkl", "ctf_8_columns", "pose_row_mismatch",
              "pose_is_a_dict", "empty_txt", "directory"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cli_exit_2_with_one_line(stacks, capsys, case: str) -> None:
    d, _, _ = stacks
    args = _cases(d)[case]
    argv = ["backproject", str(d / args[0]), "-o", str(d / "out"), "--batch-size", "4"]
    for a in args[1:]:
        argv.append(str(d / a) if a.endswith((".pkl", ".txt")) else a)
    clear_stack_cache()
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err
    named = args[-1] if args[-1].endswith(".pkl") else args[0]
    assert Path(named).name in lines[0] or "a.mrcs" in lines[0], lines[0]
    assert not (d / "pwned").exists()
    assert not (d / "out" / "map.mrc").exists()


@pytest.mark.parametrize("name", ["f.star", "f.cs", "f.txt", "f.mrcs", "f.pkl"])
def test_fifo_never_blocks(tmp_path: Path, name: str) -> None:
    """A named pipe with no writer would block a plain read forever: refuse it up front."""
    import threading

    from cryospin.io import read_map
    from cryospin.io.pkl import read_cryodrgn_ctf

    fifo = tmp_path / name
    os.mkfifo(fifo)
    result: dict[str, str] = {}

    def run() -> None:
        try:
            if name.endswith(".pkl"):
                read_cryodrgn_ctf(fifo)
            elif name.endswith(".mrcs"):
                read_map(fifo)
            else:
                load_particles(fifo, no_ctf=True)
        except Exception as exc:  # noqa: BLE001 - reported below
            result["exc"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():
        with open(fifo, "wb"):  # unblock the reader so the thread ends
            pass
        pytest.fail(f"reading a FIFO named {name} blocked")
    assert result.get("exc", "").startswith("InputError") and name in result["exc"], result
