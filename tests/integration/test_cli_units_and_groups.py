"""CLI consistency (issue "What a new user hit", item 5): ``-o/--out`` everywhere, flags in the
units users think in (Å), messages that name flags, ``--optics-group``, ``pose-error --datadir``
and ``backproject --box/--invert-contrast/--threads``.

Every refusal: exit status 2, one line on stderr naming the flag or file and the problem, no
traceback, and nothing written or overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml
from tests._cli import refused

from cryospin.cli.main import _build_parser, main
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles

BOX, N = 16, 40
TRAIN = ["--epochs", "2", "--switch-epoch", "1", "--search-epochs", "1", "--heads", "2",
         "--width", "0.125", "--no-bf16", "--batch-size", "20", "--search-rotations", "64",
         "--device", "cpu", "--threads", "1", "--no-progress", "--seed", "3"]


# ----------------------------------------------------------------------------- helpers


def _files(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _star(folder: Path, *, pixel_sizes: tuple[float, ...] = (2.0, 3.0), n: int = N,
          box: int = BOX, stack: str = "stack.mrcs", image_size: bool = True,
          seed: int = 0) -> Path:
    """A RELION 3.1 star of ``n`` particles with poses and CTF, split round-robin over one
    optics group per pixel size ("grpA", "grpB", ...), and its stack (noise + a blob)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    blob = np.exp(-(x**2 + y**2) / 8.0)
    write_stack(folder / stack, (blob + 0.3 * rng.normal(size=(n, box, box))).astype(np.float32),
                pixel_sizes[0])
    groups = len(pixel_sizes)
    optics = "".join(
        f"{g + 1} grp{chr(65 + g)} 300 2.7 0.1 {apix}"
        + (f" {box}" if image_size else "") + "\n" for g, apix in enumerate(pixel_sizes))
    rows = "".join(
        f"{i + 1:06d}@{stack} {10000 + 50 * i} {10000 + 50 * i} 0 "
        f"{rng.uniform(-180, 180):.3f} {rng.uniform(0, 180):.3f} {rng.uniform(-180, 180):.3f} "
        f"0.0 0.0 {i % groups + 1}\n" for i in range(n))
    path = folder / "particles.star"
    path.write_text(
        "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImagePixelSize\n"
        + ("_rlnImageSize\n" if image_size else "") + optics
        + "\n\n# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName\n_rlnDefocusU\n"
        "_rlnDefocusV\n_rlnDefocusAngle\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n"
        "_rlnOriginXAngst\n_rlnOriginYAngst\n_rlnOpticsGroup\n" + rows)
    return path


@pytest.fixture
def no_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run report (matplotlib, seconds) is not what these tests are about."""
    import cryospin.cli.reconstruct as reconstruct

    monkeypatch.setattr(reconstruct, "_write_report", lambda run_dir, **kw: None)


# ----------------------------------------------------------------------------- -o / --out

#: command -> (its positional arguments, the hidden old spelling or None, the destination)
WRITERS = {
    "simulate": (["x.pdb", "--n-particles", "1", "--box", "8", "--pixel-size", "1"],
                 "--outdir", "outdir"),
    "backproject": (["p.star"], "--outdir", "outdir"),
    "reconstruct": (["p.star"], None, "out"),
    "downsample": (["p.star", "--box", "8"], None, "out"),
    "fsc": (["a.mrc", "b.mrc"], "--output", "output"),
    "postprocess": (["a.mrc", "b.mrc"], None, "outdir"),
    "pose-error": (["a.star", "b.star"], "--output", "output"),
    "flip-hand": (["a.mrc"], "--output", "output"),
    "symmetry-expand": (["p.star", "--symmetry", "C2"], None, "output"),
    "symmetry": (["map.mrc"], None, "output"),
    "posterior": (["run", "--particles", "0"], "--output", "output"),
    "report": (["run"], "--output", "output"),
    "demo": ([], None, "out"),
    "choose-run": (["run_a", "run_b"], None, "output"),
}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser, _ = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_writer_takes_o_and_out(command: str) -> None:
    args, old, dest = WRITERS[command]
    sub = _subparser(command)
    spellings = ["-o", "--out"] + ([old] if old else [])
    for flag in spellings:
        assert getattr(sub.parse_args([*args, flag, "somewhere"]), dest) in (
            "somewhere", Path("somewhere"))
    text = sub.format_help()
    assert "-o " in text and "--out " in text
    if old:
        assert old not in text  # the old spelling works but is not advertised


def test_every_subcommand_that_writes_is_listed() -> None:
    parser, _ = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    writers = {name for name, p in sub.choices.items()
               if any("-o" in a.option_strings for a in p._actions)}
    assert writers == set(WRITERS)


# ----------------------------------------------------------------------------- units (Å)


def test_angstrom_flags_are_converted_with_the_pixel_size(tmp_path: Path, no_report) -> None:
    star = _star(tmp_path / "data", pixel_sizes=(2.0,))
    run = tmp_path / "run"
    assert main(["reconstruct", str(star), "-o", str(run), *TRAIN, "--stop-after", "1",
                 "--mask-diameter", "24", "--search-resolution", "8",
                 "--loss-resolution-start", "16", "--loss-resolution-end", "8",
                 "--search-refine-resolution", "10"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    extent = BOX * 2.0  # the box in Å
    assert config["data"]["mask_radius_fraction"] == pytest.approx(24 / extent)
    assert config["optim"]["search_radius_px"] == pytest.approx(extent / 8)
    assert config["schedule"]["loss_radius_start_px"] == pytest.approx(extent / 16)
    assert config["schedule"]["loss_radius_end_px"] == pytest.approx(extent / 8)
    assert config["optim"]["search_refine_radius_px"] == pytest.approx(extent / 10)


@pytest.mark.parametrize(("flags", "needles"), [
    (["--mask-diameter", "40"], ["--mask-diameter 40 Å is wider than the box (16 px × 2 Å"]),
    (["--search-resolution", "3"], ["--search-resolution 3 Å is finer than"]),
    (["--search-resolution", "100"], ["--search-resolution 100 Å is coarser than the box"]),
    (["--loss-resolution-start", "0"], ["--loss-resolution-start must be a positive"]),
    (["--loss-resolution-end", "16", "--loss-radius-end", "3"],
     ["give --loss-resolution-end or --loss-radius-end, not both"]),
    (["--loss-radius-end", "3"], ["--loss-radius-end needs --loss-radius-start"]),
    (["--search-resolution", "10", "--search-radius", "3"],
     ["give --search-resolution or --search-radius, not both"]),
    (["--mask-diameter", "20", "--mask-radius", "0.5"], ["--mask-diameter or --mask-radius"]),
    (["--search-radius", "0.5"], ["--search-radius must be >= 1, got 0.5"]),
    (["--search-candidates", "0"], ["--search-candidates must be >= 1, got 0"]),
    (["--search-refine-radius", "0.5"], ["--search-refine-radius must be >= 1, got 0.5"]),
    (["--search-refine-resolution", "10", "--search-refine-radius", "3"],
     ["give --search-refine-resolution or --search-refine-radius, not both"]),
    (["--mask-radius", "1.5"], ["--mask-radius must be in (0, 1]"]),
    (["--box", "15"], ["--box must be even"]),
    (["--local-refine-resolution", "0"], ["--local-refine-resolution must be > 0, got 0"]),
    (["--local-refine-resolution", "40"],
     ["--local-refine-resolution 40 Å is coarser than the box itself (32 Å"]),
])
def test_bad_unit_flags_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
        needles: list[str]) -> None:
    star = _star(tmp_path / "data", pixel_sizes=(2.0,))
    before = _files(tmp_path)
    err = refused(["reconstruct", str(star), "-o", str(tmp_path / "run"), *TRAIN, *flags],
                   capsys, *needles)
    assert "optim." not in err and "data." not in err and "schedule." not in err
    assert _files(tmp_path) == before  # no run folder either


def test_search_radius_help_says_cycles_per_box() -> None:
    text = " ".join(_subparser("reconstruct").format_help().split())
    assert "cycles per box, not pixels" in text
    assert "--mask-diameter A" in text and "--search-resolution A" in text


# ----------------------------------------------------------------------------- messages


def test_messages_name_flags_not_python_arguments(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    star = _star(tmp_path / "data", pixel_sizes=(2.0,))
    stack = tmp_path / "data" / "stack.mrcs"
    err = refused(["backproject", str(stack), "-o", str(tmp_path / "bp")], capsys,
                   "--ctf", "--no-ctf")
    assert "no_ctf=" not in err
    moved = tmp_path / "elsewhere" / "particles.star"
    moved.parent.mkdir()
    moved.write_text(star.read_text())
    err = refused(["backproject", str(moved), "-o", str(tmp_path / "bp")], capsys,
                   "image stack 'stack.mrcs' not found", "--datadir DIR")
    assert "datadir=" not in err
    assert not (tmp_path / "bp").exists()


# ----------------------------------------------------------------------------- optics groups


def test_mixed_pixel_sizes_point_to_optics_group(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    star = _star(tmp_path / "data")
    before = _files(tmp_path)
    refused(["reconstruct", str(star), "-o", str(tmp_path / "run"), *TRAIN], capsys,
             "conflicting pixel sizes (Å) (2, 3)", "--optics-group")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("group", ["2", "grpB"])
def test_optics_group_by_number_or_name(tmp_path: Path, group: str) -> None:
    star = _star(tmp_path / "data")
    ps = load_particles(star, optics_group=group)
    assert len(ps) == N // 2 and ps.pixel_size_angstrom == 3.0
    assert set(ps.optics_group.tolist()) == {2}
    assert ps.optics["rlnOpticsGroupName"].tolist() == ["grpB"]
    assert ps.names[0] == "000002@stack.mrcs"  # the file's rows 2, 4, ...


def test_optics_group_takes_its_rows_of_a_ctf_pkl(tmp_path: Path) -> None:
    from cryospin.io.pkl import write_cryodrgn_ctf

    star = _star(tmp_path / "data", pixel_sizes=(2.0, 2.0))
    full = load_particles(star)
    write_cryodrgn_ctf(tmp_path / "ctf.pkl", full.ctf, BOX, 2.0)
    ps = load_particles(star, optics_group=1, ctf_pkl=tmp_path / "ctf.pkl", ind=[0, 2])
    assert ps.ctf.defocus_u_angstrom.tolist() == pytest.approx(
        full.ctf.defocus_u_angstrom[[0, 4]].tolist())


def test_backproject_one_optics_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    star = _star(tmp_path / "data")
    out = tmp_path / "bp"
    assert main(["backproject", str(star), "-o", str(out), "--optics-group", "grpB",
                 "--threads", "1"]) == 0
    assert f"backprojected {N // 2} particles ({BOX} px, 3 Å/px)" in capsys.readouterr().out
    with mrcfile.open(out / "map.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(3.0)


@pytest.mark.parametrize(("command", "group", "needles"), [
    ("backproject", "7", ["--optics-group 7: no such optics group (the star has 1 (grpA), "
                          "2 (grpB))"]),
    ("reconstruct", "grpC", ["--optics-group grpC: no such optics group"]),
    ("pose-error", "9", ["--optics-group 9: no such optics group"]),
])
def test_unknown_optics_group(tmp_path: Path, capsys: pytest.CaptureFixture, command: str,
                              group: str, needles: list[str]) -> None:
    star = _star(tmp_path / "data")
    out = tmp_path / "out"
    argv = {"backproject": ["backproject", str(star), "-o", str(out)],
            "reconstruct": ["reconstruct", str(star), "-o", str(out), *TRAIN],
            "pose-error": ["pose-error", str(star), str(star), "-o", str(out / "e.json")],
            }[command]
    before = _files(tmp_path)
    refused([*argv, "--optics-group", group], capsys, str(star), *needles)
    assert _files(tmp_path) == before


def test_optics_group_of_a_plain_stack_is_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    _star(tmp_path / "data")
    before = _files(tmp_path)
    refused(["backproject", str(tmp_path / "data" / "stack.mrcs"), "-o", str(tmp_path / "bp"),
              "--no-ctf", "--optics-group", "1"], capsys, "--optics-group", "not a .star")
    assert _files(tmp_path) == before


def test_reconstruct_records_the_optics_group(tmp_path: Path, no_report) -> None:
    star = _star(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["reconstruct", str(star), "-o", str(run), *TRAIN, "--search-radius", "3",
                 "--stop-after", "1", "--optics-group", "grpA"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["input"]["optics_group"] == "grpA"
    assert main(["reconstruct", "--resume", str(run), "--stop-after", "2"]) == 0
    poses = load_particles(run / "poses.star", metadata_only=True, no_ctf=True)
    assert len(poses) == N // 2 and poses.pixel_size_angstrom == 2.0


# ----------------------------------------------------------------------------- pose-error


def test_pose_error_datadir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A star without rlnImageSize whose stacks live elsewhere: the box (for a .pkl's shifts)
    comes from the stacks, found with --datadir."""
    from cryospin.io.pkl import write_cryodrgn_poses

    star = _star(tmp_path / "stacks", pixel_sizes=(2.0,), image_size=False)
    moved = tmp_path / "meta" / "particles.star"
    moved.parent.mkdir()
    moved.write_text(star.read_text())
    ps = load_particles(star)
    write_cryodrgn_poses(tmp_path / "pose.pkl", ps.rotations, ps.shifts_px, BOX)
    argv = ["pose-error", str(moved), str(tmp_path / "pose.pkl"), "-o",
            str(tmp_path / "err.json")]
    refused(argv, capsys, "--datadir")
    assert not (tmp_path / "err.json").exists()
    assert main([*argv, "--datadir", str(tmp_path / "stacks")]) == 0
    result = json.loads((tmp_path / "err.json").read_text())
    assert result["median_rotation_error_deg"] == pytest.approx(0.0, abs=1e-3)
    assert result["median_shift_error_px"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- backproject


def test_backproject_box_invert_threads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    star = _star(tmp_path / "data", pixel_sizes=(2.0,))
    common = ["backproject", str(star), "--threads", "1", "--seed", "1"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    assert main([*common, "-o", str(tmp_path / "inv"), "--invert-contrast"]) == 0
    assert main([*common, "-o", str(tmp_path / "small"), "--box", "8"]) == 0
    out = capsys.readouterr().out
    assert "(8 px, 4 Å/px)" in out and "with 1 threads" in out
    plain = mrcfile.read(tmp_path / "plain" / "map.mrc")
    np.testing.assert_array_equal(mrcfile.read(tmp_path / "inv" / "map.mrc"), -plain)
    with mrcfile.open(tmp_path / "small" / "map.mrc") as m:
        assert m.data.shape == (8, 8, 8) and float(m.voxel_size.x) == pytest.approx(4.0)
    fsc = json.loads((tmp_path / "small" / "fsc.json").read_text())
    assert fsc["box_px"] == 8 and fsc["pixel_size_angstrom"] == pytest.approx(4.0)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--box", "9"], "--box must be even and >= 8, got 9"),
    (["--box", "32"], "--box 32 is larger than the particles' box 16 px"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_backproject_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture,
                               flags: list[str], needle: str) -> None:
    star = _star(tmp_path / "data", pixel_sizes=(2.0,))
    before = _files(tmp_path)
    refused(["backproject", str(star), "-o", str(tmp_path / "bp"), *flags], capsys, needle)
    assert _files(tmp_path) == before


# ----------------------------------------------------------------------------- box advice


def _box_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "consider --box" in r.getMessage()]


def test_a_box_above_the_advised_size_gets_one_warning_unless_box_is_given(
        tmp_path: Path, no_report, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``reconstruct`` on particles whose box exceeds ``ADVISED_BOX_PX`` (lowered to 8 here, so
    that the 16 px test stack exceeds it) warns once, with the pixel size and Nyquist before and
    after the crop it suggests; not with an explicit ``--box`` (even the full one), not on
    ``--resume``, not at or below the advised size."""
    import cryospin.cli.reconstruct as reconstruct

    star = _star(tmp_path / "data", pixel_sizes=(2.0,))
    with caplog.at_level(logging.INFO):
        assert main(["reconstruct", str(star), "-o", str(tmp_path / "at"), *TRAIN,
                     "--stop-after", "1"]) == 0
    assert _box_warnings(caplog) == []  # 16 px <= 128
    monkeypatch.setattr(reconstruct, "ADVISED_BOX_PX", 8)
    warnings = {}
    for extra, name in [([], "full"), (["--box", "16"], "given"), (["--box", "8"], "cropped")]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["reconstruct", str(star), "-o", str(tmp_path / name), *TRAIN,
                         "--stop-after", "1", *extra]) == 0
        warnings[name] = _box_warnings(caplog)
    assert warnings["given"] == warnings["cropped"] == []
    assert len(warnings["full"]) == 1, warnings["full"]
    for needle in ("full 16 px box (2 Å/px, Nyquist 4 Å)", "~4.0×",
                   "--box 8 (the map at 4 Å/px, Nyquist 8 Å; poses"):
        assert needle in warnings["full"][0], warnings["full"][0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["reconstruct", "--resume", str(tmp_path / "full"),
                     "--stop-after", "2"]) == 0
    assert _box_warnings(caplog) == []


def test_local_refine_resolution_changes_the_local_epochs_only(
        tmp_path: Path, no_report, caplog: pytest.LogCaptureFixture) -> None:
    """``--local-refine-resolution``: the search epoch is that of a run without it (the same
    map after it), the local epoch after it is not, and the log says so; a resolution the
    16 px × 2 Å training disc does not reach (4.5 Å: 7.1 cycles per box) changes nothing."""
    star = _star(tmp_path / "data", pixel_sizes=(2.0,))
    maps, said = {}, {}
    for name, extra in [("whole", []), ("8A", ["--local-refine-resolution", "8"]),
                        ("4.5A", ["--local-refine-resolution", "4.5"])]:
        run = tmp_path / name
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["reconstruct", str(star), "-o", str(run), *TRAIN, "--epochs", "3",
                         *extra]) == 0
        said[name] = [r.getMessage() for r in caplog.records
                      if r.getMessage().startswith("local epochs: the pose steps fit")]
        maps[name] = [mrcfile.read(run / f"map.00{e}.mrc") for e in (2, 3)]
        if extra:
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["optim"]["local_refine_resolution_angstrom"] == float(extra[1])
    assert np.array_equal(maps["8A"][0], maps["whole"][0])  # epoch 2: the search epoch
    assert not np.allclose(maps["8A"][1], maps["whole"][1], rtol=0, atol=1e-6)  # local
    assert np.array_equal(maps["4.5A"][1], maps["whole"][1])
    assert said["whole"] == said["4.5A"] == []
    assert len(said["8A"]) == 1 and "|k| <= 4 cycles/box (8 Å, of the training disc's 7)" \
        in said["8A"][0], said["8A"]
