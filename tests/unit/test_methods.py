"""The paper's baselines in ``cryospin reconstruct --method``: amortized and cryoAI-explicit.

* cryoAI's second hypothesis (:func:`cryospin.encoder.in_plane_flip_hypotheses`) is proven in
  float64: rendering it equals the 180°-rotated (about the box centre, in real space) rendering
  of the first, with CTF and shift, for even and odd boxes.
* Configuration: the methods' implied schedule and head count, and the contradictions.
* Each method runs end to end through the command line on a tiny dataset; the baselines never
  build a pose table.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from tests._synthetic import make_dataset

from cryospin.cli.main import main as cli_main
from cryospin.encoder import InPlaneFlipEncoder, MultiHeadPoseEncoder, in_plane_flip_hypotheses
from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import hartley2, hartley3, ihartley2
from cryospin.forward.lattice import disc_frequencies, disc_indices
from cryospin.forward.model import render
from cryospin.losses import gaussian_nll, winner_take_all
from cryospin.rotations import random_rotations
from cryospin.rundir import load_checkpoint, read_metrics
from cryospin.train.config import build_config, config_from_dict, load_config

F64 = {"dtype": torch.float64}


# ----------------------------------------------------------------------------- helpers


def _ctf(n: int, L: int, generator: torch.Generator) -> torch.Tensor:
    """Astigmatic CTFs `(n, L, L)` float64 (even in k)."""
    df = torch.empty(n, **F64).uniform_(8000.0, 15000.0, generator=generator)
    params = CTFParams(
        defocus_u_angstrom=df, defocus_v_angstrom=df - 300.0,
        defocus_angle_deg=torch.rand(n, generator=generator, **F64) * 180.0,
        voltage_kv=torch.full((n,), 300.0, **F64), cs_mm=torch.full((n,), 2.7, **F64),
        amplitude_contrast=torch.full((n,), 0.1, **F64), phase_shift_deg=torch.zeros(n, **F64),
        bfactor_a2=torch.zeros(n, **F64),
    )
    return compute_ctf(params, L, 3.0)


def _rotate_180_about_centre(images: torch.Tensor) -> torch.Tensor:
    """``out[y, x] = in[2c − y, 2c − x]`` with ``c = L//2`` (periodic), real space `(..., L, L)`."""
    L = images.shape[-1]
    idx = (2 * (L // 2) - torch.arange(L)) % L  # pixel coordinate i − c -> c − (i − c)
    return images[..., idx, :][..., :, idx]


# ----------------------------------------------------------------------------- the property


@pytest.mark.parametrize("L", [16, 15])
@pytest.mark.parametrize("with_shift", [False, True])
def test_second_hypothesis_renders_the_180_degree_rotated_image(L: int, with_shift: bool):
    g = torch.Generator().manual_seed(L + 100 * with_shift)
    B = 5
    density = torch.randn(L, L, L, generator=g, **F64)
    volume_ht = hartley3(density)
    rotations = random_rotations(B, generator=g, dtype=torch.float64)[:, None]  # (B, 1, 3, 3)
    shifts = (torch.rand(B, 1, 2, generator=g, **F64) - 0.5) * 3.0 if with_shift else None
    ctf = _ctf(B, L, g)  # (B, L, L)

    rot2, shift2 = in_plane_flip_hypotheses(rotations, shifts)
    assert rot2.shape == (B, 2, 3, 3) and rot2.dtype == torch.float64
    torch.testing.assert_close(rot2[:, 0], rotations[:, 0], rtol=0, atol=0)
    if with_shift:
        torch.testing.assert_close(shift2[:, 1], -shifts[:, 0], rtol=0, atol=0)
    else:
        assert shift2 is None

    # the first hypothesis, rendered on the full grid, rotated by 180° in real space ...
    first = ihartley2(render(volume_ht, rot2[:, 0], None if shifts is None else shift2[:, 0],
                             ctf))  # (B, L, L)
    expected = hartley2(_rotate_180_about_centre(first))  # (B, L, L)
    # ... equals the second hypothesis on the disc |k| < L/2 (the Nyquist row of even L is
    # the only place where the grid has no -k partner)
    freqs = disc_frequencies(L, L / 2 - 0.01, dtype=torch.float64)  # (P, 2)
    index = disc_indices(L, L / 2 - 0.01)  # (P,) flat indices into L*L
    second = render(volume_ht, rot2[:, 1], None if shifts is None else shift2[:, 1],
                    ctf.reshape(B, L * L)[:, index], frequencies=freqs)  # (B, P)
    torch.testing.assert_close(second, expected.reshape(B, L * L)[:, index],
                               rtol=1e-10, atol=1e-10 * float(expected.abs().max()))

    # the other side (R · diag(-1, -1, 1)) is a different pose: the test can tell them apart
    wrong = rotations[:, 0] * torch.tensor([-1.0, -1.0, 1.0], **F64)  # columns negated
    other = render(volume_ht, wrong, None if shifts is None else shift2[:, 1],
                   ctf.reshape(B, L * L)[:, index], frequencies=freqs)
    assert (other - second).abs().max() > 1e-3 * float(second.abs().max())


def test_winner_take_all_picks_the_flip_for_a_rotated_observation():
    g = torch.Generator().manual_seed(7)
    L, B = 16, 4
    volume_ht = hartley3(torch.randn(L, L, L, generator=g, **F64))
    rotations = random_rotations(B, generator=g, dtype=torch.float64)[:, None]
    clean = ihartley2(render(volume_ht, rotations[:, 0]))  # (B, L, L)
    observed = torch.cat([clean[:2], _rotate_180_about_centre(clean[2:])])
    freqs = disc_frequencies(L, L // 2 - 1, dtype=torch.float64)
    index = disc_indices(L, L // 2 - 1)
    obs_ht = hartley2(observed).reshape(B, L * L)[:, index]
    rot2, _ = in_plane_flip_hypotheses(rotations, None)
    nll = gaussian_nll(render(volume_ht, rot2, frequencies=freqs), obs_ht, 1.0)  # (B, 2)
    _, best = winner_take_all(nll)
    assert best.tolist() == [0, 0, 1, 1]
    assert float(nll.min(dim=1).values.max()) < 1e-12 * float(nll.max())


def test_flip_hypotheses_keep_autograd_and_validate_shapes():
    rot = random_rotations(3, generator=torch.Generator().manual_seed(0))[:, None]
    rot = rot.clone().requires_grad_(True)
    shifts = torch.zeros(3, 1, 2, requires_grad=True)
    r2, s2 = in_plane_flip_hypotheses(rot, shifts)
    (r2.sum() + (s2 * torch.arange(4.0).reshape(1, 2, 2)).sum()).backward()
    assert rot.grad is not None and shifts.grad is not None
    with pytest.raises(ValueError):
        in_plane_flip_hypotheses(rot[:, 0], None)
    with pytest.raises(ValueError):
        in_plane_flip_hypotheses(rot, torch.zeros(3, 2))


def test_flip_encoder_doubles_the_hypotheses():
    torch.manual_seed(0)
    inner = MultiHeadPoseEncoder(16, 1, width_multiplier=0.125, head_hidden=16,
                                 predict_shifts=True, max_shift_px=2.0)
    enc = InPlaneFlipEncoder(inner)
    assert enc.num_heads == 2
    out = enc(torch.randn(3, 16, 16))
    assert out.rotations.shape == (3, 2, 3, 3) and out.shifts_px.shape == (3, 2, 2)
    torch.testing.assert_close(out.shifts_px[:, 1], -out.shifts_px[:, 0])
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in inner.parameters())


# ----------------------------------------------------------------------------- configuration


def test_default_method_is_semi_amortized_and_unchanged():
    c = build_config("default")
    assert c.schedule.method == "semi-amortized"
    assert c.schedule.switch_epoch < c.schedule.epochs and c.schedule.search_epochs > 0


def test_amortized_never_switches_whatever_the_preset_says():
    c = build_config("paper-synthetic", {"schedule": {"method": "amortized"}})
    assert (c.schedule.switch_epoch, c.schedule.epochs, c.schedule.search_epochs) == (20, 20, 0)
    assert c.model.num_heads == 7
    c = build_config("default", {"schedule": {"method": "amortized", "epochs": 5}})
    assert (c.schedule.switch_epoch, c.schedule.search_epochs) == (5, 0)


def test_cryoai_uses_one_head():
    c = build_config("default", {"schedule": {"method": "cryoai"}})
    assert c.model.num_heads == 1 and c.schedule.switch_epoch == c.schedule.epochs
    c = build_config("default", {"schedule": {"method": "cryoai"}, "model": {"num_heads": 1}})
    assert c.model.num_heads == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"schedule": {"method": "cryoai"}, "model": {"num_heads": 3}}, "num_heads"),
        ({"schedule": {"method": "amortized", "switch_epoch": 2}}, "switch_epoch"),
        ({"schedule": {"method": "cryoai", "search_epochs": 2}}, "search_epochs"),
        ({"schedule": {"method": "fully-amortized"}}, "method"),
    ],
)
def test_contradictions_are_input_errors(overrides, message):
    with pytest.raises(InputError, match=message):
        build_config("default", overrides)


def test_a_cryoai_config_file_with_several_heads_is_invalid():
    with pytest.raises(InputError, match="num_heads"):
        config_from_dict({"schedule": {"method": "cryoai"}, "model": {"num_heads": 7}})


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """96 particles of 16 px of an asymmetric blob density (cryospin's forward model)."""
    folder = tmp_path_factory.mktemp("methods_data")
    make_dataset(folder, box_px=16, n=96, seed=11, draw_order=("rotations", "defocus"),
                 n_blobs=5, variance_px2=1.5**2)
    return folder


def _reconstruct(data: Path, out: Path, method: str) -> int:
    argv = [
        "reconstruct", str(data / "particles.mrcs"), "--ctf", str(data / "ctf.pkl"),
        "-o", str(out), "--method", method, "--epochs", "2", "--batch-size", "32",
        "--width", "0.125", "--no-bf16", "--search-rotations", "128", "--threads", "1",
        "--seed", "2", "--no-progress",
    ]
    if method != "cryoai":
        argv += ["--heads", "3"]
    if method == "semi-amortized":  # one stage-1 epoch, then the switch (the preset has none)
        argv += ["--switch-epoch", "1"]
    return cli_main(argv)


@pytest.fixture(scope="module")
def finished_runs(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """One finished 2-epoch run per method (made on first use, shared by the tests below)."""
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            run = tmp_path_factory.mktemp("methods_runs") / method
            assert _reconstruct(tiny_dataset, run, method) == 0
            cache[method] = run
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["semi-amortized", "amortized", "cryoai"])
def test_each_method_runs_end_to_end(method, finished_runs):
    run = finished_runs(method)
    for name in ("map.mrc", "poses.star", "poses.pkl", "map.001.mrc", "map.002.mrc"):
        assert (run / name).is_file(), name
    config = load_config(run / "config.yaml")
    assert config.schedule.method == method
    metrics = read_metrics(run / "metrics.jsonl")
    stages = [m["stage"] for m in metrics]
    state = load_checkpoint(run / "checkpoint.pt")
    assert all(math.isfinite(m["loss"]) for m in metrics)
    if method == "semi-amortized":
        assert stages == ["autoencode", "autodecode"]
        assert state["pose_table"] is not None
        return
    assert stages == ["autoencode", "autoencode"]
    assert state["stage"] == "autoencode" and state["pose_table"] is None
    assert state["encoder"] is not None
    assert (config.schedule.switch_epoch, config.schedule.search_epochs) == (2, 0)
    assert len(metrics[-1]["head_usage"]) == (2 if method == "cryoai" else 3)
    assert config.model.num_heads == (1 if method == "cryoai" else 3)


def test_an_amortized_run_resumed_with_more_epochs_still_never_switches(finished_runs, tmp_path):
    run = tmp_path / "amortized"
    shutil.copytree(finished_runs("amortized"), run)
    assert cli_main(["reconstruct", "--resume", str(run), "--epochs", "3", "--threads", "1",
                     "--no-progress"]) == 0
    stages = [m["stage"] for m in read_metrics(run / "metrics.jsonl")]
    assert stages == ["autoencode"] * 3
    assert (run / "map.003.mrc").is_file()
