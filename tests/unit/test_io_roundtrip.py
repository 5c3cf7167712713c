"""Metadata round trip: read -> new poses -> write -> read keeps every input column.

A "fake reconstruct" is ``particles.with_poses(R, t)`` followed by the writer: every column
of the input comes back as the input's text except the pose columns, which hold the new
poses; the optics table is the input's; image paths are the input's (or rebased with
``relative_to``). The ``.cs`` writer round-trips through the ``.cs`` reader.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cryospin.forward.ctf import CTFParams
from cryospin.io.cs import read_cryosparc, write_cryosparc
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles, write_particles_star
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.io.star_tables import read_star_tables
from cryospin.io.star_write import write_relion_star
from cryospin.rotations import geodesic_distance_rad, random_rotations

L = 16
POSE_COLUMNS = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst"}

OPTICS_31 = (
    ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
     "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
     "rlnImageDimensionality", "rlnBeamTiltX", "rlnOddZernike"],
    [["opticsGroup1", "1", "0.885000", "300.000000", "2.700000", "0.100000", "1.770000",
      str(L), "2", "0.000000", "[0.0680480107376,-1.79877045]"],
     ["krios_200kV", "2", "0.885000", "200.000000", "2.700000", "0.070000", "1.770000",
      str(L), "2", "0.012000", "[0,0]"]],
)
PARTICLE_COLUMNS_31 = [
    "rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName", "rlnOpticsGroup",
    "rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "rlnDefocusU", "rlnDefocusV",
    "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift", "rlnAngleRot",
    "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
    "rlnNormCorrection", "rlnRandomSubset", "rlnGroupNumber", "rlnGroupName",
    "rlnLogLikeliContribution",
]


def _star_text(blocks: list[tuple[str, list[str], list[list[str]]]]) -> str:
    out = []
    for name, columns, rows in blocks:
        out += ["# version 30001", "", f"data_{name}", "", "loop_ "]
        out += [f"_{c} #{k} " for k, c in enumerate(columns, start=1)]
        out += ["  ".join(f"{v:>12}" for v in row) + " " for row in rows]
        out += ["", ""]
    return "\n".join(out)


def _particle_rows_31(n: int, stack: str, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append([
            f"{rng.uniform(0, 4000):.6f}", f"{rng.uniform(0, 4000):.6f}", f"{i + 1:06d}@{stack}",
            f"MotionCorr/job002/Movies/mic_{i % 3:03d}.mrc", str(1 + i % 2), "4.545000",
            "0.089249", f"{rng.uniform(9000, 15000):.6f}", f"{rng.uniform(9000, 15000):.6f}",
            f"{rng.uniform(-180, 180):.5f}", "0.000000", "1.000000", "0.000000",
            f"{rng.uniform(-180, 180):.5f}", f"{rng.uniform(0, 180):.6f}",
            f"{rng.uniform(-180, 180):.6f}", f"{rng.uniform(-3, 3):.5f}",
            f"{rng.uniform(-3, 3):.5f}", str(1 + i % 4), "0.891387", str(1 + i % 2),
            str(1 + i % 3), f"group_{i % 3:02d}", f"{rng.uniform(2e5, 3e5):.6e}",
        ])
    return rows


@pytest.fixture
def project(tmp_path: Path) -> dict:
    """A RELION-like project: the stack at Extract/job003/..., the star in Refine3D/job010/
    with paths relative to the project folder (as RELION writes them)."""
    n = 10
    stack_rel = "Extract/job003/Movies/mic_particles.mrcs"
    (tmp_path / stack_rel).parent.mkdir(parents=True)
    write_stack(tmp_path / stack_rel, np.random.default_rng(1).standard_normal((n, L, L)), 1.77)
    star = tmp_path / "Refine3D" / "job010" / "run_data.star"
    star.parent.mkdir(parents=True)
    star.write_text(_star_text([("optics", *OPTICS_31),
                                ("particles", PARTICLE_COLUMNS_31,
                                 _particle_rows_31(n, stack_rel))]))
    return {"root": tmp_path, "star": star, "n": n, "stack": tmp_path / stack_rel}


def _new_poses(n: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(n, generator=g)
    t = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 6
    return R, t


def _assert_carried(inp: pd.DataFrame, out: pd.DataFrame, replaced: set[str]) -> None:
    """Every column of ``inp`` but ``replaced`` is in ``out``, in the input's order, with the
    input's text."""
    kept = [c for c in inp.columns if c not in replaced]
    assert [c for c in out.columns if c in kept] == kept
    for col in kept:
        assert out[col].tolist() == inp[col].tolist(), col


def _assert_poses(back, R: torch.Tensor, t: torch.Tensor, tol: float = 1e-9) -> None:
    assert geodesic_distance_rad(back.rotations, R).max() < tol
    torch.testing.assert_close(back.shifts_px, t, atol=tol, rtol=0)


# ------------------------------------------------------------------------------ RELION 3.1


def test_relion31_every_column_back_and_poses_new(project, tmp_path):
    ps = load_particles(project["star"], datadir=project["root"])
    R, t = _new_poses(len(ps))
    out = tmp_path / "run" / "poses.star"
    out.parent.mkdir()
    write_particles_star(out, ps.with_poses(R, t))

    inp_p, inp_o = read_star_tables(project["star"], as_text=True)
    out_p, out_o = read_star_tables(out, as_text=True)
    assert list(out_p.columns) == list(inp_p.columns)  # same columns, same order
    _assert_carried(inp_p, out_p, POSE_COLUMNS)
    pd.testing.assert_frame_equal(out_o, inp_o)  # optics table as the input had it
    # image paths exactly as the input wrote them (relative to the RELION project)
    assert out_p["rlnImageName"].iloc[0] == "000001@Extract/job003/Movies/mic_particles.mrcs"
    back = load_particles(out, datadir=project["root"])
    _assert_poses(back, R, t)
    np.testing.assert_array_equal(back.images().numpy(), ps.images().numpy())


def test_unchanged_particles_are_written_back_verbatim(project, tmp_path):
    """No new poses: even the pose columns keep the input's text (nothing reformatted)."""
    ps = load_particles(project["star"], datadir=project["root"])
    write_relion_star(tmp_path / "same.star", ps)
    inp_p, inp_o = read_star_tables(project["star"], as_text=True)
    out_p, out_o = read_star_tables(tmp_path / "same.star", as_text=True)
    pd.testing.assert_frame_equal(out_p, inp_p)
    pd.testing.assert_frame_equal(out_o, inp_o)


def test_relative_to_rebases_relative_paths(project, tmp_path):
    ps = load_particles(project["star"], datadir=project["root"])
    R, t = _new_poses(len(ps))
    new = ps.with_poses(R, t)
    out = tmp_path / "run" / "poses.star"
    out.parent.mkdir()
    # onto the project folder itself: the input's paths
    write_particles_star(out, new, relative_to=project["root"])
    names = read_star_tables(out, as_text=True)[0]["rlnImageName"].tolist()
    assert names == [f"{i + 1:06d}@Extract/job003/Movies/mic_particles.mrcs"
                     for i in range(len(ps))]
    # onto the run folder: a path from there to the stack that was read
    write_particles_star(out, new, relative_to=out.parent)
    names = read_star_tables(out, as_text=True)[0]["rlnImageName"].tolist()
    rel = os.path.relpath(project["stack"], out.parent)
    assert names[3] == f"000004@{rel}"
    back = load_particles(out)  # resolves from the star's folder now, no datadir needed
    _assert_poses(back, R, t)
    assert back.stack_paths[0].resolve() == project["stack"].resolve()


def test_absolute_paths_stay_absolute_with_relative_to(tmp_path):
    stack = tmp_path / "data" / "s.mrcs"
    stack.parent.mkdir()
    write_stack(stack, np.zeros((2, L, L)), 1.0)
    cols = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
            "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize"]
    rows = [[f"{i + 1}@{stack}", "1e4", "1e4", "0", "300", "2.7", "0.1", "1.0"]
            for i in range(2)]
    (tmp_path / "p.star").write_text(_star_text([("particles", cols, rows)]))
    ps = load_particles(tmp_path / "p.star", check_finite=False)
    write_relion_star(tmp_path / "q.star", ps.with_poses(*_new_poses(2)),
                      relative_to=tmp_path / "elsewhere")
    names = read_star_tables(tmp_path / "q.star", as_text=True)[0]["rlnImageName"].tolist()
    assert names == [f"1@{stack}", f"2@{stack}"]


def test_ind_subset_and_halves_carry_their_rows(project, tmp_path):
    ind = np.array([7, 2, 5])
    ps = load_particles(project["star"], datadir=project["root"], ind=ind)
    R, t = _new_poses(len(ps))
    write_relion_star(tmp_path / "sub.star", ps.with_poses(R, t))
    inp_p, inp_o = read_star_tables(project["star"], as_text=True)
    out_p, out_o = read_star_tables(tmp_path / "sub.star", as_text=True)
    _assert_carried(inp_p.iloc[ind].reset_index(drop=True), out_p, POSE_COLUMNS)
    pd.testing.assert_frame_equal(out_o, inp_o)
    # a half of that subset, as --halves makes it, with rlnRandomSubset replaced
    half = ps.subset([0, 2])
    half = half.with_poses(R[[0, 2]], t[[0, 2]])
    write_relion_star(tmp_path / "half.star", half)
    out_h = read_star_tables(tmp_path / "half.star", as_text=True)[0]
    _assert_carried(inp_p.iloc[ind[[0, 2]]].reset_index(drop=True), out_h, POSE_COLUMNS)


def test_changed_values_are_rewritten_the_rest_kept(project, tmp_path):
    """A changed CTF value is written anew in its cell only; a new pixel size and box (as
    ``downsample`` makes them) update the optics table and the image names."""
    ps = load_particles(project["star"], datadir=project["root"])
    ctf = ps.ctf
    du = ctf.defocus_u_angstrom.clone()
    du[3] += 123.5
    changed = ps.with_ctf(dataclasses.replace(ctf, defocus_u_angstrom=du))
    write_relion_star(tmp_path / "c.star", changed)
    inp_p, inp_o = read_star_tables(project["star"], as_text=True)
    out_p = read_star_tables(tmp_path / "c.star", as_text=True)[0]
    assert float(out_p["rlnDefocusU"].iloc[3]) == pytest.approx(float(du[3]), abs=1e-6)
    keep = [i for i in range(len(ps)) if i != 3]
    assert out_p["rlnDefocusU"].iloc[keep].tolist() == inp_p["rlnDefocusU"].iloc[keep].tolist()
    _assert_carried(inp_p, out_p, {"rlnDefocusU"})

    small = tmp_path / "small.mrcs"
    write_stack(small, np.zeros((len(ps), 8, 8)), 3.54)
    down = dataclasses.replace(ps, stack_paths=(small,), image_index=np.arange(len(ps)),
                               stack_index=np.zeros(len(ps), np.int64), box_px=8,
                               pixel_size_angstrom=3.54, names=None,
                               shifts_px=ps.shifts_px / 2)
    write_relion_star(tmp_path / "d.star", down)
    out_p, out_o = read_star_tables(tmp_path / "d.star", as_text=True)
    assert out_o["rlnImagePixelSize"].tolist() == ["3.54", "3.54"]
    assert out_o["rlnImageSize"].tolist() == ["8", "8"]
    assert out_o["rlnBeamTiltX"].tolist() == inp_o["rlnBeamTiltX"].tolist()
    assert out_p["rlnImageName"].iloc[1] == "000002@small.mrcs"
    _assert_carried(inp_p, out_p, {"rlnImageName"})  # shifts in Å unchanged: verbatim too
    back = load_particles(tmp_path / "d.star", check_finite=False)
    assert back.box_px == 8 and back.pixel_size_angstrom == pytest.approx(3.54)


# ------------------------------------------------------------------------------ RELION 3.0


def test_relion30_keeps_columns_and_replaces_pixel_origins_in_place(tmp_path):
    write_stack(tmp_path / "img.mrcs", np.zeros((3, L, L)), 1.0)
    cols = ["rlnAnglePsi", "rlnAngleRot", "rlnAngleTilt", "rlnClassNumber", "rlnCoordinateX",
            "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnDetectorPixelSize",
            "rlnImageName", "rlnMagnification", "rlnMicrographName", "rlnOriginX",
            "rlnOriginY", "rlnSphericalAberration", "rlnVoltage", "rlnAmplitudeContrast"]
    rows = [["98.225690", "16.093530", "86.352776", "1", "323.000000", "15686.000000",
             "17521.400000", "87.629070", "5.000000", f"00000{i + 1}@img.mrcs",
             "10000.000000", f"Micrographs/m{i}.mrc", "1.500000", "-2.000000", "2.700000",
             "300.000000", "0.100000"] for i in range(3)]
    (tmp_path / "p.star").write_text(_star_text([("images", cols, rows)]))
    ps = load_particles(tmp_path / "p.star", check_finite=False)
    R, t = _new_poses(3)
    write_relion_star(tmp_path / "q.star", ps.with_poses(R, t))
    inp = read_star_tables(tmp_path / "p.star", as_text=True)[0]
    out_p, out_o = read_star_tables(tmp_path / "q.star", as_text=True)
    # rlnOriginX/Y (pixels) replaced in place by the Å columns; everything else verbatim
    expect = [{"rlnOriginX": "rlnOriginXAngst", "rlnOriginY": "rlnOriginYAngst"}.get(c, c)
              for c in cols] + ["rlnPhaseShift", "rlnOpticsGroup"]
    assert list(out_p.columns) == expect
    _assert_carried(inp, out_p, POSE_COLUMNS | {"rlnOriginX", "rlnOriginY"})
    # a RELION 3.1 optics table made from the per-particle values
    assert out_o["rlnImagePixelSize"].astype(float).tolist() == [5.0]
    assert out_o["rlnVoltage"].astype(float).tolist() == [300.0]
    back = load_particles(tmp_path / "q.star", check_finite=False)
    _assert_poses(back, R, t)
    assert back.pixel_size_angstrom == pytest.approx(5.0)


# ------------------------------------------------------------------------------ cryoSPARC


def _cs_table(n: int, *, location: bool = True, prefix: str = "alignments3D") -> np.ndarray:
    fields = [("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
              ("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"),
              ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
              ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
              ("ctf/scale", "<f4"), ("ctf/bfactor", "<f4"),
              (f"{prefix}/split", "<u4"), (f"{prefix}/shift", "<f4", (2,)),
              (f"{prefix}/pose", "<f4", (3,)), (f"{prefix}/psize_A", "<f4"),
              (f"{prefix}/error", "<f4")]
    if location:
        fields += [("location/micrograph_uid", "<u8"), ("location/micrograph_path", "S40"),
                   ("location/micrograph_shape", "<u4", (2,)),
                   ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4"),
                   ("location/micrograph_psize_A", "<f4")]
    t = np.zeros(n, dtype=fields)
    rng = np.random.default_rng(3)
    t["uid"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    t["blob/path"] = ">J3/extract/a.mrcs"
    t["blob/idx"] = np.arange(n)[::-1]
    t["blob/shape"] = L
    t["blob/psize_A"] = 2.95
    t["blob/sign"] = -1
    t["ctf/type"] = "ctffind4"
    t["ctf/exp_group_id"] = np.where(np.arange(n) < n // 2, 3, 8)
    t["ctf/accel_kv"] = np.where(np.arange(n) < n // 2, 300, 200)
    t["ctf/cs_mm"] = 2.7
    t["ctf/amp_contrast"] = 0.07
    t["ctf/df1_A"] = rng.uniform(1e4, 2e4, n)
    t["ctf/df2_A"] = rng.uniform(1e4, 2e4, n)
    t["ctf/df_angle_rad"] = rng.uniform(-1, 1, n)
    t["ctf/scale"] = 1
    t["ctf/bfactor"] = 0
    t[f"{prefix}/shift"] = rng.uniform(-3, 3, (n, 2))
    t[f"{prefix}/pose"] = rng.uniform(-2, 2, (n, 3))
    t[f"{prefix}/psize_A"] = 5.9  # aligned at a coarser pixel
    t[f"{prefix}/split"] = np.arange(n) % 2
    t[f"{prefix}/error"] = rng.uniform(0, 1, n)
    if location:
        t["location/micrograph_path"] = [f"J2/motioncorrected/m{i % 2}.mrc" for i in range(n)]
        t["location/micrograph_shape"] = (4096, 5760)  # (height, width)
        t["location/center_x_frac"] = rng.uniform(0, 1, n)
        t["location/center_y_frac"] = rng.uniform(0, 1, n)
        t["location/micrograph_psize_A"] = 0.83
    return t


def _cs_project(tmp_path: Path, table: np.ndarray) -> Path:
    (tmp_path / "J3" / "extract").mkdir(parents=True, exist_ok=True)
    write_stack(tmp_path / "J3" / "extract" / "a.mrcs",
                np.random.default_rng(1).standard_normal((len(table), L, L)), 2.95)
    path = tmp_path / "P1_J9_particles.cs"
    with open(path, "wb") as fh:
        np.save(fh, table)
    return path


def test_cs_to_star_for_relion(tmp_path):
    table = _cs_table(6)
    cs = _cs_project(tmp_path, table)
    ps = load_particles(cs)
    R, t = _new_poses(6)
    write_relion_star(tmp_path / "poses.star", ps.with_poses(R, t))
    out_p, out_o = read_star_tables(tmp_path / "poses.star")
    # RELION's idx@path from blob/idx (0-based) and blob/path (import marker dropped)
    assert out_p["rlnImageName"].tolist() == [f"{i + 1:06d}@J3/extract/a.mrcs"
                                              for i in table["blob/idx"].tolist()]
    assert out_p["rlnMicrographName"].tolist() == [f"J2/motioncorrected/m{i % 2}.mrc"
                                                   for i in range(6)]
    # micrograph_shape is (height, width): x scales with the width
    np.testing.assert_allclose(out_p["rlnCoordinateX"],
                               table["location/center_x_frac"] * 5760.0, atol=0.006)
    np.testing.assert_allclose(out_p["rlnCoordinateY"],
                               table["location/center_y_frac"] * 4096.0, atol=0.006)
    np.testing.assert_allclose(out_p["rlnDefocusU"], table["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_allclose(out_p["rlnDefocusAngle"],
                               np.rad2deg(table["ctf/df_angle_rad"].astype(np.float64)),
                               rtol=1e-6)
    assert set(out_p["rlnCtfScalefactor"]) == {1}
    # one optics group per exposure group, with its own voltage
    assert out_o["rlnOpticsGroup"].tolist() == [1, 2]
    assert out_o["rlnVoltage"].tolist() == [300, 200]
    assert out_o["rlnSphericalAberration"].tolist() == [2.7, 2.7]
    assert out_o["rlnAmplitudeContrast"].tolist() == [0.07, 0.07]
    assert out_o["rlnImagePixelSize"].tolist() == [2.95, 2.95]
    assert out_o["rlnImageSize"].tolist() == [L, L]
    assert out_p["rlnOpticsGroup"].tolist() == [1, 1, 1, 2, 2, 2]
    assert out_p["rlnRandomSubset"].tolist() == (table["alignments3D/split"] + 1).tolist()
    # RELION (and cryospin) read it back: same particles, CTF, new poses
    back = load_particles(tmp_path / "poses.star")
    _assert_poses(back, R, t)
    for f in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv",
              "cs_mm", "amplitude_contrast"):
        torch.testing.assert_close(getattr(back.ctf, f), getattr(ps.ctf, f), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(back.images().numpy(), ps.images().numpy())


@pytest.mark.parametrize("prefix", ["alignments3D", "alignments_class_0"])
def test_cs_writer_round_trips_through_the_reader(tmp_path, prefix):
    table = _cs_table(8, location=prefix == "alignments3D", prefix=prefix)
    cs = _cs_project(tmp_path, table)
    ps = load_particles(cs)
    R, t = _new_poses(8)
    t = t.clamp(-4, 4)
    write_cryosparc(tmp_path / "poses.cs", ps.with_poses(R, t))
    back = read_cryosparc(tmp_path / "poses.cs")
    assert geodesic_distance_rad(back.rotations, R).max() < 1e-6  # float32 axis-angle
    torch.testing.assert_close(back.shifts_px, t, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(back.random_subset, ps.random_subset)
    out = np.load(tmp_path / "poses.cs")
    # every input field kept, in order, unchanged but the alignment it now holds
    assert list(out.dtype.names[: len(table.dtype.names)]) == list(table.dtype.names)
    written = {"alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A",
               "alignments3D/split"}
    for name in table.dtype.names:
        if name not in written:
            np.testing.assert_array_equal(out[name], table[name], err_msg=name)
    assert out.dtype["alignments3D/pose"] == np.dtype(("<f4", (3,)))
    np.testing.assert_array_equal(out["alignments3D/psize_A"], np.float32(2.95))


def test_cs_writer_subset_and_refusals(tmp_path):
    table = _cs_table(6)
    ps = load_particles(_cs_project(tmp_path, table), ind=[4, 1])
    R, t = _new_poses(2)
    write_cryosparc(tmp_path / "sub.cs", ps.with_poses(R, t))
    out = np.load(tmp_path / "sub.cs")
    np.testing.assert_array_equal(out["uid"], table["uid"][[4, 1]])
    with pytest.raises(ValueError, match="no poses"):
        write_cryosparc(tmp_path / "x.cs", ps.with_poses(None, None))
    write_stack(tmp_path / "plain.mrcs", np.zeros((2, L, L)), 1.0)
    plain = load_particles(tmp_path / "plain.mrcs", no_ctf=True, check_finite=False)
    with pytest.raises(ValueError, match="not read from a .cs"):
        write_cryosparc(tmp_path / "y.cs", plain.with_poses(R, t))


def test_cs_writer_adds_fields_of_one_number_per_particle(tmp_path):
    """Extra per-particle fields (e.g. the scores) are added as float32 after the input's
    fields, or replace a field of that name; a field of another length is refused."""
    table = _cs_table(5)
    ps = load_particles(_cs_project(tmp_path, table)).with_poses(*_new_poses(5))
    scores = np.array([-3.25, 0.0, 12.5, 1e4, 7.125])
    write_cryosparc(tmp_path / "a.cs", ps, fields={"cryospin/score": scores})
    out = np.load(tmp_path / "a.cs")
    assert out.dtype.names[-1] == "cryospin/score"
    assert out.dtype["cryospin/score"] == np.dtype("<f4")
    np.testing.assert_array_equal(out["cryospin/score"], scores.astype(np.float32))
    again = load_particles(tmp_path / "a.cs").with_poses(*_new_poses(5))
    write_cryosparc(tmp_path / "b.cs", again, fields={"cryospin/score": scores + 1})
    out = np.load(tmp_path / "b.cs")
    assert list(out.dtype.names).count("cryospin/score") == 1
    np.testing.assert_array_equal(out["cryospin/score"], (scores + 1).astype(np.float32))
    with pytest.raises(ValueError, match=r"cryospin/score has shape \(4,\); expected \(5,\)"):
        write_cryosparc(tmp_path / "c.cs", ps, fields={"cryospin/score": scores[:4]})


# ------------------------------------------------------------------------------ cryoDRGN


def test_cryodrgn_input_writes_a_star_as_before(tmp_path):
    """A .mrcs + ctf.pkl input has no columns to carry: the star is written from the particle
    set, image paths relative to the star's folder."""
    (tmp_path / "data").mkdir()
    write_stack(tmp_path / "data" / "p.mrcs", np.zeros((3, L, L)), 2.0)
    f64 = {"dtype": torch.float64}
    ctf = CTFParams(
        defocus_u_angstrom=torch.full((3,), 1e4, **f64),
        defocus_v_angstrom=torch.full((3,), 1.1e4, **f64),
        defocus_angle_deg=torch.zeros(3, **f64), voltage_kv=torch.full((3,), 300.0, **f64),
        cs_mm=torch.full((3,), 2.7, **f64), amplitude_contrast=torch.full((3,), 0.1, **f64),
        phase_shift_deg=torch.zeros(3, **f64), bfactor_a2=torch.zeros(3, **f64),
    )
    write_cryodrgn_ctf(tmp_path / "ctf.pkl", ctf, L, 2.0)
    ps = load_particles(tmp_path / "data" / "p.mrcs", ctf_pkl=tmp_path / "ctf.pkl",
                        check_finite=False)
    R, t = _new_poses(3)
    (tmp_path / "run").mkdir()
    write_particles_star(tmp_path / "run" / "poses.star", ps.with_poses(R, t))
    out_p, out_o = read_star_tables(tmp_path / "run" / "poses.star")
    assert out_p["rlnImageName"].tolist() == [f"00000{i}@../data/p.mrcs" for i in (1, 2, 3)]
    assert {"rlnAngleRot", "rlnOriginXAngst", "rlnDefocusU", "rlnOpticsGroup"} <= set(out_p)
    assert out_o["rlnImagePixelSize"].tolist() == [2.0]
    _assert_poses(load_particles(tmp_path / "run" / "poses.star", check_finite=False), R, t)
