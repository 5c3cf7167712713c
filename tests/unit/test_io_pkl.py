"""cryoDRGN ctf.pkl / pose.pkl: round trips, sign conventions, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io.particles import load_indices
from cryospin.io.pkl import (
    cryodrgn_trans_from_shift_px,
    read_cryodrgn_ctf,
    read_cryodrgn_poses,
    shift_px_from_cryodrgn_trans,
    write_cryodrgn_ctf,
    write_cryodrgn_poses,
    write_indices_pkl,
)
from cryospin.rotations import random_rotations


def _ctf(n: int = 6) -> CTFParams:
    rng = np.random.default_rng(0)

    def t(x):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))

    return CTFParams(
        defocus_u_angstrom=t(rng.uniform(1e4, 2e4, n)),
        defocus_v_angstrom=t(rng.uniform(1e4, 2e4, n)),
        defocus_angle_deg=t(rng.uniform(-90, 90, n)),
        voltage_kv=t(np.full(n, 300.0)),
        cs_mm=t(np.full(n, 2.7)),
        amplitude_contrast=t(np.full(n, 0.1)),
        phase_shift_deg=t(rng.uniform(0, 90, n)),
        bfactor_a2=t(np.zeros(n)),
    )


def test_ctf_round_trip(tmp_path):
    ctf = _ctf()
    write_cryodrgn_ctf(tmp_path / "ctf.pkl", ctf, 128, 1.5)
    with open(tmp_path / "ctf.pkl", "rb") as fh:
        raw = pickle.load(fh)
    assert raw.shape == (6, 9) and raw.dtype == np.float32  # cryoDRGN's layout
    np.testing.assert_array_equal(raw[:, 0], 128)
    np.testing.assert_allclose(raw[:, 2], ctf.defocus_u_angstrom.numpy(), rtol=1e-7)
    back, box, apix = read_cryodrgn_ctf(tmp_path / "ctf.pkl")
    assert box == 128 and apix == pytest.approx(1.5)
    for f in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv",
              "cs_mm", "amplitude_contrast", "phase_shift_deg"):
        # the format stores float32: equal to float32 rounding
        torch.testing.assert_close(getattr(back, f), getattr(ctf, f), rtol=1e-7, atol=1e-5)
        assert getattr(back, f).dtype == torch.float64


def test_pose_round_trip_and_sign(tmp_path):
    R = random_rotations(5, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0, 0], [3, 3], [-7, 1]], dtype=torch.float64)
    write_cryodrgn_poses(tmp_path / "pose.pkl", R, shift, 64)
    with open(tmp_path / "pose.pkl", "rb") as fh:
        rot, trans = pickle.load(fh)
    np.testing.assert_array_equal(rot, R.numpy())
    # cryoDRGN trans is a fraction of the box with the sign of RELION's origin (= -shift_px)
    np.testing.assert_allclose(trans, -shift.numpy() / 64, rtol=0, atol=1e-15)
    R2, s2 = read_cryodrgn_poses(tmp_path / "pose.pkl", 64)
    torch.testing.assert_close(R2, R, rtol=0, atol=0)
    torch.testing.assert_close(s2, shift, rtol=0, atol=1e-13)


def test_index_pickle_is_an_int64_array_that_ind_reads_back(tmp_path):
    write_indices_pkl(tmp_path / "ind.pkl", np.array([0, 3, 7], dtype=np.int32))
    with open(tmp_path / "ind.pkl", "rb") as fh:
        raw = pickle.load(fh)
    assert raw.dtype == np.int64 and raw.tolist() == [0, 3, 7]  # what cryoDRGN's --ind loads
    np.testing.assert_array_equal(load_indices(tmp_path / "ind.pkl", n=8), [0, 3, 7])
    with pytest.raises(ValueError, match="1D integer"):
        write_indices_pkl(tmp_path / "bad.pkl", np.array([0.5]))


def test_trans_helpers_are_inverse():
    s = torch.tensor([[1.25, -3.0]], dtype=torch.float64)
    t = cryodrgn_trans_from_shift_px(s, 100)
    np.testing.assert_allclose(t, [[-0.0125, 0.03]])
    torch.testing.assert_close(shift_px_from_cryodrgn_trans(t, 100), s)


def test_pose_pickle_rotation_only(tmp_path):
    R = random_rotations(3, generator=torch.Generator().manual_seed(1)).numpy()
    with open(tmp_path / "p.pkl", "wb") as fh:
        pickle.dump(R, fh)
    R2, s2 = read_cryodrgn_poses(tmp_path / "p.pkl", 32)
    np.testing.assert_array_equal(R2.numpy(), R)
    assert s2.abs().max() == 0


def test_bad_pickles(tmp_path):
    with pytest.raises(InputError, match="nope.pkl: file not found"):
        read_cryodrgn_ctf(tmp_path / "nope.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="junk.pkl: cannot read pickle"):
        read_cryodrgn_poses(tmp_path / "junk.pkl", 32)
    with open(tmp_path / "shape.pkl", "wb") as fh:
        pickle.dump(np.zeros((3, 4)), fh)
    with pytest.raises(InputError, match=r"shape.pkl: not a cryoDRGN CTF array"):
        read_cryodrgn_ctf(tmp_path / "shape.pkl")
    arr = np.zeros((2, 9), np.float32)
    arr[:, 0] = 64
    arr[:, 1] = [1.0, 2.0]
    with open(tmp_path / "mixed.pkl", "wb") as fh:
        pickle.dump(arr, fh)
    with pytest.raises(InputError, match="mixed.pkl: conflicting pixel sizes"):
        read_cryodrgn_ctf(tmp_path / "mixed.pkl")
    with open(tmp_path / "notrot.pkl", "wb") as fh:
        pickle.dump((np.ones((2, 3, 3)), np.zeros((2, 2))), fh)
    with pytest.raises(InputError, match="notrot.pkl: pose pickle rotations are not rotation"):
        read_cryodrgn_poses(tmp_path / "notrot.pkl", 32)
