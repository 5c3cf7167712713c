"""``cryospin flip-hand``: the mirror ``V(D r)`` with poses ``D R D`` gives the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.cli.main import main as cli_main
from cryospin.evaluate.align import mirror_map
from cryospin.evaluate.pose_error import HAND_FLIP, flip_hand
from cryospin.forward.ctf import CTFParams
from cryospin.forward.hartley import hartley3
from cryospin.forward.lattice import disc_frequencies, disc_indices
from cryospin.forward.model import render
from cryospin.io.mrc import read_map, write_map
from cryospin.io.particles import ParticleSet, load_particles, write_particles_star
from cryospin.rotations import random_rotations


def _asymmetric_volume(L: int, seed: int) -> torch.Tensor:
    """A smooth chiral density `(L, L, L)` float64: Gaussian blobs at random off-centre spots."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(L, dtype=torch.float64) - L // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    vol = torch.zeros(L, L, L, dtype=torch.float64)
    for _ in range(5):
        cx, cy, cz = ((torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * L * 0.5).tolist()
        w = 1.0 + float(torch.rand(1, generator=g, dtype=torch.float64)) * L / 10
        vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * w * w))
    return vol


@pytest.mark.parametrize("L", [12, 13])
def test_flipped_map_and_poses_give_the_same_images(L: int) -> None:
    vol = _asymmetric_volume(L, seed=L)
    R = random_rotations(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shifts = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    freqs = disc_frequencies(L, dtype=torch.float64)  # (P, 2), the loss disc
    original = render(hartley3(vol), R, shifts, frequencies=freqs)  # (6, P)
    flipped = render(hartley3(mirror_map(vol)), flip_hand(R), shifts, frequencies=freqs)
    torch.testing.assert_close(flipped, original, rtol=1e-10, atol=1e-10 * original.abs().max())
    # the mirror is a different map (the volume is chiral), and the unflipped poses do not fit it
    wrong = render(hartley3(mirror_map(vol)), R, shifts, frequencies=freqs)
    assert (wrong - original).abs().max() > 1e-3 * original.abs().max()
    # full-grid images agree inside the disc too
    full_o = render(hartley3(vol), R).reshape(6, -1)[:, disc_indices(L)]
    full_f = render(hartley3(mirror_map(vol)), flip_hand(R)).reshape(6, -1)[:, disc_indices(L)]
    torch.testing.assert_close(full_f, full_o, rtol=1e-10, atol=1e-10 * full_o.abs().max())


def test_flip_hand_matrix_is_diag_1_1_minus_1() -> None:
    torch.testing.assert_close(HAND_FLIP, torch.diag(torch.tensor([1.0, 1.0, -1.0],
                                                                  dtype=torch.float64)))


@pytest.mark.parametrize("L", [10, 11])
def test_cli_flip_twice_is_identity_and_keeps_voxel_size(tmp_path: Path, L: int) -> None:
    vol = _asymmetric_volume(L, seed=3).float().numpy()
    write_map(tmp_path / "map.mrc", vol, 2.5)
    assert cli_main(["flip-hand", str(tmp_path / "map.mrc"), "-o", str(tmp_path / "f.mrc")]) == 0
    assert cli_main(["flip-hand", str(tmp_path / "f.mrc"), "-o", str(tmp_path / "ff.mrc")]) == 0
    once, apix_once = read_map(tmp_path / "f.mrc")
    twice, apix_twice = read_map(tmp_path / "ff.mrc")
    assert apix_once == pytest.approx(2.5) and apix_twice == pytest.approx(2.5)
    np.testing.assert_array_equal(twice, vol)
    # once: z reversed about the centre voxel L//2, x and y untouched
    c = L // 2
    for dz in range(-(L // 2) + (1 - L % 2), L - L // 2):  # planes whose mirror is in the box
        np.testing.assert_array_equal(once[c + dz], vol[c - dz])
    assert not np.array_equal(once, vol)


def _particles(tmp_path: Path, n: int, *, with_ctf: bool) -> ParticleSet:
    rng = np.random.default_rng(0)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.float64))

    ctf = None
    if with_ctf:
        ctf = CTFParams(
            defocus_u_angstrom=t(rng.uniform(8000, 30000, n)),
            defocus_v_angstrom=t(rng.uniform(8000, 30000, n)),
            defocus_angle_deg=t(rng.uniform(-180, 180, n)),
            voltage_kv=t(np.full(n, 300.0)),
            cs_mm=t(np.full(n, 2.7)),
            amplitude_contrast=t(np.full(n, 0.1)),
            phase_shift_deg=t(np.zeros(n)),
            bfactor_a2=t(np.zeros(n)),
        )
    return ParticleSet(
        source=tmp_path / "in.star",
        stack_paths=(tmp_path / "stack.mrcs",),  # never opened (metadata only)
        stack_index=np.zeros(n, np.int64),
        image_index=np.arange(n, dtype=np.int64),
        box_px=16,
        pixel_size_angstrom=2.0,
        ctf=ctf,
        rotations=random_rotations(n, generator=torch.Generator().manual_seed(5)),
        shifts_px=t(rng.normal(0, 1.5, (n, 2))),
        optics_group=np.ones(n, np.int64),
    )


@pytest.mark.parametrize("with_ctf", [True, False])
def test_cli_flips_poses(tmp_path: Path, with_ctf: bool) -> None:
    ps = _particles(tmp_path, 9, with_ctf=with_ctf)
    write_particles_star(tmp_path / "in.star", ps)
    write_map(tmp_path / "map.mrc", _asymmetric_volume(16, seed=4).float().numpy(), 2.0)
    status = cli_main(["flip-hand", str(tmp_path / "map.mrc"), "-o", str(tmp_path / "f.mrc"),
                       "--poses", str(tmp_path / "in.star"),
                       "--out-poses", str(tmp_path / "out.star")])
    assert status == 0
    out = load_particles(tmp_path / "out.star", metadata_only=True, check_finite=False,
                         no_ctf=not with_ctf)
    assert out.rotations is not None and out.shifts_px is not None
    torch.testing.assert_close(out.rotations, flip_hand(ps.rotations), rtol=0, atol=1e-9)
    torch.testing.assert_close(out.shifts_px, ps.shifts_px, rtol=0, atol=1e-9)
    assert out.names is not None and out.names[0].endswith("stack.mrcs")
    if with_ctf:
        assert out.ctf is not None
        torch.testing.assert_close(out.ctf.defocus_u_angstrom, ps.ctf.defocus_u_angstrom)
    # flipping the poses twice gives them back
    assert cli_main(["flip-hand", str(tmp_path / "f.mrc"), "-o", str(tmp_path / "ff.mrc"),
                     "--poses", str(tmp_path / "out.star"),
                     "--out-poses", str(tmp_path / "back.star")]) == 0
    back = load_particles(tmp_path / "back.star", metadata_only=True, check_finite=False,
                          no_ctf=True)
    torch.testing.assert_close(back.rotations, ps.rotations, rtol=0, atol=1e-9)


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_map(tmp_path / "map.mrc", np.zeros((8, 8, 8), np.float32), 1.0)
    assert cli_main(["flip-hand", str(tmp_path / "map.mrc"), "-o", str(tmp_path / "f.mrc"),
                     "--poses", str(tmp_path / "in.star")]) == 2
    assert "--out-poses" in capsys.readouterr().err
    assert cli_main(["flip-hand", str(tmp_path / "missing.mrc"), "-o",
                     str(tmp_path / "f.mrc")]) == 2
    assert "missing.mrc" in capsys.readouterr().err
    assert not (tmp_path / "f.mrc").exists()
