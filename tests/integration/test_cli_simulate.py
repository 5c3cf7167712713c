"""End to end: `cryospin simulate` and `cryospin downsample` through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.cli.main import main
from cryospin.forward.resample import fourier_crop_2d
from cryospin.io.mrc import open_stack, write_stack
from cryospin.io.particles import load_particles


def write_pdb(path: Path, n: int = 60, spread_angstrom: float = 8.0, seed: int = 0) -> Path:
    """A small synthetic PDB (C, N, O atoms)."""
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * spread_angstrom * np.array([1.0, 0.8, 0.6]) + 20.0
    lines = [
        f"ATOM  {i + 1:5d}  {'CNO'[i % 3]:<3s} ALA A{i // 5 + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
        f"  1.00 20.00          {'CNO'[i % 3]:>2s}"
        for i, (x, y, z) in enumerate(xyz)
    ]
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def test_cli_simulate_bundled_structure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sim"
    status = main(["simulate", "bundled:6vyb", "-o", str(out), "--n-particles", "20",
                   "--box", "24", "--pixel-size", "9.5", "--snr", "0.1", "--seed", "0",
                   "--shift-std-px", "1", "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "simulated 20 particles" in printed and "noise sigma" in printed
    for name in ("gt.mrc", "particles.mrcs", "particles.star", "gt_poses.pkl",
                 "simulation.json"):
        assert (out / name).is_file(), name
    ps = load_particles(out / "particles.star")
    assert len(ps) == 20 and ps.box_px == 24 and ps.ctf is not None
    summary = json.loads((out / "simulation.json").read_text())
    assert summary["snr"] == 0.1 and summary["n_particles"] == 20
    assert summary["noise_sigma"] == pytest.approx((summary["clean_variance"] / 0.1) ** 0.5)


def test_cli_missing_structure_exits_2_with_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    status = main(["simulate", str(tmp_path / "nothere.pdb"), "-o", str(tmp_path / "o"),
                   "--n-particles", "5", "--box", "16", "--pixel-size", "2"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "nothere.pdb" in err and "not found" in err
    assert not (tmp_path / "o").exists()


def test_cli_downsample_simulated_stack(tmp_path: Path) -> None:
    pdb = write_pdb(tmp_path / "mol.pdb")
    sim = tmp_path / "sim"
    assert main(["simulate", str(pdb), "-o", str(sim), "--n-particles", "30", "--box", "32",
                 "--pixel-size", "2", "--shift-std-px", "2", "--seed", "1",
                 "--no-progress"]) == 0
    out, star = tmp_path / "ds.mrcs", tmp_path / "ds.star"
    assert main(["downsample", str(sim / "particles.star"), "-o", str(out), "--box", "20",
                 "--out-star", str(star), "--chunk", "7", "--no-progress"]) == 0
    before = load_particles(sim / "particles.star")
    after = load_particles(star)
    assert after.box_px == 20 and after.pixel_size_angstrom == pytest.approx(2 * 32 / 20)
    # shifts kept in Å; poses and CTF unchanged
    torch.testing.assert_close(after.shifts_px * after.pixel_size_angstrom,
                               before.shifts_px * before.pixel_size_angstrom,
                               rtol=0, atol=1e-8)
    torch.testing.assert_close(after.rotations, before.rotations, rtol=0, atol=1e-9)
    torch.testing.assert_close(after.ctf.defocus_u_angstrom, before.ctf.defocus_u_angstrom)
    expect = fourier_crop_2d(torch.from_numpy(before.images_numpy()).double(), 20)
    np.testing.assert_allclose(after.images_numpy(), expect.numpy(), rtol=0,
                               atol=1e-5 * float(expect.abs().max()))


def test_cli_downsample_constant_stack_stays_constant(tmp_path: Path) -> None:
    stack = tmp_path / "const.mrcs"
    values = np.array([1.5, -2.0, 0.25], dtype=np.float32)
    write_stack(stack, np.broadcast_to(values[:, None, None], (3, 24, 24)), 1.1)
    out = tmp_path / "small.mrcs"
    assert main(["downsample", str(stack), "-o", str(out), "--box", "15",
                 "--no-progress"]) == 0
    s = open_stack(out)
    assert s.box_px == 15 and s.pixel_size_angstrom == pytest.approx(1.1 * 24 / 15, rel=1e-5)
    np.testing.assert_allclose(s.read(), np.broadcast_to(values[:, None, None], (3, 15, 15)),
                               atol=1e-6)


def test_cli_downsample_rejects_larger_box(tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    stack = tmp_path / "s.mrcs"
    write_stack(stack, np.zeros((2, 16, 16), np.float32), 1.0)
    assert main(["downsample", str(stack), "-o", str(tmp_path / "o.mrcs"), "--box", "32"]) == 2
    assert "--box" in capsys.readouterr().err
