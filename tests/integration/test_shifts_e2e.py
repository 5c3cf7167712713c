"""Translations end to end on a small simulated off-centre dataset (``cryospin.simulate``).

* Stage-2 shift refinement (``refine_poses`` on a ``PoseTable``) against the known volume,
  started from the true rotations and zero shifts, recovers the true shifts (median error
  < 0.5 px), at the native box and after an on-the-fly Fourier crop (``DataConfig.box_px``:
  shifts found in cropped pixels are the true ones times ``box_px / L``).
* ``poses.star`` stores them with the documented sign: ``image(r) = P(r − t)``,
  ``shift_px = −origin_px`` (docs/conventions.md, "Shifts" and "RELION and cryoSPARC").
* A full ``fit`` with ``box_px`` writes poses.star/poses.pkl shifts in the ORIGINAL pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from cryospin.forward.resample import fourier_crop_3d
from cryospin.io.mrc import write_map
from cryospin.io.particles import load_particles, write_particles_star
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.pose import PoseTable
from cryospin.train.autodecode import refine_poses
from cryospin.train.config import Config, DataConfig, build_config
from cryospin.train.data import prepare_data
from cryospin.volume import HartleyVolume

L, APIX, N, SHIFT_STD = 32, 5.0, 48, 1.5


def _blob_map(L: int) -> torch.Tensor:
    c = torch.arange(L, dtype=torch.float64) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(L, L, L, dtype=torch.float64)
    for (mx, my, mz), s in [((3, 0, 0), 2.0), ((-3, 2, 1), 1.6), ((0, -4, 2), 1.4),
                            ((1, 3, -3), 1.8), ((-1, -1, -4), 1.2)]:
        vol += torch.exp(-((x - mx) ** 2 + (y - my) ** 2 + (z - mz) ** 2) / (2 * s * s))
    return vol


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from cryospin.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("shifts")
    write_map(root / "blob.mrc", _blob_map(L).numpy(), APIX)
    return simulate_dataset(root / "blob.mrc", root / "data", n_particles=N, box_px=L,
                            pixel_size_angstrom=APIX, snr=float("inf"),
                            shift_std_px=SHIFT_STD, seed=7)


def _refine_shifts(sim, box_px: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined (rotations, shifts in training pixels) from true rotations and zero shifts."""
    torch.manual_seed(0)
    parts = sim.particles
    data = prepare_data(parts, DataConfig(box_px=box_px))
    Lt = data.box_px
    gt = sim.volume.to(torch.float64)
    # the crop keeps values, so a z-sum over Lt voxels needs the factor L/Lt
    vol_t = fourier_crop_3d(gt, Lt) * (L / Lt) * data.image_scale
    volume_ht = HartleyVolume.from_real_space(vol_t.float())().detach()  # (Lt, Lt, Lt)
    table = PoseTable(parts.rotations.float(), torch.zeros(N, 2), lr_rot=0.005, lr_shift=0.1,
                      max_shift_px=8.0)
    idx = torch.arange(N)
    for _ in range(3):
        refine_poses(table, volume_ht, data.batch(idx), data, steps=40, refine_shifts=True)
    rot, shifts = table.gather(idx)
    return rot.detach(), shifts.detach()


def _median_error_px(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate.double() - truth.double()).norm(dim=-1).median())


def test_shift_refinement_recovers_true_shifts(sim, tmp_path: Path) -> None:
    truth = sim.particles.shifts_px  # (N, 2) px, image(r) = P(r − t)
    assert float(truth.norm(dim=-1).median()) > 1.0  # genuinely off-centre
    rot, shifts = _refine_shifts(sim, None)
    err = _median_error_px(shifts, truth)
    assert err < 0.5, f"median shift error {err:.3f} px"

    # poses.star with the documented sign: rlnOriginXAngst = −tx · pixel size
    star = tmp_path / "poses.star"
    write_particles_star(star, sim.particles.with_poses(rot, shifts))
    table = starfile.read(star)["particles"]
    origin_px = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / APIX
    np.testing.assert_allclose(origin_px, -shifts.double().numpy(), atol=1e-4)
    np.testing.assert_allclose(np.median(np.linalg.norm(origin_px + truth.numpy(), axis=1)),
                               err, atol=1e-4)
    back = load_particles(star, metadata_only=True)
    np.testing.assert_allclose(back.shifts_px.numpy(), shifts.double().numpy(), atol=1e-4)


def test_shift_refinement_after_fourier_crop_is_in_cropped_pixels(sim) -> None:
    box = 16
    _, shifts = _refine_shifts(sim, box)
    err = _median_error_px(shifts * (L / box), sim.particles.shifts_px)  # original pixels
    assert err < 0.5, f"median shift error {err:.3f} original px"


def test_fit_with_box_writes_shifts_in_original_pixels(sim, tmp_path: Path) -> None:
    from cryospin.io.mrc import read_map
    from cryospin.train.fit import fit

    box = 16
    config: Config = build_config("default", {
        "model": {"num_heads": 2, "width_multiplier": 0.125, "predict_shifts": True,
                  "precision": "fp32"},
        "schedule": {"epochs": 2, "switch_epoch": 1},
        "optim": {"batch_size": 16, "shift_lr": 0.5},
        "data": {"box_px": box},
        "run": {"num_threads": 1, "progress": False, "keep_epoch_maps": False,
                "final_map": "decoder"},
    })
    result = fit(config, sim.particles, tmp_path / "run")
    assert result.finished and result.shifts_px is not None
    trained = result.shifts_px.double()  # (N, 2) in cropped (training) pixels
    assert float(trained.abs().max()) > 0.05  # the shifts did move
    original = trained * (L / box)
    star = load_particles(result.star_path, metadata_only=True)
    assert star.box_px == L
    np.testing.assert_allclose(star.shifts_px.numpy(), original.numpy(), atol=1e-4)
    table = starfile.read(result.star_path)["particles"]
    origin_px = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / APIX
    np.testing.assert_allclose(origin_px, -original.numpy(), atol=1e-4)
    _, pkl_shifts = read_cryodrgn_poses(result.pkl_path, L)
    np.testing.assert_allclose(pkl_shifts.numpy(), original.numpy(), atol=1e-4)
    vol, apix = read_map(result.map_path)
    assert vol.shape == (box, box, box) and apix == pytest.approx(APIX * L / box, rel=1e-6)
    assert math.isfinite(float(np.abs(vol).max()))
