"""RELION star reading/writing and the RELION <-> cryospin pose conventions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io.mrc import write_stack
from cryospin.io.particles import ParticleSet, load_particles
from cryospin.io.star import (
    read_relion_star,
    relion_euler_from_rotation,
    relion_origin_from_shift_px,
    rotation_from_relion_euler,
    shift_px_from_relion_origin,
)
from cryospin.io.star_write import write_relion_star
from cryospin.rotations import random_rotations, so3_exp

L = 16


def _random_ctf(n: int, rng: np.random.Generator, bfactor: bool = True) -> CTFParams:
    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.float64))

    return CTFParams(
        defocus_u_angstrom=t(rng.uniform(8000, 30000, n)),
        defocus_v_angstrom=t(rng.uniform(8000, 30000, n)),
        defocus_angle_deg=t(rng.uniform(-180, 180, n)),
        voltage_kv=t(np.full(n, 300.0)),
        cs_mm=t(np.where(np.arange(n) % 2 == 0, 2.7, 0.01)),
        amplitude_contrast=t(np.full(n, 0.1)),
        phase_shift_deg=t(rng.uniform(0, 90, n)),
        bfactor_a2=t(rng.uniform(0, 50, n) if bfactor else np.zeros(n)),
    )


def _synthetic_set(tmp_path: Path, n: int = 12, seed: int = 0) -> ParticleSet:
    """Two stacks, random poses including tilts at/near 0 and 180 degrees."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    (tmp_path / "stacks").mkdir(exist_ok=True)
    counts = [n // 2, n - n // 2]
    paths = []
    for k, c in enumerate(counts):
        p = tmp_path / "stacks" / f"s{k}.mrcs"
        write_stack(p, rng.standard_normal((c, L, L)), 1.25)
        paths.append(p)
    R = random_rotations(n, generator=g)
    # exact poles and near-poles
    R[0] = torch.eye(3, dtype=torch.float64)
    R[1] = rotation_from_relion_euler([30.0], [180.0], [40.0])[0]
    R[2] = rotation_from_relion_euler([-70.0], [1e-7], [10.0])[0]
    R[3] = rotation_from_relion_euler([120.0], [180 - 1e-6], [-100.0])[0]
    R[4] = so3_exp(torch.tensor([math.pi, 0.0, 0.0], dtype=torch.float64))
    return ParticleSet(
        source=tmp_path / "synthetic",
        stack_paths=tuple(paths),
        stack_index=np.repeat([0, 1], counts).astype(np.int64),
        image_index=np.concatenate([np.arange(c) for c in counts]).astype(np.int64),
        box_px=L,
        pixel_size_angstrom=1.25,
        ctf=_random_ctf(n, rng),
        rotations=R,
        shifts_px=torch.from_numpy(rng.uniform(-5, 5, (n, 2))),
        optics_group=np.ones(n, np.int64),
        random_subset=(np.arange(n) % 2 + 1).astype(np.int64),
    )


def _assert_same(a: ParticleSet, b: ParticleSet) -> None:
    assert len(a) == len(b) and a.box_px == b.box_px
    assert a.pixel_size_angstrom == pytest.approx(b.pixel_size_angstrom, rel=1e-12)
    torch.testing.assert_close(a.rotations, b.rotations, atol=1e-9, rtol=0)
    torch.testing.assert_close(a.shifts_px, b.shifts_px, atol=1e-9, rtol=0)
    for f in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv",
              "cs_mm", "amplitude_contrast", "phase_shift_deg", "bfactor_a2"):
        torch.testing.assert_close(getattr(a.ctf, f), getattr(b.ctf, f), atol=1e-8, rtol=1e-11)
    np.testing.assert_array_equal(a.random_subset, b.random_subset)
    for i in range(len(a)):
        path_a = a.stack_paths[a.stack_index[i]].resolve()
        assert path_a == b.stack_paths[b.stack_index[i]].resolve()
    np.testing.assert_array_equal(a.image_index, b.image_index)


def test_write_then_load_round_trip(tmp_path):
    ps = _synthetic_set(tmp_path)
    out = tmp_path / "out" / "particles.star"
    out.parent.mkdir()
    write_relion_star(out, ps)
    back = load_particles(out)
    _assert_same(ps, back)
    np.testing.assert_array_equal(back.images().numpy(), ps.images().numpy())
    # written as RELION 3.1: optics block with per-group facts, origins in Angstrom
    blocks = starfile.read(out, always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    opt = blocks["optics"]
    assert {"rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnVoltage",
            "rlnSphericalAberration", "rlnAmplitudeContrast"} <= set(opt.columns)
    assert len(opt) == 2  # two Cs values -> two optics groups
    cols = set(blocks["particles"].columns)
    assert {"rlnOriginXAngst", "rlnOriginYAngst", "rlnCtfBfactor", "rlnRandomSubset"} <= cols
    assert blocks["particles"]["rlnImageName"].iloc[0] == "000001@../stacks/s0.mrcs"


def test_columns_given_replace_an_input_column_of_that_name_in_place_or_follow_the_others(
        tmp_path):
    ps = _synthetic_set(tmp_path)
    n = len(ps)
    write_relion_star(tmp_path / "a.star", ps, columns={"rlnLogLikeliContribution": np.zeros(n)})
    first = load_particles(tmp_path / "a.star")
    cols = list(starfile.read(tmp_path / "a.star", always_dict=True)["particles"].columns)
    assert cols[-1] == "rlnLogLikeliContribution"
    scores = np.linspace(-2.5, 7.125, n)
    write_relion_star(tmp_path / "b.star", first, columns={"rlnLogLikeliContribution": scores})
    table = starfile.read(tmp_path / "b.star", always_dict=True)["particles"]
    assert list(table.columns) == cols  # the input's column replaced where it stood
    np.testing.assert_array_equal(table["rlnLogLikeliContribution"].to_numpy(), scores)
    with pytest.raises(ValueError, match="rlnLogLikeliContribution"):
        write_relion_star(tmp_path / "c.star", ps, columns={"rlnLogLikeliContribution": [1.0]})


def test_round_trip_twice_is_stable(tmp_path):
    ps = _synthetic_set(tmp_path, seed=3)
    write_relion_star(tmp_path / "a.star", ps)
    a = load_particles(tmp_path / "a.star")
    write_relion_star(tmp_path / "b.star", a)
    _assert_same(a, load_particles(tmp_path / "b.star"))


def test_no_bfactor_column_when_zero(tmp_path):
    ps = _synthetic_set(tmp_path)
    ps = ps.with_ctf(_random_ctf(len(ps), np.random.default_rng(5), bfactor=False))
    write_relion_star(tmp_path / "p.star", ps)
    assert "rlnCtfBfactor" not in starfile.read(tmp_path / "p.star", always_dict=True)[
        "particles"].columns


def test_relion_euler_round_trip_generic():
    R = random_rotations(200, generator=torch.Generator().manual_seed(1))
    rot, tilt, psi = relion_euler_from_rotation(R)
    torch.testing.assert_close(rotation_from_relion_euler(rot, tilt, psi), R, atol=1e-12,
                               rtol=0)


def test_relion_matrix_projection_direction():
    """Third row of R is RELION's projection direction; R's slice samples k @ R."""
    rot, tilt = 35.0, 70.0
    R = rotation_from_relion_euler([rot], [tilt], [123.0])[0]
    r, t = math.radians(rot), math.radians(tilt)
    expected = torch.tensor([math.sin(t) * math.cos(r), math.sin(t) * math.sin(r), math.cos(t)],
                            dtype=torch.float64)
    torch.testing.assert_close(R[2], expected)
    # the slice plane {k @ R : k = (kx, ky, 0)} is orthogonal to the projection direction
    k = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    torch.testing.assert_close(k @ R @ expected, torch.zeros(2, dtype=torch.float64))


def test_shift_sign():
    o = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(shift_px_from_relion_origin(o), -o)
    torch.testing.assert_close(relion_origin_from_shift_px(shift_px_from_relion_origin(o)), o)


def _write_star(path: Path, blocks: dict, order: list[str] | None = None) -> None:
    starfile.write({k: blocks[k] for k in (order or list(blocks))}, path)


def _stack_file(tmp_path: Path, n: int = 3, shape: tuple[int, int] = (L, L)) -> Path:
    p = tmp_path / "img.mrcs"
    write_stack(p, np.zeros((n, L, L)), 1.0) if shape == (L, L) else None
    if shape != (L, L):
        import mrcfile

        with mrcfile.new(p, overwrite=True) as m:
            m.set_data(np.zeros((n, *shape), np.float32))
    return p


def _relion30_table(n: int = 3, names: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnImageName": names or [f"{i + 1}@img.mrcs" for i in range(n)],
        "rlnDefocusU": [10000.0] * n,
        "rlnDefocusV": [9000.0] * n,
        "rlnDefocusAngle": [10.0] * n,
        "rlnVoltage": [300.0] * n,
        "rlnSphericalAberration": [2.7] * n,
        "rlnAmplitudeContrast": [0.1] * n,
        "rlnMagnification": [10000.0] * n,
        "rlnDetectorPixelSize": [5.0] * n,
        "rlnAngleRot": [10.0] * n,
        "rlnAngleTilt": [20.0] * n,
        "rlnAnglePsi": [30.0] * n,
        "rlnOriginX": [1.0, -2.0, 0.5][:n],
        "rlnOriginY": [0.0, 3.0, -1.0][:n],
    })


def test_relion30_pixel_size_and_origin_in_pixels(tmp_path):
    _stack_file(tmp_path)
    _write_star(tmp_path / "p.star", {"images": _relion30_table()})
    ps = read_relion_star(tmp_path / "p.star")
    assert ps.pixel_size_angstrom == pytest.approx(5.0)  # 5 um * 1e4 / 10000
    assert ps.box_px == L
    torch.testing.assert_close(ps.shifts_px[:, 0], -torch.tensor([1.0, -2.0, 0.5],
                                                                 dtype=torch.float64))
    assert ps.ctf.phase_shift_deg.abs().max() == 0  # absent column -> 0


def test_relion31_optics_after_particles(tmp_path):
    _stack_file(tmp_path)
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["a", "b"],
                           "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 2.0],
                           "rlnAmplitudeContrast": [0.1, 0.07], "rlnImagePixelSize": [2.0, 2.0],
                           "rlnImageSize": [L, L], "rlnImageDimensionality": [2, 2]})
    parts = pd.DataFrame({"rlnImageName": ["1@img.mrcs", "2@img.mrcs", "3@img.mrcs"],
                          "rlnOpticsGroup": [2, 1, 2], "rlnDefocusU": [1e4] * 3,
                          "rlnDefocusV": [1e4] * 3, "rlnDefocusAngle": [0.0] * 3,
                          "rlnOriginXAngst": [2.0, 4.0, -2.0], "rlnOriginYAngst": [0.0] * 3,
                          "rlnAngleRot": [0.0] * 3, "rlnAngleTilt": [0.0] * 3,
                          "rlnAnglePsi": [0.0] * 3})
    _write_star(tmp_path / "p.star", {"particles": parts, "optics": optics})
    ps = read_relion_star(tmp_path / "p.star")
    np.testing.assert_array_equal(ps.ctf.voltage_kv.numpy(), [200.0, 300.0, 200.0])
    np.testing.assert_array_equal(ps.ctf.cs_mm.numpy(), [2.0, 2.7, 2.0])
    np.testing.assert_array_equal(ps.shifts_px[:, 0].numpy(), [-1.0, -2.0, 1.0])
    np.testing.assert_array_equal(ps.optics_group, [2, 1, 2])
    # writing back keeps the two groups and their names
    write_relion_star(tmp_path / "q.star", ps)
    opt = starfile.read(tmp_path / "q.star", always_dict=True)["optics"]
    assert sorted(opt["rlnOpticsGroupName"]) == ["a", "b"]


def test_datadir(tmp_path):
    (tmp_path / "data").mkdir()
    write_stack(tmp_path / "data" / "img.mrcs", np.zeros((3, L, L)), 1.0)
    _write_star(tmp_path / "p.star", {"images": _relion30_table(
        names=[f"{i + 1}@Extract/job1/img.mrcs" for i in range(3)])})
    ps = read_relion_star(tmp_path / "p.star", datadir=tmp_path / "data")
    assert ps.stack_paths[0] == tmp_path / "data" / "img.mrcs"


# ------------------------------------------------------------------ bad input
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.star: file not found"):
        load_particles(tmp_path / "nope.star")


def test_missing_stack_names_tried_paths(tmp_path):
    _write_star(tmp_path / "p.star", {"images": _relion30_table()})
    with pytest.raises(InputError, match=r"p\.star: image stack 'img\.mrcs' not found \(tried"):
        read_relion_star(tmp_path / "p.star")


def test_row_past_end_of_stack(tmp_path):
    _stack_file(tmp_path, n=2)
    _write_star(tmp_path / "p.star", {"images": _relion30_table()})
    with pytest.raises(InputError, match=r"p\.star: row 3 \(3@img\.mrcs\) points past the end "
                                         r"of img\.mrcs, which has 2 images"):
        read_relion_star(tmp_path / "p.star")


@pytest.mark.parametrize("bad", ["0@img.mrcs", "-1@img.mrcs"])
def test_index_zero_or_negative(tmp_path, bad):
    _stack_file(tmp_path)
    _write_star(tmp_path / "p.star", {"images": _relion30_table(
        names=["1@img.mrcs", bad, "2@img.mrcs"])})
    with pytest.raises(InputError, match=r"p\.star: row 2: image index -?[01] .*1-based"):
        read_relion_star(tmp_path / "p.star")


def test_missing_ctf_columns_are_named(tmp_path):
    _stack_file(tmp_path)
    df = _relion30_table().drop(columns=["rlnAmplitudeContrast", "rlnVoltage"])
    _write_star(tmp_path / "p.star", {"images": df})
    with pytest.raises(InputError, match="missing CTF columns rlnVoltage, "
                                         "rlnAmplitudeContrast") as info:
        load_particles(tmp_path / "p.star")
    assert "\n" not in str(info.value)
    assert load_particles(tmp_path / "p.star", no_ctf=True).ctf is None
    ps = load_particles(tmp_path / "p.star", defaults={"rlnAmplitudeContrast": 0.07,
                                                       "rlnVoltage": 200.0})
    assert float(ps.ctf.amplitude_contrast[0]) == 0.07


def test_conflicting_pixel_sizes(tmp_path):
    _stack_file(tmp_path)
    df = _relion30_table()
    df["rlnMagnification"] = [10000.0, 10000.0, 20000.0]
    _write_star(tmp_path / "p.star", {"images": df})
    with pytest.raises(InputError, match=r"p\.star: conflicting pixel sizes .*2\.5, 5"):
        read_relion_star(tmp_path / "p.star")


def test_non_square_stack(tmp_path):
    _stack_file(tmp_path, shape=(L, L + 2))
    _write_star(tmp_path / "p.star", {"images": _relion30_table()})
    with pytest.raises(InputError, match="img.mrcs: images are not square"):
        read_relion_star(tmp_path / "p.star")


def test_different_boxes_across_stacks(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((2, L, L)), 1.0)
    write_stack(tmp_path / "b.mrcs", np.zeros((2, L + 2, L + 2)), 1.0)
    _write_star(tmp_path / "p.star", {"images": _relion30_table(
        names=["1@a.mrcs", "2@a.mrcs", "1@b.mrcs"])})
    with pytest.raises(InputError, match=r"b\.mrcs: images are 18 px but other stacks are 16"):
        read_relion_star(tmp_path / "p.star")


def test_metadata_only_needs_box(tmp_path):
    _write_star(tmp_path / "p.star", {"images": _relion30_table()})
    with pytest.raises(InputError, match="box size unknown"):
        read_relion_star(tmp_path / "p.star", metadata_only=True)
    ps = read_relion_star(tmp_path / "p.star", metadata_only=True, box_px=64)
    assert ps.box_px == 64 and len(ps) == 3


def test_garbage_star(tmp_path):
    (tmp_path / "p.star").write_text("this is not a star file\n")
    with pytest.raises(InputError, match=r"p\.star: "):
        read_relion_star(tmp_path / "p.star")


@pytest.mark.parametrize("tilt", [0.0, 1e-13, 1e-9, 1e-5, 0.3, 90.0, 179.7, 180 - 1e-5,
                                  180 - 1e-9, 180.0])
def test_relion_euler_exact_near_poles(tilt):
    rng = np.random.default_rng(7)
    n = 50
    rot = rng.uniform(-180, 180, n)
    psi = rng.uniform(-180, 180, n)
    R = rotation_from_relion_euler(rot, np.full(n, tilt), psi)
    r2, t2, p2 = relion_euler_from_rotation(R)
    assert float(t2.min()) >= 0 and float(t2.max()) <= 180
    assert float(r2.min()) > -180 and float(r2.max()) <= 180
    torch.testing.assert_close(rotation_from_relion_euler(r2, t2, p2), R, atol=5e-15, rtol=0)
