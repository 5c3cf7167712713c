"""``cryospin symmetry MAP``: the ranking printed and written with --json, the map aligned to
the chosen group's frame (-o) and the poses converted for it (--poses/--poses-out); a given
group placed (--group) with its score; bad input refused with one line, exit status 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._cli import refused

from cryospin.cli.main import main
from cryospin.forward.rigid import transform_map
from cryospin.io.mrc import read_map, write_map, write_stack
from cryospin.io.particles import load_particles
from cryospin.rotations import random_rotations
from cryospin.symmetry import point_group_rotations

BOX, N = 24, 6


def _c4_map(path: Path) -> Path:
    """A C4 blob map (plus a cap on the axis), turned by a random rotation, shifted 1.5 px."""
    g = torch.Generator().manual_seed(7)
    centres = (torch.rand(3, 3, generator=g, dtype=torch.float64) - 0.5) * 0.5 * BOX
    pts = torch.einsum("gij,bj->gbi", point_group_rotations("C4"), centres).reshape(-1, 3)
    pts = torch.cat([pts, torch.tensor([[0.0, 0.0, 0.25 * BOX]], dtype=torch.float64)])
    pts = pts @ random_rotations(1, generator=g)[0].T + torch.tensor([1.5, -1.0, 0.5])
    c = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], -1)
    v = torch.exp(-((r[..., None, :] - pts) ** 2).sum(-1) / (2 * 1.6**2)).sum(-1)
    write_map(path, v.float().numpy(), 2.0)
    return path


def _star(folder: Path) -> Path:
    """A RELION 3.1 star of N particles with poses, shifts and CTF, and its stack."""
    rng = np.random.default_rng(0)
    write_stack(folder / "stack.mrcs", rng.normal(size=(N, BOX, BOX)).astype(np.float32), 2.0)
    rows = "".join(
        f"{i + 1:06d}@stack.mrcs 10000 9800 0 {rng.uniform(-180, 180):.3f} "
        f"{rng.uniform(0, 180):.3f} {rng.uniform(-180, 180):.3f} "
        f"{rng.uniform(-2, 2):.2f} {rng.uniform(-2, 2):.2f} 1\n" for i in range(N))
    path = folder / "particles.star"
    path.write_text(
        "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImagePixelSize\n"
        f"_rlnImageSize\n1 opticsGroup1 300 2.7 0.1 2.0 {BOX}\n"
        "\n\n# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName\n_rlnDefocusU\n"
        "_rlnDefocusV\n_rlnDefocusAngle\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n"
        "_rlnOriginXAngst\n_rlnOriginYAngst\n_rlnOpticsGroup\n" + rows)
    return path


def test_ranking_aligned_map_and_poses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mrc, star = _c4_map(tmp_path / "map.mrc"), _star(tmp_path)
    out_json, out_map, out_star = tmp_path / "sym.json", tmp_path / "al.mrc", tmp_path / "al.star"
    status = main(["symmetry", str(mrc), "--max-order", "6", "--json", str(out_json),
                   "-o", str(out_map), "--poses", str(star), "--poses-out", str(out_star)])
    assert status == 0
    assert "chosen C4" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    assert rows[0]["group"] == "C4" and set(rows[0]) == {"group", "score"}
    assert {r["group"] for r in rows} >= {"C1", "C2", "D2", "C6", "D6", "T", "O", "I2"}
    aligned, apix = read_map(out_map)
    assert aligned.shape == (BOX,) * 3 and apix == pytest.approx(2.0)
    w = torch.tensor(aligned, dtype=torch.float64)
    sym = transform_map(w, point_group_rotations("C4")).mean(0)  # symmetrised about z
    assert float(torch.corrcoef(torch.stack([w.flatten(), sym.flatten()]))[0, 1]) >= 0.98
    before, after = load_particles(star, metadata_only=True), load_particles(out_star,
                                                                             metadata_only=True)
    assert before.rotations is not None and after.rotations is not None
    M = before.rotations.transpose(-1, -2) @ after.rotations  # R' = R M: one M for all
    assert torch.allclose(M, M[:1].expand_as(M), atol=1e-4)
    assert before.shifts_px is not None and after.shifts_px is not None
    dt = after.shifts_px - before.shifts_px  # (R c)_xy for one centre c
    c = torch.linalg.lstsq(before.rotations[:, :2].reshape(-1, 3).double(),
                           dt.reshape(-1).double()[:, None]).solution[:, 0]
    assert torch.allclose((before.rotations.double() @ c)[:, :2], dt.double(), atol=0.02)


def test_given_group_is_placed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mrc, star = _c4_map(tmp_path / "map.mrc"), _star(tmp_path)
    out_map, out_star = tmp_path / "c4.mrc", tmp_path / "c4.star"
    assert main(["symmetry", str(mrc), "--group", "c4", "-o", str(out_map), "--poses",
                 str(star), "--poses-out", str(out_star)]) == 0
    out = capsys.readouterr().out
    assert "group C4 placed: score" in out and "at least the threshold" in out
    w = torch.tensor(read_map(out_map)[0], dtype=torch.float64)
    sym = transform_map(w, point_group_rotations("C4")).mean(0)  # symmetrised about z
    assert float(torch.corrcoef(torch.stack([w.flatten(), sym.flatten()]))[0, 1]) >= 0.98
    assert len(load_particles(out_star, metadata_only=True)) == N
    assert main(["symmetry", str(mrc), "--group", "D3"]) == 0  # placed, but a poor score
    assert "below the threshold" in capsys.readouterr().out


def test_bad_input_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "notes.mrc"
    text.write_text("not a map\n")
    stack = tmp_path / "stack.mrcs"
    write_stack(stack, np.zeros((5, BOX, BOX), dtype=np.float32), 2.0)
    mrc = _c4_map(tmp_path / "map.mrc")
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(["symmetry", str(text), "--json", str(tmp_path / "a.json")], capsys, "notes.mrc")
    refused(["symmetry", str(stack), "-o", str(tmp_path / "a.mrc")], capsys, "not a 3D map")
    refused(["symmetry", str(mrc), "-o", str(tmp_path / "a.txt")], capsys, ".mrc")
    refused(["symmetry", str(mrc), "--poses", str(mrc)], capsys, "--poses-out")
    refused(["symmetry", str(mrc), "--max-order", "1"], capsys, "--max-order")
    refused(["symmetry", str(mrc), "--group", "X3", "-o", str(tmp_path / "b.mrc")], capsys,
            "X3")
    with pytest.raises(SystemExit) as exc:
        main(["symmetry", str(mrc), "--sym-order", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --sym-order" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
