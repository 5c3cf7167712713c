"""cryoSPARC .cs reading: fields, conventions, path resolution, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.io.cs import (
    cryosparc_pose_from_rotation,
    cryosparc_shift_from_shift_px,
    read_cryosparc,
    rotation_from_cryosparc_pose,
    shift_px_from_cryosparc_shift,
)
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.rotations import random_rotations, so3_exp

L = 16


def _cs_table(n: int, paths: list[str], idx: list[int], prefix: str = "alignments3D",
              with_ctf: bool = True, psize_align: float = 2.0) -> np.ndarray:
    fields = [("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4")]
    if with_ctf:
        fields += [(f, "<f4") for f in ("ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast",
                                         "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad",
                                         "ctf/phase_shift_rad", "ctf/bfactor")]
    fields += [(f"{prefix}/shift", "<f4", (2,)), (f"{prefix}/pose", "<f4", (3,)),
               (f"{prefix}/psize_A", "<f4"), (f"{prefix}/split", "<u4")]
    t = np.zeros(n, dtype=fields)
    rng = np.random.default_rng(0)
    t["blob/path"] = paths
    t["blob/idx"] = idx
    t["blob/shape"] = L
    t["blob/psize_A"] = 2.0
    t["blob/sign"] = -1
    if with_ctf:
        t["ctf/accel_kv"] = 300
        t["ctf/cs_mm"] = 2.7
        t["ctf/amp_contrast"] = 0.07
        t["ctf/df1_A"] = rng.uniform(1e4, 2e4, n)
        t["ctf/df2_A"] = rng.uniform(1e4, 2e4, n)
        t["ctf/df_angle_rad"] = rng.uniform(-1, 1, n)
        t["ctf/phase_shift_rad"] = 0.5
        t["ctf/bfactor"] = 10
    t[f"{prefix}/shift"] = rng.uniform(-3, 3, (n, 2))
    t[f"{prefix}/pose"] = rng.uniform(-2, 2, (n, 3))
    t[f"{prefix}/psize_A"] = psize_align
    t[f"{prefix}/split"] = np.arange(n) % 2
    return t


def _setup(tmp_path, **kw):
    (tmp_path / "J3" / "extract").mkdir(parents=True)
    write_stack(tmp_path / "J3" / "extract" / "a.mrcs", np.random.default_rng(1)
                .standard_normal((4, L, L)), 2.0)
    t = _cs_table(4, ["J3/extract/a.mrcs"] * 4, [3, 0, 1, 2], **kw)
    np.save(tmp_path / "p.npy", t)
    (tmp_path / "p.npy").rename(tmp_path / "p.cs")
    return t


def test_read_fields_and_conventions(tmp_path):
    t = _setup(tmp_path)
    ps = read_cryosparc(tmp_path / "p.cs")
    assert len(ps) == 4 and ps.box_px == L and ps.pixel_size_angstrom == 2.0
    np.testing.assert_array_equal(ps.image_index, [3, 0, 1, 2])  # 0-based, kept as is
    torch.testing.assert_close(ps.ctf.defocus_angle_deg,
                               torch.rad2deg(torch.from_numpy(t["ctf/df_angle_rad"]
                                                              .astype(np.float64))))
    torch.testing.assert_close(ps.ctf.bfactor_a2, torch.full((4,), 10.0, dtype=torch.float64))
    pose = torch.from_numpy(t["alignments3D/pose"].astype(np.float64))
    torch.testing.assert_close(ps.rotations, so3_exp(pose).transpose(-1, -2))
    torch.testing.assert_close(ps.shifts_px, -torch.from_numpy(
        t["alignments3D/shift"].astype(np.float64)))
    np.testing.assert_array_equal(ps.random_subset, [1, 2, 1, 2])
    imgs = ps.images([0, 1])
    assert imgs.shape == (2, L, L)


def test_ab_initio_fallback_and_alignment_pixel_size(tmp_path):
    t = _setup(tmp_path, prefix="alignments_class_0", psize_align=4.0)
    ps = read_cryosparc(tmp_path / "p.cs")
    # shifts are in pixels of the alignment (4 A) -> image pixels (2 A): x2
    torch.testing.assert_close(ps.shifts_px, -2 * torch.from_numpy(
        t["alignments_class_0/shift"].astype(np.float64)))


def test_pose_conversion_round_trip():
    R = random_rotations(100, generator=torch.Generator().manual_seed(0))
    w = cryosparc_pose_from_rotation(R)
    torch.testing.assert_close(rotation_from_cryosparc_pose(w), R, atol=1e-12, rtol=0)
    half_turn = torch.tensor([[math.pi, 0, 0]], dtype=torch.float64)
    Rh = rotation_from_cryosparc_pose(half_turn)
    torch.testing.assert_close(rotation_from_cryosparc_pose(cryosparc_pose_from_rotation(Rh)), Rh)
    s = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(shift_px_from_cryosparc_shift(cryosparc_shift_from_shift_px(s)), s)


def test_datadir_and_job_folder_stripping(tmp_path):
    _setup(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (tmp_path / "p.cs").rename(other / "p.cs")
    with pytest.raises(InputError, match=r"p\.cs: image stack 'J3/extract/a\.mrcs' not found "
                                         r"\(tried .*elsewhere/J3/extract/a\.mrcs"):
        read_cryosparc(other / "p.cs")
    flat = tmp_path / "flat"
    flat.mkdir()
    (tmp_path / "J3" / "extract" / "a.mrcs").rename(flat / "a.mrcs")
    ps = read_cryosparc(other / "p.cs", datadir=flat)  # "J3/extract/" stripped
    assert ps.stack_paths[0] == flat / "a.mrcs"


def test_imported_path_marker(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((4, L, L)), 2.0)
    t = _cs_table(2, [">J1/imported/a.mrcs"] * 2, [0, 1])
    np.save(tmp_path / "p.npy", t)
    (tmp_path / "p.npy").rename(tmp_path / "p.cs")
    assert read_cryosparc(tmp_path / "p.cs").stack_paths[0] == tmp_path / "a.mrcs"


def test_metadata_only(tmp_path):
    t = _cs_table(3, ["J9/missing.mrcs"] * 3, [0, 1, 2])
    np.save(tmp_path / "p.npy", t)
    (tmp_path / "p.npy").rename(tmp_path / "p.cs")
    ps = load_particles(tmp_path / "p.cs", metadata_only=True)
    assert len(ps) == 3 and ps.box_px == L


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="nope.cs: file not found"):
        read_cryosparc(tmp_path / "nope.cs")
    (tmp_path / "junk.cs").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.cs: cannot read cryoSPARC"):
        read_cryosparc(tmp_path / "junk.cs")
    _setup(tmp_path, with_ctf=False)
    with pytest.raises(InputError, match="missing CTF fields ctf/df1_A, ctf/df2_A"):
        load_particles(tmp_path / "p.cs")
    assert load_particles(tmp_path / "p.cs", no_ctf=True).ctf is None


def test_row_past_end(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((2, L, L)), 2.0)
    np.save(tmp_path / "p.npy", _cs_table(2, ["a.mrcs"] * 2, [0, 2]))
    (tmp_path / "p.npy").rename(tmp_path / "p.cs")
    with pytest.raises(InputError, match=r"row 1 \(blob/idx 2\) points past the end of a\.mrcs"):
        read_cryosparc(tmp_path / "p.cs")
