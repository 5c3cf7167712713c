"""Format compatibility against cryoDRGN's known-good parses in ``../shared/data``.

These prove cryospin's conventions (docs/conventions.md, "RELION and cryoSPARC"): rotations
equal cryoDRGN's ``rot``; ``shift_px = −trans · D``; CTF parameters equal cryoDRGN's columns.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.io import (
    load_particles,
    merge_optics,
    pixel_sizes_angstrom,
    read_map,
    read_star_tables,
)
from cryospin.io.mrc import ImageStack, clear_stack_cache
from cryospin.io.pkl import read_cryodrgn_ctf, read_cryodrgn_poses

CTF_FIELDS = ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv",
              "cs_mm", "amplitude_contrast", "phase_shift_deg")


def _pickle(path):
    with open(path, "rb") as fh:
        return pickle.load(fh)


def _assert_ctf_equal(ctf, ref, rtol=1e-6, atol=1e-4):
    for f in CTF_FIELDS:
        torch.testing.assert_close(getattr(ctf, f), getattr(ref, f), rtol=rtol, atol=atol,
                                   msg=f"CTF field {f}")


def test_relion30_star_matches_cryodrgn(shared_data):
    star = shared_data / "formats/relion30/FinalRefinement-OriginalParticles-PfCRT.star"
    pkl = shared_data / "formats/cryodrgn_pkl"
    # the star lacks rlnAmplitudeContrast (cryoDRGN was given w=0.1) and rlnImageSize (D=300);
    # its stack is absent, so read metadata only
    with pytest.raises(InputError, match=r"missing CTF columns rlnAmplitudeContrast \(supply"):
        load_particles(star, metadata_only=True, box_px=300)
    ps = load_particles(star, metadata_only=True, box_px=300,
                        defaults={"rlnAmplitudeContrast": 0.1})
    assert len(ps) == 5 and ps.pixel_size_angstrom == pytest.approx(1.035)  # 1.035 um * 1e4 / 1e4
    rot, trans = _pickle(pkl / "pose.star.pkl")
    torch.testing.assert_close(ps.rotations, torch.from_numpy(rot), atol=1e-12, rtol=0)
    # cryoDRGN trans = rlnOrigin / D; cryospin shift_px = -origin
    np.testing.assert_allclose(-ps.shifts_px.numpy() / 300, trans, rtol=0, atol=1e-15)
    R_ref, shift_ref = read_cryodrgn_poses(pkl / "pose.star.pkl", 300)
    torch.testing.assert_close(ps.shifts_px, shift_ref, atol=1e-12, rtol=0)
    ref, box, apix = read_cryodrgn_ctf(pkl / "ctf1.pkl")
    assert box == 300 and apix == pytest.approx(ps.pixel_size_angstrom)
    _assert_ctf_equal(ps.ctf, ref)
    np.testing.assert_array_equal(ps.random_subset, [2, 1, 2, 2, 2])


def test_cryosparc_cs_matches_cryodrgn(shared_data):
    cs = shared_data / "formats/cryosparc/cryosparc_P12_J24_001_particles.cs"
    pkl = shared_data / "formats/cryodrgn_pkl"
    ps = load_particles(cs, metadata_only=True)  # image files absent
    assert len(ps) == 2019 and ps.box_px == 180 and ps.pixel_size_angstrom == pytest.approx(2.95)
    rot, trans = _pickle(pkl / "pose.cs.pkl")  # float32, D=180
    torch.testing.assert_close(ps.rotations, torch.from_numpy(rot.astype(np.float64)),
                               atol=2e-6, rtol=0)
    np.testing.assert_allclose(-ps.shifts_px.numpy() / 180, trans, rtol=0, atol=1e-7)
    ref, box, apix = read_cryodrgn_ctf(pkl / "ctf2.pkl")
    assert box == 180 and apix == pytest.approx(2.95)
    _assert_ctf_equal(ps.ctf, ref)


def test_cryosparc_stack_missing_is_named(shared_data):
    cs = shared_data / "formats/cryosparc/cryosparc_P12_J24_001_particles.cs"
    with pytest.raises(InputError, match=r"image stack 'J19/extract/.*' not found \(tried "):
        load_particles(cs)


def test_cryosparc_exported_2d_and_empty(shared_data):
    ps = load_particles(shared_data / "formats/cryosparc/cryosparc_J2_particles_exported.cs",
                        metadata_only=True)
    assert len(ps) == 22 and ps.box_px == 300 and ps.rotations is None
    assert ps.ctf.voltage_kv.unique().tolist() == [300.0]
    with pytest.raises(InputError, match="4k_dataset.cs: the .cs file has no particles"):
        load_particles(shared_data / "formats/cryosparc/4k_dataset.cs", metadata_only=True)


def test_empiar10076_star_and_cs_agree(shared_data):
    d = shared_data / "particles/empiar10076_7"
    a = load_particles(d / "empiar_10076_7.star")
    b = load_particles(d / "empiar_10076_7.cs")
    assert len(a) == len(b) == 7 and a.box_px == b.box_px == 320
    assert a.pixel_size_angstrom == pytest.approx(5.0 * 1e4 / 38168, rel=1e-12)  # 1.30999...
    assert b.pixel_size_angstrom == pytest.approx(1.31, abs=1e-5)
    _assert_ctf_equal(a.ctf, b.ctf, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(a.images(), b.images())


def _all_particle_files(shared_data):
    root = shared_data / "particles"
    return sorted(p for ext in ("*.star", "*.cs", "*.mrcs", "*.mrc") for p in root.rglob(ext))


def test_every_particle_file_loads(shared_data):
    files = _all_particle_files(shared_data)
    assert len(files) >= 8
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # relion31.mrcs lacks the MAP id (tested below)
            ps = load_particles(f, no_ctf=f.suffix in (".mrcs", ".mrc"))
        imgs = ps.images()
        assert imgs.shape == (len(ps), ps.box_px, ps.box_px), f
        assert imgs.dtype == torch.float32
        assert torch.isfinite(imgs).all(), f
        assert float(imgs.std()) > 0, f
        if f.suffix in (".star", ".cs"):
            assert ps.ctf is not None and ps.pixel_size_angstrom > 0, f


def test_relion31_stack_without_map_id_warns(shared_data):
    clear_stack_cache()
    with pytest.warns(UserWarning, match=r"relion31\.mrcs.*'MAP '"):
        s = ImageStack(shared_data / "particles/relion31_5/relion31.mrcs")
    assert len(s) == 5 and s.box_px == 256
    clear_stack_cache()
    with pytest.warns(UserWarning, match=r"relion31\.mrcs.*'MAP '"):
        ps = load_particles(shared_data / "particles/relion31_5/relion31.star")
    assert ps.pixel_size_angstrom == pytest.approx(2.806)  # star wins over header (1.0)
    assert ps.rotations.shape == (5, 3, 3)


def test_aspire_two_optics_groups(shared_data):
    ps = load_particles(shared_data / "particles/aspire_sample17/sample_particles_relion31.star")
    groups = ps.optics_group
    assert set(groups.tolist()) == {1, 2}
    v = ps.ctf.voltage_kv.numpy()
    np.testing.assert_array_equal(v[groups == 1], 300.0)
    np.testing.assert_array_equal(v[groups == 2], 200.0)
    assert ps.pixel_size_angstrom == pytest.approx(1.4)


@pytest.mark.parametrize(
    ("rel", "n", "pixel", "kv", "cs"),
    [
        ("formats/relion31/relion31.v2.star", 5, {2.806}, {300.0}, {0.01}),
        ("formats/relion5/relion5.star", 17, {0.89}, {100.0}, {1.6}),
        ("formats/relion31/relion31.6opticsgroups.star", 139, {1.24, 1.25}, {200.0},
         {2.6, 2.7}),
    ],
)
def test_relion31_and_5_per_particle_optics(shared_data, rel, n, pixel, kv, cs):
    path = shared_data / rel
    particles, optics = read_star_tables(path)
    df = merge_optics(particles, optics, path)
    assert len(df) == n
    apix = pixel_sizes_angstrom(df)
    assert set(np.round(apix, 4).tolist()) == pixel
    assert set(df["rlnVoltage"].tolist()) == kv
    assert set(df["rlnSphericalAberration"].tolist()) == cs
    # each particle carries its own group's values
    table = optics.set_index("rlnOpticsGroup")
    for col in ("rlnImagePixelSize", "rlnSphericalAberration", "rlnVoltage"):
        expected = table.loc[df["rlnOpticsGroup"].to_numpy(), col].to_numpy()
        np.testing.assert_array_equal(df[col].to_numpy(), expected)
    if len(pixel) == 1:
        ps = load_particles(path, metadata_only=True)
        assert ps.pixel_size_angstrom == pytest.approx(pixel.pop())
        assert set(ps.ctf.voltage_kv.tolist()) == kv
    else:
        with pytest.raises(InputError, match=r"conflicting pixel sizes \(Å\) \(1\.24, 1\.25\)"):
            load_particles(path, metadata_only=True)
        # one optics group at a time is fine
        sub = particles[particles["rlnOpticsGroup"] == 4]
        assert set(merge_optics(sub, optics)["rlnSphericalAberration"]) == {2.6}


def test_relion31_v2_reads_like_relion31_5(shared_data):
    """relion31.v2.star (optics after particles) describes the same particles as relion31.star."""
    a = load_particles(shared_data / "formats/relion31/relion31.v2.star", metadata_only=True)
    b = load_particles(shared_data / "particles/relion31_5/relion31.star")
    torch.testing.assert_close(a.rotations, b.rotations)
    torch.testing.assert_close(a.shifts_px, b.shifts_px)
    _assert_ctf_equal(a.ctf, b.ctf)


def test_maps_axis_order_and_voxel_size(shared_data):
    with pytest.warns(UserWarning, match="not cubic"):
        vol, vox = read_map(shared_data / "maps/EMD-3001.map")
    # stored 73 columns (z), 43 rows (x), 25 sections (y): mapc/mapr/maps = 3,1,2
    assert vol.shape == (73, 25, 43) and vol.dtype == np.float32
    assert vox == pytest.approx(17.93 / 40, rel=1e-5)
    import mrcfile

    with mrcfile.open(shared_data / "maps/EMD-3001.map", permissive=True) as m:
        raw = np.asarray(m.data)  # (sections=y, rows=x, columns=z)
    np.testing.assert_array_equal(vol, np.transpose(raw, (2, 0, 1)))
    vol2, vox2 = read_map(shared_data / "maps/EMD-3197.map")
    assert vol2.shape == (20, 20, 20)
    assert vox2 == pytest.approx(11.4)


# ---------------------------------------------------------------------- metadata round trip
_POSE_COLUMNS = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                 "rlnOriginYAngst", "rlnOriginX", "rlnOriginY"}


def _new_poses(n, seed=11):
    from cryospin.rotations import random_rotations

    g = torch.Generator().manual_seed(seed)
    return (random_rotations(n, generator=g),
            (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 8)


@pytest.mark.parametrize(
    ("rel", "kwargs"),
    [
        ("formats/relion30/FinalRefinement-OriginalParticles-PfCRT.star",
         {"metadata_only": True, "box_px": 300, "defaults": {"rlnAmplitudeContrast": 0.1}}),
        ("formats/relion30/sample_particles_relion30.star",
         {"metadata_only": True, "box_px": 200}),
        ("particles/aspire_sample17/sample_relion_data.star", {}),
        ("particles/aspire_sample17/sample_particles_relion31.star", {}),
        ("particles/empiar10076_7/empiar_10076_7.star", {}),
        ("particles/relion31_5/relion31.star", {}),
        ("formats/relion31/relion31.v2.star", {"metadata_only": True}),
        ("formats/relion5/relion5.star", {"metadata_only": True}),
    ],
)
def test_star_round_trip_keeps_every_column(shared_data, tmp_path, rel, kwargs):
    """read -> new poses -> poses.star -> read: every input column back as the input's text
    (3.0 pixel origins become Å ones), the optics table as it was, the new poses."""
    from cryospin.io import write_particles_star

    path = shared_data / rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relion31.mrcs lacks the MAP id (tested above)
        ps = load_particles(path, check_finite=False, **kwargs)
    R, t = _new_poses(len(ps))
    out = tmp_path / "run" / "poses.star"
    out.parent.mkdir()
    write_particles_star(out, ps.with_poses(R, t))

    inp_p, inp_o = read_star_tables(path, as_text=True)
    out_p, out_o = read_star_tables(out, as_text=True)
    kept = [c for c in inp_p.columns if c not in _POSE_COLUMNS]
    assert [c for c in out_p.columns if c in kept] == kept
    for col in kept:
        assert out_p[col].tolist() == inp_p[col].tolist(), col
    assert out_p["rlnImageName"].tolist() == inp_p["rlnImageName"].tolist()
    if inp_o is not None:  # RELION 3.1/5: the input's optics table, columns added only if absent
        assert list(out_o.columns[: len(inp_o.columns)]) == list(inp_o.columns)
        assert set(out_o.columns[len(inp_o.columns):]) <= {"rlnImageSize",
                                                           "rlnImageDimensionality"}
        for col in inp_o.columns:
            assert out_o[col].tolist() == inp_o[col].tolist(), col
    back = load_particles(out, metadata_only=True)
    assert back.pixel_size_angstrom == pytest.approx(ps.pixel_size_angstrom, rel=1e-9)
    assert back.box_px == ps.box_px
    assert float(torch.linalg.matrix_norm(back.rotations - R).max()) < 1e-9
    torch.testing.assert_close(back.shifts_px, t, atol=1e-9, rtol=0)
    _assert_ctf_equal(back.ctf, ps.ctf, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("rel", "kwargs"),
    [
        ("formats/cryosparc/cryosparc_P12_J24_001_particles.cs", {"metadata_only": True}),
        ("formats/cryosparc/cryosparc_J2_particles_exported.cs", {"metadata_only": True}),
        ("particles/empiar10076_7/empiar_10076_7.cs", {}),
    ],
)
def test_cs_round_trip_star_and_cs(shared_data, tmp_path, rel, kwargs):
    """A .cs gives a star RELION can read (idx@path, CTF, optics) and a .cs with the new poses
    that reads back to float32 precision, every other field unchanged."""
    from cryospin.io import read_cryosparc, write_cryosparc, write_particles_star

    path = shared_data / rel
    ps = load_particles(path, check_finite=False, **kwargs)
    table = np.load(path)
    R, t = _new_poses(len(ps))
    new = ps.with_poses(R, t)
    write_particles_star(tmp_path / "poses.star", new)
    star_p, star_o = read_star_tables(tmp_path / "poses.star")
    paths = [p.decode().lstrip(">") for p in table["blob/path"].tolist()]
    assert star_p["rlnImageName"].tolist() == [
        f"{i + 1:06d}@{p}" for i, p in zip(table["blob/idx"].tolist(), paths, strict=True)]
    assert {"rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
            "rlnImagePixelSize", "rlnImageSize"} <= set(star_o.columns)
    back = load_particles(tmp_path / "poses.star", metadata_only=True)
    assert back.pixel_size_angstrom == pytest.approx(ps.pixel_size_angstrom, rel=1e-6)
    _assert_ctf_equal(back.ctf, ps.ctf, rtol=1e-6, atol=1e-9)
    assert float(torch.linalg.matrix_norm(back.rotations - R).max()) < 1e-9

    write_cryosparc(tmp_path / "poses.cs", new)
    cs_back = read_cryosparc(tmp_path / "poses.cs", metadata_only=True)
    assert float(torch.linalg.matrix_norm(cs_back.rotations - R).max()) < 2e-6
    torch.testing.assert_close(cs_back.shifts_px, t, atol=1e-6, rtol=0)
    out = np.load(tmp_path / "poses.cs")
    for name in table.dtype.names:
        if name not in ("alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A",
                        "alignments3D/split"):
            np.testing.assert_array_equal(out[name], table[name], err_msg=name)
