"""Simulator: density/projection consistency, Fourier slice relation, ground truth read-back,
determinism, SNR, map input (float64 where numerical)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.forward.hartley import fft2_centered
from cryospin.io.mrc import read_map, write_map
from cryospin.io.particles import load_particles
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.rotations import random_rotations
from cryospin.simulate import (
    atom_positions_px,
    atoms_to_volume,
    bundled_structures,
    project_atoms,
    project_map,
    read_atomic_model,
    resample_map,
    resolve_structure,
    simulate_dataset,
    upsample_map_for_projection,
)

F64 = torch.float64


def _atoms(n: int = 40, spread_px: float = 2.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, 3, generator=g, dtype=F64) * spread_px
    pos[:, 2] *= 0.6  # non-symmetric blob
    w = torch.rand(n, generator=g, dtype=F64) + 0.5
    return pos, w


def write_pdb(path: Path, n: int = 60, spread_angstrom: float = 8.0, seed: int = 0) -> Path:
    """A small synthetic PDB (C, N, O atoms) for hermetic tests."""
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * spread_angstrom * np.array([1.0, 0.8, 0.6]) + 20.0
    lines = []
    for i, (x, y, z) in enumerate(xyz):
        el = "CNO"[i % 3]
        lines.append(
            f"ATOM  {i + 1:5d}  {el:<3s} ALA A{i // 5 + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
            f"  1.00 20.00          {el:>2s}"
        )
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


# ------------------------------------------------------------------ density and projection
def test_volume_summed_along_z_equals_analytic_projection_at_identity() -> None:
    pos, w = _atoms()
    L, sigma = 24, 1.0
    vol = atoms_to_volume(pos, w, L, sigma)  # (L, L, L) [z, y, x]
    proj = project_atoms(pos, w, torch.eye(3, dtype=F64)[None], L, sigma)[0]
    torch.testing.assert_close(vol.sum(0), proj, rtol=0, atol=1e-7 * float(proj.abs().max()))
    torch.testing.assert_close(vol.sum(), w.sum(), rtol=1e-7, atol=0)


def test_projection_at_random_rotation_uses_R_times_r() -> None:
    pos, w = _atoms(seed=1)
    L, sigma = 32, 1.0  # the rotated atoms (|r| < 10 px) stay inside the box
    R = random_rotations(3, generator=torch.Generator().manual_seed(5))
    proj = project_atoms(pos, w, R, L, sigma)
    for i in range(3):
        # P(x, y) = ∫ V(Rᵀ(x, y, z)) dz is the z-sum of the volume of the atoms moved to R r
        rotated = atoms_to_volume(pos @ R[i].T, w, L, sigma)
        torch.testing.assert_close(rotated.sum(0), proj[i], rtol=0,
                                   atol=1e-7 * float(proj[i].abs().max()))


def test_projection_matches_real_space_rotation_of_gt_volume() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    pos, w = _atoms(seed=2)
    L, sigma = 24, 1.5
    vol = atoms_to_volume(pos, w, L, sigma).numpy()
    R = random_rotations(2, generator=torch.Generator().manual_seed(7))
    proj = project_atoms(pos, w, R, L, sigma).numpy()
    flip = np.eye(3)[::-1]  # xyz <-> zyx
    centre = np.full(3, L // 2, dtype=float)
    for i in range(2):
        M = flip @ R[i].numpy().T @ flip  # output zyx coordinate -> input zyx coordinate
        rotated = ndimage.affine_transform(vol, M, offset=centre - M @ centre, order=3,
                                           mode="constant")
        err = np.abs(rotated.sum(0) - proj[i]).max() / np.abs(proj[i]).max()
        assert err < 5e-3, err


def test_fourier_slice_relation_between_projection_and_volume() -> None:
    pos, w = _atoms(n=12, spread_px=2.0, seed=3)
    L, sigma = 24, 1.5
    vol = atoms_to_volume(pos, w, L, sigma)
    R = random_rotations(1, generator=torch.Generator().manual_seed(11))[0]
    F2 = fft2_centered(project_atoms(pos, w, R[None], L, sigma)[0])
    c = torch.arange(L, dtype=F64) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    coords = torch.stack([x, y, z], -1).reshape(-1, 3)  # (L³, 3)
    for kx, ky in [(0, 0), (1, 0), (0, 2), (-3, 1), (2, -2), (4, 3)]:
        q = R.T @ torch.tensor([kx, ky, 0.0], dtype=F64)  # slice point Rᵀ k
        phase = torch.exp(-2j * math.pi * (coords @ q) / L)
        F3 = (vol.reshape(-1) * phase).sum()  # DTFT of the volume at a non-grid frequency
        assert abs(complex(F2[ky + L // 2, kx + L // 2]) - complex(F3)) < 1e-6 * float(w.sum())


def test_map_projection_agrees_with_analytic_projection() -> None:
    pos, w = _atoms(seed=4)
    L, sigma = 24, 1.0
    vol = atoms_to_volume(pos, w, L, sigma)
    R = torch.cat([torch.eye(3, dtype=F64)[None],
                   random_rotations(2, generator=torch.Generator().manual_seed(3))])
    pm = project_map(upsample_map_for_projection(vol), R, L)
    pa = project_atoms(pos, w, R, L, sigma)
    torch.testing.assert_close(pm[0], pa[0], rtol=0, atol=1e-7 * float(pa[0].abs().max()))
    for i in (1, 2):
        assert float((pm[i] - pa[i]).abs().max() / pa[i].abs().max()) < 0.02


def test_resample_map_matches_direct_sampling_at_coarser_pixels() -> None:
    pos, w = _atoms(seed=5, spread_px=3.0)
    fine = atoms_to_volume(pos, w, 32, 2.0)  # 2 Å voxels, σ = 4 Å
    coarse = atoms_to_volume(pos / 2, w, 16, 1.0)  # 4 Å voxels, same atoms
    resampled = resample_map(fine, 2.0, 16, 4.0)
    # values are per voxel, so the coarse map is 2³ times the Fourier-cropped fine map
    torch.testing.assert_close(8 * resampled, coarse, rtol=0, atol=2e-3 * float(coarse.max()))
    with pytest.raises(InputError):
        resample_map(fine, 2.0, 16, 4.5)


def test_bundled_structure_reads() -> None:
    assert "6vyb" in bundled_structures()
    model = read_atomic_model(resolve_structure("bundled:6vyb"))
    assert len(model) == 22364
    pos = atom_positions_px(model, 3.4)
    centre = (pos * model.weights[:, None]).sum(0) / model.weights.sum()
    torch.testing.assert_close(centre, torch.zeros(3, dtype=F64), rtol=0, atol=1e-9)
    with pytest.raises(InputError):
        resolve_structure("bundled:nope")


def test_missing_or_bad_structure_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        resolve_structure(tmp_path / "missing.pdb")
    bad = tmp_path / "bad.pdb"
    bad.write_text("this is not a structure\n")
    with pytest.raises(InputError):
        read_atomic_model(bad)


# ------------------------------------------------------------------ datasets
def _simulate(tmp: Path, name: str, **kw: object):
    pdb = write_pdb(tmp / "mol.pdb")
    args = dict(n_particles=40, box_px=32, pixel_size_angstrom=2.0, seed=3, shift_std_px=1.5,
                chunk_size=16)
    args.update(kw)
    return simulate_dataset(pdb, tmp / name, **args)  # type: ignore[arg-type]


def test_ground_truth_reads_back_exactly(tmp_path: Path) -> None:
    ds = _simulate(tmp_path, "a")
    ps = load_particles(ds.paths["particles_star"])
    assert len(ps) == 40 and ps.box_px == 32 and ps.pixel_size_angstrom == pytest.approx(2.0)
    torch.testing.assert_close(ps.rotations, ds.particles.rotations, rtol=0, atol=1e-9)
    torch.testing.assert_close(ps.shifts_px, ds.particles.shifts_px, rtol=0, atol=1e-9)
    for f in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv",
              "cs_mm", "amplitude_contrast"):
        torch.testing.assert_close(getattr(ps.ctf, f), getattr(ds.particles.ctf, f),
                                   rtol=1e-10, atol=1e-9)
    d = ds.particles.ctf
    assert bool(((d.defocus_u_angstrom + d.defocus_v_angstrom) / 2 >= 1e4).all())
    assert bool(((d.defocus_u_angstrom + d.defocus_v_angstrom) / 2 <= 2.5e4).all())
    assert bool(((d.defocus_u_angstrom - d.defocus_v_angstrom) <= 200 + 1e-9).all())
    rot, shift = read_cryodrgn_poses(ds.paths["gt_poses_pkl"], 32)
    torch.testing.assert_close(rot, ds.particles.rotations)
    torch.testing.assert_close(shift, ds.particles.shifts_px)
    vol, voxel = read_map(ds.paths["gt_map"])
    assert vol.shape == (32, 32, 32) and voxel == pytest.approx(2.0)
    np.testing.assert_allclose(vol, ds.volume.numpy())
    assert ps.images_numpy().shape == (40, 32, 32)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = _simulate(tmp_path, "a")
    b = _simulate(tmp_path, "b")
    c = _simulate(tmp_path, "c", seed=4)
    # MRC headers hold mrcfile's creation-time label: compare everything after the header
    for key in ("particles_mrcs", "gt_map"):
        assert a.paths[key].read_bytes()[1024:] == b.paths[key].read_bytes()[1024:], key
    assert a.paths["gt_poses_pkl"].read_bytes() == b.paths["gt_poses_pkl"].read_bytes()

    def body(p: Path) -> list[str]:  # the star's first line is starfile's timestamp comment
        return [ln for ln in p.read_text().splitlines() if not ln.startswith("#")]

    assert body(a.paths["particles_star"]) == body(b.paths["particles_star"])
    assert a.paths["particles_mrcs"].read_bytes() != c.paths["particles_mrcs"].read_bytes()


def test_measured_snr_matches_request(tmp_path: Path) -> None:
    ds = _simulate(tmp_path, "snr", snr=0.1, write_clean=True)
    noisy = load_particles(ds.paths["particles_star"]).images_numpy().astype(np.float64)
    from cryospin.io.mrc import open_stack

    clean = open_stack(ds.paths["clean_mrcs"]).read().astype(np.float64)
    noise = noisy - clean
    assert clean.var() == pytest.approx(ds.clean_variance, rel=1e-5)
    assert clean.var() / noise.var() == pytest.approx(0.1, rel=0.03)
    assert abs(noise.mean()) < 0.02 * noise.std()


def test_clean_images_do_not_depend_on_snr_and_ctf_is_applied(tmp_path: Path) -> None:
    a = _simulate(tmp_path, "a", snr=math.inf)
    b = _simulate(tmp_path, "b", snr=0.5, write_clean=True)
    from cryospin.io.mrc import open_stack

    np.testing.assert_array_equal(open_stack(a.paths["particles_mrcs"]).read(),
                                  open_stack(b.paths["clean_mrcs"]).read())
    assert a.noise_sigma == 0.0
    # without CTF and shifts, the clean image is the analytic projection itself
    d = _simulate(tmp_path, "d", snr=math.inf, apply_ctf=False, shift_std_px=0.0)
    assert load_particles(d.paths["particles_star"], no_ctf=True).ctf is None
    model = read_atomic_model(tmp_path / "mol.pdb")
    from cryospin.simulate import gaussian_sigma_angstrom

    sigma_px = gaussian_sigma_angstrom(4.0) / 2.0
    expect = project_atoms(atom_positions_px(model, 2.0), model.weights,
                           d.particles.rotations[:4], 32, sigma_px)
    got = open_stack(d.paths["particles_mrcs"]).read(np.arange(4)).astype(np.float64)
    np.testing.assert_allclose(got, expect.numpy(), rtol=0, atol=1e-4 * float(expect.max()))


def test_map_input_gives_consistent_images(tmp_path: Path) -> None:
    atoms = _simulate(tmp_path, "atoms", snr=math.inf, apply_ctf=False, shift_std_px=0.0,
                      n_particles=6)
    mrc = tmp_path / "gt_copy.mrc"
    write_map(mrc, atoms.volume, 2.0)
    fromMap = simulate_dataset(mrc, tmp_path / "map", n_particles=6, box_px=32,
                               pixel_size_angstrom=2.0, seed=3, shift_std_px=0.0,
                               snr=math.inf, apply_ctf=False)
    from cryospin.io.mrc import open_stack

    ia = open_stack(atoms.paths["particles_mrcs"]).read().astype(np.float64)
    im = open_stack(fromMap.paths["particles_mrcs"]).read().astype(np.float64)
    assert np.abs(ia - im).max() / np.abs(ia).max() < 0.03
