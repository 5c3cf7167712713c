"""The numerical core and whole runs on the device named by ``CRYOSPIN_TEST_DEVICE``.

Default ``cpu`` (CI has no GPU); ``benchmarks/gpu_check.sh`` runs this file with
``CRYOSPIN_TEST_DEVICE=cuda`` on a lent GPU. The kernels (slicing, insertion, the forward model,
the group average, backprojection, with C3 inserted or averaged) are compared with the float64
CPU reference; the encoder trains one step in the precision chosen for the device, with a
finite gradient reaching every parameter; a small reconstruction (encoder, switch, global
search, local refinement, final backprojection), its resume, a symmetric run, gold-standard
halves and the report run end to end on the device and write finite outputs. An explicit
device that is not available fails the module (a GPU check must not pass by skipping).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._synthetic import SyntheticDataset, ctf_params, make_dataset

from cryospin.backproject import backproject
from cryospin.cli.main import main
from cryospin.encoder import MultiHeadPoseEncoder
from cryospin.forward.ctf import compute_ctf
from cryospin.forward.hartley import hartley3
from cryospin.forward.model import render
from cryospin.forward.slicing import extract_central_slices, insert_central_slices
from cryospin.io.mrc import read_map
from cryospin.io.pkl import read_cryodrgn_poses, write_cryodrgn_poses
from cryospin.rotations import random_rotations
from cryospin.rundir import Checkpoint, HalvesFiles, read_metrics
from cryospin.symmetry import point_group_rotations
from cryospin.train.config import load_config
from cryospin.train.precision import autocast_dtype, resolve_precision
from cryospin.train.setup import resolve_device
from cryospin.volume import HartleyVolume

F64 = torch.float64
DEVICE = resolve_device(os.environ.get("CRYOSPIN_TEST_DEVICE", "cpu"))
L = 24


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference| (value moved to the CPU in float64)."""
    diff = (value.detach().to("cpu", F64) - reference.detach()).abs().max()
    return float(diff / reference.abs().max())


@pytest.fixture(scope="module")
def blobs() -> tuple[torch.Tensor, torch.Tensor]:
    """A Hartley volume `(L, L, L)` float64 of a blob density and 40 rotations (CPU)."""
    g = torch.Generator().manual_seed(3)
    k = torch.arange(L, dtype=F64) - L // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    vol = torch.zeros(L, L, L, dtype=F64)
    for cx, cy, cz in ((torch.rand(5, 3, generator=g, dtype=F64) - 0.5) * 10).tolist():
        vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 8.0)
    return hartley3(vol), random_rotations(40, generator=g)


def test_slices_match_the_float64_reference(blobs) -> None:
    vol, rot = blobs
    ref = extract_central_slices(vol, rot)  # (40, L, L)
    out = extract_central_slices(vol.float().to(DEVICE), rot.float().to(DEVICE))
    assert out.device.type == DEVICE.type
    assert _relative_error(out, ref) < 1e-5


def test_insertion_matches_the_reference_and_is_the_adjoint(blobs) -> None:
    vol, rot = blobs
    slices = torch.randn(40, L, L, dtype=F64, generator=torch.Generator().manual_seed(4))
    ref = insert_central_slices(slices, rot, L)
    out = insert_central_slices(slices.float().to(DEVICE), rot.float().to(DEVICE), L)
    assert _relative_error(out, ref) < 1e-5
    # <extract(V, R), S> = <V, insert(S, R)> on the device
    v32, r32, s32 = vol.float().to(DEVICE), rot.float().to(DEVICE), slices.float().to(DEVICE)
    lhs = float((extract_central_slices(v32, r32) * s32).sum())
    rhs = float((v32 * insert_central_slices(s32, r32, L)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-4)


def test_forward_model_matches_the_reference(blobs) -> None:
    vol, rot = blobs
    g = torch.Generator().manual_seed(5)
    shifts = (torch.rand(40, 2, generator=g, dtype=F64) - 0.5) * 6
    defocus_angstrom = torch.linspace(8000.0, 15000.0, 40, dtype=F64)
    ctf = compute_ctf(ctf_params(defocus_angstrom), L, pixel_size_angstrom=4.0)  # (40, L, L)
    ref = render(vol, rot, shifts, ctf)
    out = render(*(t.float().to(DEVICE) for t in (vol, rot, shifts, ctf)))
    assert _relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("group", ["C7", "D2", "O"])
def test_symmetric_volume_matches_the_reference(blobs, group: str) -> None:
    vol = blobs[0]
    ref = HartleyVolume.from_real_space(vol, symmetry=group)()  # float64 on the CPU
    dev = HartleyVolume.from_real_space(vol.float(), symmetry=group).to(DEVICE)
    out = dev()
    assert out.device.type == DEVICE.type
    assert _relative_error(out, ref) < 1e-4
    out.square().sum().backward()  # the group average is differentiable on the device
    assert torch.isfinite(dev.mantissa.grad).all() and dev.mantissa.grad.abs().sum() > 0


def test_backprojection_matches_the_reference(blobs) -> None:
    vol, rot = blobs
    images = torch.randn(40, L, L, dtype=F64, generator=torch.Generator().manual_seed(6))
    images += render(vol, rot)  # signal plus noise, Hartley space is irrelevant here
    ref = backproject(images, rot, box_px=L, pixel_size_angstrom=4.0)
    out = backproject(images.to(DEVICE), rot.to(DEVICE), box_px=L, pixel_size_angstrom=4.0)
    for name in ("volume", "half_a", "half_b"):
        value, reference = getattr(out, name), getattr(ref, name)
        assert _relative_error(torch.as_tensor(value), torch.as_tensor(reference)) < 1e-8, name


@pytest.mark.parametrize("symmetrize", ["insert", "resample"])
def test_symmetric_backprojection_matches_the_reference(blobs, symmetrize: str) -> None:
    """C3 (two of its elements resampled, none a grid permutation): each image inserted at its
    three poses, or once with the sums averaged over the group (the volume re-made after the
    search), as on the CPU in float64."""
    vol, rot = blobs
    images = torch.randn(40, L, L, dtype=F64, generator=torch.Generator().manual_seed(7))
    images += render(vol, rot)
    group = point_group_rotations("C3")
    ref = backproject(images, rot, box_px=L, pixel_size_angstrom=4.0, symmetry=group,
                      symmetrize=symmetrize)
    out = backproject(images.to(DEVICE), rot.to(DEVICE), box_px=L, pixel_size_angstrom=4.0,
                      symmetry=group.to(DEVICE), symmetrize=symmetrize)
    for name in ("volume", "half_a", "half_b"):
        value, reference = getattr(out, name), getattr(ref, name)
        assert _relative_error(torch.as_tensor(value), torch.as_tensor(reference)) < 1e-8, name


def test_encoder_step_reaches_every_parameter() -> None:
    choice = resolve_precision("auto", DEVICE)
    dtype = autocast_dtype(choice.name)  # bf16 on a GPU that has it
    torch.manual_seed(0)
    enc = MultiHeadPoseEncoder(32, 3, width_multiplier=0.125, predict_shifts=True,
                               max_shift_px=4.0, head="reference", input_channels="pyramid",
                               autocast_dtype=dtype).to(DEVICE)
    images = torch.randn(16, 32, 32, device=DEVICE)
    out = enc(images)
    assert out.rotations.shape == (16, 3, 3, 3) and out.rotations.device.type == DEVICE.type
    eye = torch.eye(3, device=DEVICE)
    rtr = out.rotations.float().transpose(-1, -2) @ out.rotations.float()
    assert (rtr - eye).abs().max() < 1e-3  # orthonormal in float32 whatever the autocast
    (out.rotations.float().sum() + out.shifts_px.float().square().sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------ whole runs on the device

COMMON = ["--device", DEVICE.type, "--heads", "2", "--width", "0.125", "--batch-size", "50",
          "--search-rotations", "1024", "--no-progress", "--progress-interval", "0",
          "--threads", "1", "--seed", "1"]


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> SyntheticDataset:
    return make_dataset(tmp_path_factory.mktemp("device") / "data", box_px=L, n=300, seed=2,
                        snr=2.0, pixel_size_angstrom=6.0)


def _inputs(data: SyntheticDataset) -> list[str]:
    return [str(data.folder / "particles.mrcs"), "--ctf", str(data.folder / "ctf.pkl")]


def _finite_map(path: Path) -> np.ndarray:
    volume = read_map(path)[0]
    assert volume.shape == (L, L, L) and np.isfinite(volume).all() and volume.std() > 0, path
    return volume


def test_reconstruct_resume_and_report(particles, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["reconstruct", *_inputs(particles), "-o", str(run), "--epochs", "3",
                 "--switch-epoch", "1", "--search-epochs", "1", *COMMON]) == 0
    assert main(["reconstruct", "--resume", str(run), "--epochs", "5"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert load_config(run / "config.yaml").run.device == DEVICE.type
    _finite_map(run / "map.mrc")
    assert Checkpoint.load(run / "checkpoint.pt").epoch == 5  # loads on the CPU
    rotations, _ = read_cryodrgn_poses(run / "poses.pkl", L)
    assert rotations.shape == (300, 3, 3) and torch.isfinite(rotations).all()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()


def test_symmetric_run(particles, tmp_path: Path) -> None:
    run = tmp_path / "sym"
    assert main(["reconstruct", *_inputs(particles), "-o", str(run), "--epochs", "3",
                 "--switch-epoch", "1", "--search-epochs", "1", "--symmetry", "C2",
                 *COMMON]) == 0
    assert Checkpoint.load(run / "checkpoint.pt").volume_symmetry == "C2"
    volume = _finite_map(run / "map.mrc")
    # C2 about z: (x, y, z) -> (-x, -y, z) maps the grid to itself about the centre
    c = L // 2
    turned = np.roll(np.flip(volume, axis=(1, 2)), shift=(1, 1), axis=(1, 2))
    inner = (slice(1, L), slice(1, L), slice(1, L))
    assert np.corrcoef(volume[inner].ravel(), turned[inner].ravel())[0, 1] > 0.99, c


def test_halves(particles, tmp_path: Path) -> None:
    run = tmp_path / "halves"
    assert main(["reconstruct", *_inputs(particles), "-o", str(run), "--halves", "--epochs",
                 "2", "--switch-epoch", "1", "--search-epochs", "1", *COMMON]) == 0
    for half in (1, 2):
        _finite_map(HalvesFiles(run).half_run(half) / "map.mrc")
    _finite_map(run / "map.mrc")


def test_backproject_command_matches_the_cpu(particles, tmp_path: Path) -> None:
    poses = tmp_path / "poses.pkl"
    write_cryodrgn_poses(poses, particles.rotations, torch.zeros(300, 2, dtype=F64), L)
    maps = {}
    for device in ("cpu", DEVICE.type):
        out = tmp_path / f"bp_{device}"
        assert main(["backproject", *_inputs(particles), "--poses", str(poses), "-o", str(out),
                     "--device", device, "--threads", "1", "--force"]) == 0
        maps[device] = _finite_map(out / "map.mrc")
    # float64 sums on both, written as float32: equal to float32 rounding
    np.testing.assert_allclose(maps[DEVICE.type], maps["cpu"],
                               atol=1e-5 * float(np.abs(maps["cpu"]).max()))
