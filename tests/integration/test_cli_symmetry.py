"""``cryospin symmetry-expand`` and ``cryospin backproject --symmetry``.

The expanded star, backprojected without symmetry, gives the maps of the original star
backprojected with ``--symmetry``; C1 (the default) writes what it wrote before.
"""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from tests._cli import refused

from cryospin.cli.main import main
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.symmetry import point_group_rotations

BOX, N = 16, 12


def _star(folder: Path, *, random_subset: bool = False) -> Path:
    """A RELION 3.1 star of N particles with poses, shifts and CTF, and its stack."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    c = np.arange(BOX) - BOX // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    blob = np.exp(-((x - 2) ** 2 + y**2) / 6.0)
    write_stack(folder / "stack.mrcs",
                (blob + 0.3 * rng.normal(size=(N, BOX, BOX))).astype(np.float32), 2.0)
    rows = "".join(
        f"{i + 1:06d}@stack.mrcs {10000 + 250 * i} {9800 + 250 * i} {7 * i} "
        f"{rng.uniform(-180, 180):.3f} {rng.uniform(0, 180):.3f} {rng.uniform(-180, 180):.3f} "
        f"{rng.uniform(-2, 2):.2f} {rng.uniform(-2, 2):.2f} 1"
        + (f" {1 + i % 2}" if random_subset else "") + "\n" for i in range(N))
    path = folder / "particles.star"
    path.write_text(
        "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImagePixelSize\n"
        f"_rlnImageSize\n1 opticsGroup1 300 2.7 0.1 2.0 {BOX}\n"
        "\n\n# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName\n_rlnDefocusU\n"
        "_rlnDefocusV\n_rlnDefocusAngle\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n"
        "_rlnOriginXAngst\n_rlnOriginYAngst\n_rlnOpticsGroup\n"
        + ("_rlnRandomSubset\n" if random_subset else "") + rows)
    return path


def _maps(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc"):
        with mrcfile.open(folder / name, permissive=True) as m:
            out[name] = np.array(m.data, dtype=np.float64)
    return out


@pytest.mark.parametrize("symbol, random_subset", [("D2", False), ("T", True)])
def test_expanded_star_reproduces_the_symmetric_backprojection(
        tmp_path: Path, capsys: pytest.CaptureFixture, symbol: str, random_subset: bool) -> None:
    star = _star(tmp_path / "data", random_subset=random_subset)
    expanded = tmp_path / "data" / "expanded.star"
    assert main(["symmetry-expand", str(star), "--symmetry", symbol, "-o", str(expanded)]) == 0
    G = point_group_rotations(symbol)
    k = G.shape[0]
    src = load_particles(star, metadata_only=True, check_finite=False)
    exp = load_particles(expanded, metadata_only=True, check_finite=False)
    assert len(exp) == k * N
    rows = np.repeat(np.arange(N), k)
    # the pose R g, g in the group's order (identity first); every other column as it was
    R_g = (src.rotations[:, None] @ G[None]).reshape(-1, 3, 3)
    torch.testing.assert_close(exp.rotations, R_g, rtol=0, atol=1e-9)
    torch.testing.assert_close(exp.shifts_px, src.shifts_px[rows], rtol=0, atol=1e-9)
    assert exp.names == tuple(src.names[i] for i in rows)
    torch.testing.assert_close(exp.ctf.defocus_u_angstrom, src.ctf.defocus_u_angstrom[rows])
    # every copy of an image in its particle's half set
    half = exp.random_subset.reshape(N, k)
    assert (half == half[:, :1]).all() and set(half[:, 0].tolist()) == {1, 2}
    if random_subset:
        assert np.array_equal(half[:, 0], src.random_subset)

    assert main(["backproject", str(star), "--symmetry", symbol, "-o", str(tmp_path / "sym")]) == 0
    assert main(["backproject", str(expanded), "-o", str(tmp_path / "exp")]) == 0
    a, b = _maps(tmp_path / "sym"), _maps(tmp_path / "exp")
    for name in a:
        scale = np.abs(a[name]).max()
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5 * scale, err_msg=name)
    fsc = json.loads((tmp_path / "sym" / "fsc.json").read_text())
    assert fsc["symmetry"] == symbol
    assert fsc["n_particles"] == N
    out = capsys.readouterr().out
    assert f"{N} particles × {k} poses of {symbol}" in out


def test_default_c1_writes_what_it_wrote_before(tmp_path: Path) -> None:
    """``--symmetry C1`` is the default: the same voxels, and no ``symmetry`` in fsc.json (the
    unsymmetrised code path; tests/unit/test_backproject_symmetry.py checks it bit for bit)."""
    star = _star(tmp_path / "data")
    assert main(["backproject", str(star), "-o", str(tmp_path / "plain")]) == 0
    assert main(["backproject", str(star), "--symmetry", "c1", "-o", str(tmp_path / "c1")]) == 0
    a, b = _maps(tmp_path / "plain"), _maps(tmp_path / "c1")  # the headers hold a time stamp
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    fsc = json.loads((tmp_path / "c1" / "fsc.json").read_text())
    assert "symmetry" not in fsc
    assert fsc == json.loads((tmp_path / "plain" / "fsc.json").read_text())


def test_bad_input_is_refused_and_nothing_written(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    star = _star(tmp_path / "data")
    out = tmp_path / "out.star"
    refused(["symmetry-expand", str(star), "--symmetry", "X5", "-o", str(out)], capsys,
             "symmetry", "X5")
    refused(["symmetry-expand", str(tmp_path / "nope.star"), "--symmetry", "C2", "-o",
              str(out)], capsys, "nope.star", "not found")
    refused(["symmetry-expand", str(star), "--symmetry", "C2", "-o", str(tmp_path / "o.cs")],
             capsys, ".star")
    refused(["symmetry-expand", str(star), "--symmetry", "C2", "-o", str(star)], capsys,
             "replace the input")
    assert not out.exists() and not (tmp_path / "o.cs").exists()
    no_poses = tmp_path / "data" / "no_poses.star"
    text = star.read_text()
    for col in ("_rlnAngleRot\n", "_rlnAngleTilt\n", "_rlnAnglePsi\n"):
        text = text.replace(col, "_rlnUnused" + col[4:])
    no_poses.write_text(text)
    refused(["symmetry-expand", str(no_poses), "--symmetry", "C2", "-o", str(out)], capsys,
             "no poses")
    assert not out.exists()
    refused(["backproject", str(star), "--symmetry", "D1", "-o", str(tmp_path / "bp")], capsys,
             "symmetry", "D1")
    assert not (tmp_path / "bp").exists()
