"""ParticleSet and load_particles: dispatch, lazy images, subsets, checks, writers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io import mrc as mrc_module
from cryospin.io.mrc import write_stack
from cryospin.io.particles import (
    ParticleSet,
    load_indices,
    load_particles,
    write_cryodrgn_ctf,
    write_cryodrgn_poses,
    write_particles_star,
)
from cryospin.io.pkl import write_cryodrgn_ctf as write_ctf_arrays
from cryospin.rotations import random_rotations

L = 12


def _ctf(n: int) -> CTFParams:
    z = torch.zeros(n, dtype=torch.float64)
    return CTFParams(z + 1.5e4, z + 1.4e4, z + 30, z + 300, z + 2.7, z + 0.1, z, z)


@pytest.fixture
def two_stacks(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, L, L)).astype(np.float32)
    b = rng.standard_normal((3, L, L)).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", a, 1.5)
    write_stack(tmp_path / "b.mrcs", b, 1.5)
    (tmp_path / "stacks.txt").write_text("a.mrcs\n\nb.mrcs\n")
    write_ctf_arrays(tmp_path / "ctf.pkl", _ctf(8), L, 1.5)
    return tmp_path, np.concatenate([a, b])


def test_txt_list_with_ctf_pkl(two_stacks):
    d, all_imgs = two_stacks
    ps = load_particles(d / "stacks.txt", ctf_pkl=d / "ctf.pkl")
    assert len(ps) == 8 and ps.box_px == L and ps.pixel_size_angstrom == 1.5
    assert ps.ctf.defocus_u_angstrom.dtype == torch.float64
    idx = [7, 0, 5, 4, 5, 1]
    out = ps.images(idx)
    assert out.dtype == torch.float32 and out.shape == (6, L, L)
    np.testing.assert_array_equal(out.numpy(), all_imgs[idx])
    np.testing.assert_array_equal(ps.images(torch.tensor([2])).numpy(), all_imgs[[2]])


def test_plain_stack_needs_ctf_or_no_ctf(two_stacks):
    d, _ = two_stacks
    with pytest.raises(InputError, match=r"a\.mrcs: a plain image stack has no CTF"):
        load_particles(d / "a.mrcs")
    ps = load_particles(d / "a.mrcs", no_ctf=True)
    assert ps.ctf is None and len(ps) == 5


def test_ctf_pkl_length_mismatch(two_stacks):
    d, _ = two_stacks
    with pytest.raises(InputError, match="CTF pickle has 8 rows but .* has 5 particles"):
        load_particles(d / "a.mrcs", ctf_pkl=d / "ctf.pkl")


@pytest.mark.parametrize("kind", ["array", "npy", "txt", "pkl"])
def test_ind_selection(two_stacks, kind):
    d, all_imgs = two_stacks
    sel = np.array([6, 2, 3])
    if kind == "array":
        ind = sel
    elif kind == "npy":
        np.save(d / "ind.npy", sel)
        ind = d / "ind.npy"
    elif kind == "txt":
        np.savetxt(d / "ind.txt", sel, fmt="%d")
        ind = d / "ind.txt"
    else:
        with open(d / "ind.pkl", "wb") as fh:
            pickle.dump(sel, fh)
        ind = d / "ind.pkl"
    ps = load_particles(d / "stacks.txt", ctf_pkl=d / "ctf.pkl", ind=ind)
    assert len(ps) == 3
    np.testing.assert_array_equal(ps.images().numpy(), all_imgs[sel])


def test_bad_indices(two_stacks, tmp_path):
    d, _ = two_stacks
    with pytest.raises(InputError, match="particle index 8 out of range for 8 particles"):
        load_particles(d / "stacks.txt", ctf_pkl=d / "ctf.pkl", ind=np.array([0, 8]))
    (tmp_path / "f.txt").write_text("1.5\n")
    with pytest.raises(InputError, match="f.txt"):
        load_indices(tmp_path / "f.txt")


def test_poses_pkl(two_stacks):
    d, _ = two_stacks
    R = random_rotations(8, generator=torch.Generator().manual_seed(0))
    t = torch.arange(16, dtype=torch.float64).reshape(8, 2) - 5
    write_cryodrgn_poses(d / "pose.pkl", R, t, L)
    ps = load_particles(d / "stacks.txt", ctf_pkl=d / "ctf.pkl", poses_pkl=d / "pose.pkl",
                        ind=[3, 1])
    torch.testing.assert_close(ps.rotations, R[[3, 1]], rtol=0, atol=0)
    torch.testing.assert_close(ps.shifts_px, t[[3, 1]], rtol=0, atol=1e-13)


def test_subset_and_with_poses(two_stacks):
    d, all_imgs = two_stacks
    ps = load_particles(d / "stacks.txt", ctf_pkl=d / "ctf.pkl")
    R = random_rotations(8, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    ps2 = ps.with_poses(R, torch.zeros(8, 2))
    assert ps2.rotations.dtype == torch.float64 and ps.rotations is None  # no mutation
    sub = ps2.subset(np.array([5, 0]))
    np.testing.assert_array_equal(sub.images().numpy(), all_imgs[[5, 0]])
    torch.testing.assert_close(sub.rotations, R[[5, 0]].double())
    mask = np.zeros(8, bool)
    mask[[1, 7]] = True
    assert len(ps.subset(mask)) == 2
    assert len(ps.subset(slice(2, 6))) == 4
    with pytest.raises(ValueError, match="rotations shape"):
        ps.with_poses(torch.zeros(7, 3, 3), None)


def test_check_finite_names_count_and_images(tmp_path):
    imgs = np.zeros((10, L, L), np.float32)
    imgs[3, 0, :4] = np.nan
    imgs[8, 5, 5] = np.inf
    write_stack(tmp_path / "bad.mrcs", imgs, 1.0)
    with pytest.raises(InputError, match=r"bad\.mrcs: 5 NaN/Inf pixels in 2 of 10 images "
                                         r"\(particles 3, 8;") as info:
        load_particles(tmp_path / "bad.mrcs", no_ctf=True)
    assert "\n" not in str(info.value)
    # opting out loads; a selection without the bad images passes
    ps = load_particles(tmp_path / "bad.mrcs", no_ctf=True, check_finite=False)
    ps.subset([0, 1, 2]).check_finite(batch_size=2)


def test_check_finite_streams_in_chunks(tmp_path, monkeypatch):
    write_stack(tmp_path / "s.mrcs", np.zeros((10, L, L)), 1.0)
    ps = load_particles(tmp_path / "s.mrcs", no_ctf=True, check_finite=False)
    sizes = []
    original = mrc_module.ImageStack.read

    def spy(self, indices=None):
        out = original(self, indices)
        sizes.append(out.shape[0])
        return out

    monkeypatch.setattr(mrc_module.ImageStack, "read", spy)
    ps.check_finite(batch_size=4)
    assert sizes == [4, 4, 2]


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="unknown particle file type '.csv'"):
        load_particles(tmp_path / "x.csv")
    with pytest.raises(InputError, match="nope.star: file not found"):
        load_particles(tmp_path / "nope.star")
    (tmp_path / "l.txt").write_text("missing.mrcs\n")
    with pytest.raises(InputError, match="missing.mrcs: file not found"):
        load_particles(tmp_path / "l.txt", no_ctf=True)


def test_txt_conflicting_boxes(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((2, L, L)), 1.0)
    write_stack(tmp_path / "b.mrcs", np.zeros((2, L + 2, L + 2)), 1.0)
    (tmp_path / "l.txt").write_text("a.mrcs\nb.mrcs\n")
    with pytest.raises(InputError, match=r"l\.txt: stacks have different boxes \[12, 14\]"):
        load_particles(tmp_path / "l.txt", no_ctf=True)
    write_stack(tmp_path / "b.mrcs", np.zeros((2, L, L)), 2.0)
    with pytest.raises(InputError, match="conflicting pixel sizes"):
        load_particles(tmp_path / "l.txt", no_ctf=True)


def test_writers_round_trip(two_stacks):
    d, _ = two_stacks
    ps = load_particles(d / "stacks.txt", ctf_pkl=d / "ctf.pkl")
    R = random_rotations(8, generator=torch.Generator().manual_seed(2))
    ps = ps.with_poses(R, torch.randn(8, 2, generator=torch.Generator().manual_seed(3),
                                      dtype=torch.float64))
    write_particles_star(d / "out.star", ps)
    back = load_particles(d / "out.star")
    torch.testing.assert_close(back.rotations, ps.rotations, atol=1e-10, rtol=0)
    torch.testing.assert_close(back.shifts_px, ps.shifts_px, atol=1e-10, rtol=0)
    write_cryodrgn_ctf(d / "ctf2.pkl", back)
    again = load_particles(d / "stacks.txt", ctf_pkl=d / "ctf2.pkl")
    torch.testing.assert_close(again.ctf.defocus_u_angstrom, ps.ctf.defocus_u_angstrom)


def test_particle_set_validates_shapes(tmp_path):
    with pytest.raises(ValueError, match="image_index"):
        ParticleSet(source=tmp_path, stack_paths=(tmp_path,), stack_index=np.zeros(3, np.int64),
                    image_index=np.zeros(2, np.int64), box_px=L, pixel_size_angstrom=1.0,
                    ctf=None, rotations=None, shifts_px=None,
                    optics_group=np.ones(3, np.int64))
