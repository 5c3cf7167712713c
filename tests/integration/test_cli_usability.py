"""What a new user hit on the command line: one version string, a STAR file given where a map
is expected, output piped into ``head``, an output folder that does not exist yet, and the
presets of ``reconstruct``. Each failure: its exit status, one line, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cryospin import __version__
from cryospin.cli.main import main
from cryospin.io.mrc import write_map, write_stack
from cryospin.train.config import build_config, config_to_dict
from cryospin.train.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _one_error_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _map(path: Path, seed: int = 0) -> Path:
    write_map(path, np.random.default_rng(seed).normal(size=(8, 8, 8)), 2.0)
    return path


def _star(path: Path, rows: int = 100) -> Path:
    path.write_text("\n# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n"
                    + "".join(f"{i + 1:06d}@stack.mrcs\n" for i in range(rows)))
    return path


# ------------------------------------------------------------------ 1. one version string
def test_version_is_one_string(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"cryospin {__version__}"
    # what a build of the package records: pyproject reads the same literal
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    built = pyprojecttoml.read_configuration(ROOT / "pyproject.toml")["project"]["version"]
    assert built == __version__
    assert f"> **Status (v{__version__}).**" in (ROOT / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------ 2. not an MRC file
@pytest.mark.parametrize("command", ["fsc-a", "fsc-b", "flip-hand"])
def test_star_given_as_a_map(tmp_path: Path, capsys: pytest.CaptureFixture,
                             command: str) -> None:
    good, star = _map(tmp_path / "map.mrc"), _star(tmp_path / "particles.star")
    out = tmp_path / "out"
    argv = {"fsc-a": ["fsc", str(star), str(good), "-o", str(out / "fsc.json")],
            "fsc-b": ["fsc", str(good), str(star), "-o", str(out / "fsc.json")],
            "flip-hand": ["flip-hand", str(star), "-o", str(out / "flipped.mrc")]}[command]
    before = _files(tmp_path)
    assert main(argv) == 2
    err = _one_error_line(capsys, "particles.star: not an MRC file (no MRC header;")
    assert "mode" not in err
    assert _files(tmp_path) == before


# ------------------------------------------------------------------ 3. stdout closed early
def test_closed_stdout_exits_quietly(tmp_path: Path) -> None:
    """``cryospin fsc A B | head -1`` when head has gone: no "error: Broken pipe"."""
    a = _map(tmp_path / "a.mrc")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before cryospin prints anything: deterministic
    try:
        proc = subprocess.run([sys.executable, "-m", "cryospin.cli.main", "fsc", str(a), str(a)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
                              check=False)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141  # 128 + SIGPIPE, as for `yes | head -1`


# ------------------------------------------------------------------ 4. output folders
def _particles(path: Path, fill: float | None = None) -> Path:
    images = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    if fill is not None:
        images[1, 2, 3] = fill
    write_stack(path, images, 1.5)
    return path


def test_downsample_creates_the_output_folders(tmp_path: Path) -> None:
    stack = _particles(tmp_path / "in.mrcs")
    out, star = tmp_path / "new" / "deeper" / "x.mrcs", tmp_path / "stars" / "x.star"
    assert main(["downsample", str(stack), "-o", str(out), "--box", "8",
                 "--out-star", str(star), "--no-progress"]) == 0
    assert out.is_file() and star.is_file()


def test_downsample_folder_blocked_by_a_file(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    stack = _particles(tmp_path / "in.mrcs")
    (tmp_path / "afile").write_text("x")
    before = _files(tmp_path)
    assert main(["downsample", str(stack), "-o", str(tmp_path / "afile" / "sub" / "x.mrcs"),
                 "--box", "8", "--no-progress"]) == 2
    _one_error_line(capsys, "x.mrcs", "cannot create the folder")
    assert _files(tmp_path) == before


def test_downsample_failing_removes_the_folders_it_made(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    stack = _particles(tmp_path / "in.mrcs", fill=np.nan)  # found while writing
    before = _files(tmp_path)
    assert main(["downsample", str(stack), "-o", str(tmp_path / "new" / "x.mrcs"),
                 "--box", "8", "--out-star", str(tmp_path / "stars" / "x.star"),
                 "--no-progress"]) == 2
    _one_error_line(capsys, "NaN")
    assert _files(tmp_path) == before


# ------------------------------------------------------------------ 5. presets
def test_presets_lists_each_with_its_description(capsys: pytest.CaptureFixture) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    for line in lines:
        assert len(line.split(maxsplit=1)) == 2, line  # a description follows every name
    assert main(["presets", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == lines


@pytest.mark.parametrize("name", PRESETS)
def test_presets_show_prints_the_resolved_configuration(capsys: pytest.CaptureFixture,
                                                        name: str) -> None:
    assert main(["presets", "show", name]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == config_to_dict(build_config(name))  # every field, defaults < preset


def test_presets_show_unknown_name(capsys: pytest.CaptureFixture) -> None:
    assert main(["presets", "show", "fast"]) == 2
    _one_error_line(capsys, "unknown preset 'fast'", "paper-real")


def test_cli_modules_touched_here_import_no_torch() -> None:
    """`cryospin --help` imports every command's flag module: these must not load torch."""
    code = ("import sys, cryospin.cli.flags.presets, cryospin.cli.flags.downsample; "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "False"


def test_help_imports_no_torch() -> None:
    """`cryospin --help` and `cryospin COMMAND --help` for every command load neither torch
    nor numpy (start-up stays fast); each help exits with status 0."""
    code = (
        "import sys\n"
        "from cryospin.cli.main import SUBCOMMANDS, main\n"
        "for argv in [['--help'], *[[name, '--help'] for name in SUBCOMMANDS]]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "    else:\n"
        "        raise AssertionError(f'{argv} did not exit')\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
