"""Guards of the training run: the configuration rejects non-finite or negative learning rates
and bad batch sizes; a non-finite gradient (with a finite loss) stops the run like a NaN loss,
naming the epoch and batch, before any parameter is updated, keeping the last checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from cryospin.cli.main import main as cli_main
from cryospin.errors import InputError
from cryospin.io.particles import load_particles
from cryospin.rundir import load_checkpoint, read_metrics
from cryospin.train import autodecode, autoencode
from cryospin.train.config import build_config, config_from_dict, config_to_dict
from cryospin.train.fit import fit
from cryospin.train.metrics import (
    NonFiniteGradientError,
    NonFiniteLossError,
    check_finite_gradients,
)

LEARNING_RATES = ["encoder_lr", "decoder_lr", "decoder_lr_after_switch", "decoder_lr_final",
                  "pose_lr", "shift_lr"]

# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("name", LEARNING_RATES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1e-3, 0.0])
def test_bad_learning_rates_are_rejected(name, value):
    with pytest.raises(InputError, match=f"optim.{name} must be") as info:
        build_config("default", {"optim": {name: value}})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -3, 1.5, True, math.nan, "8"])
def test_bad_batch_sizes_are_rejected(value):
    with pytest.raises(InputError, match="batch_size"):
        build_config("default", {"optim": {"batch_size": value}})


@pytest.mark.parametrize("field", [("model", "width_multiplier"), ("model", "max_shift_px"),
                                   ("optim", "search_radius_px"),
                                   ("data", "noise_variance")])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_other_floats_must_be_finite(field, value):
    section, key = field
    with pytest.raises(InputError, match=f"{section}.{key} must be"):
        build_config("default", {section: {key: value}})


def test_run_batch_size_is_checked_too():
    with pytest.raises(InputError, match="inference_batch_size"):
        build_config("default", {"run": {"inference_batch_size": 0}})


def test_a_config_yaml_with_a_nan_learning_rate_is_rejected_on_load():
    data = config_to_dict(build_config("default"))
    data["optim"]["pose_lr"] = float("nan")
    with pytest.raises(InputError, match="optim.pose_lr must be a finite number"):
        config_from_dict(data, where="run/config.yaml")


def test_valid_values_still_pass():
    c = build_config("default", {"optim": {"encoder_lr": 1e-6, "batch_size": 1,
                                           "decoder_lr_final": None},
                                 "data": {"max_preload_gb": math.inf}})  # inf: no limit
    assert c.optim.batch_size == 1 and c.data.max_preload_gb == math.inf


def test_cli_rejects_a_nan_learning_rate_with_one_line(tmp_path, capsys):
    status = cli_main(["reconstruct", str(tmp_path / "p.star"), "-o", str(tmp_path / "run"),
                       "--pose-lr", "nan"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pose-lr must be a finite number" in err[0]


# ----------------------------------------------------------------------------- gradients


def test_check_finite_gradients_names_the_first_bad_group():
    good = torch.ones(3)
    check_finite_gradients({"encoder": [good, None], "volume": []}, "autoencode", 1, 1)
    with pytest.raises(NonFiniteGradientError,
                       match="gradient of the volume in autoencode epoch 4, batch 7") as info:
        check_finite_gradients(
            {"encoder": [good], "volume": [good, torch.tensor([1.0, math.inf])]},
            "autoencode", 4, 7,
        )
    assert isinstance(info.value, NonFiniteLossError)  # handled like a NaN loss
    assert (info.value.what, info.value.epoch, info.value.batch) == ("volume", 4, 7)
    with pytest.raises(NonFiniteGradientError, match="poses"):
        check_finite_gradients({"poses": [torch.tensor([[math.nan]], dtype=torch.float64)]},
                               "autodecode", 1, 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_finite_gradients_finds_one_bad_element_among_many(bad, dtype):
    # Opposite infinities cancel to NaN in a sum, never to a finite value.
    grad = torch.randn(1000, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    grad[517, 3] = bad
    grad[2, 30] = -bad if math.isinf(bad) else 1.0
    with pytest.raises(NonFiniteGradientError, match="encoder"):
        check_finite_gradients({"volume": [torch.ones(4)], "encoder": [torch.ones(2), grad]},
                               "autoencode", 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_check_finite_gradients_accepts_finite_elements_whose_sum_overflows(dtype):
    huge = torch.full((64,), torch.finfo(dtype).max / 4, dtype=dtype)
    assert not torch.isfinite(huge.sum())  # the fast check alone would refuse it
    check_finite_gradients({"encoder": [huge], "poses": [torch.zeros(3)]}, "autoencode", 1, 1)


def _nan_gradient(t: torch.Tensor) -> torch.Tensor:
    """0 in value, NaN in gradient: d sqrt(u)/du at u = 0 is inf, times du/dt = 0."""
    return torch.sqrt(t.sum() * 0.0)


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    from cryospin.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("sim")
    simulate_dataset("bundled:6vyb", folder, n_particles=48, box_px=16,
                     pixel_size_angstrom=16.0, snr=1.0, seed=4)
    return load_particles(folder / "particles.star")


def _config(switch_epoch: int, particles=None):
    return build_config("default", {
        "input": {"particles": None if particles is None else str(particles.source)},
        "model": {"num_heads": 2, "width_multiplier": 0.125, "head_hidden": 16,
                  "precision": "fp32"},
        "optim": {"batch_size": 16, "search_rotations": 64, "search_radius_px": 3.0,
                  "pose_steps_per_batch": 2},
        "schedule": {"epochs": 2, "switch_epoch": switch_epoch, "search_epochs": 0},
        "run": {"device": "cpu", "num_threads": 1, "seed": 1, "progress": False},
    })


@pytest.mark.parametrize(
    ("switch_epoch", "module", "function", "what"),
    [(2, autoencode, "winner_nll", "volume"),  # stage 1: encoder + volume
     (1, autodecode, "pose_nll", "poses")],  # stage 2: the pose steps
)
def test_non_finite_gradient_stops_the_run_and_keeps_the_checkpoint(
    particles, tmp_path, monkeypatch, switch_epoch, module, function, what
):
    run = tmp_path / "run"
    fit(_config(switch_epoch), particles, run, stop_after=1)
    before = (run / "checkpoint.pt").read_bytes()

    real = getattr(module, function)

    def finite_loss_nan_gradient(*args, **kwargs):
        out = real(*args, **kwargs)
        x = args[1]  # volume_ht (winner_nll) or rotations (pose_nll)
        if isinstance(out, tuple):
            return (out[0] + _nan_gradient(x), *out[1:])
        return out + _nan_gradient(x)

    monkeypatch.setattr(module, function, finite_loss_nan_gradient)
    with pytest.raises(NonFiniteGradientError, match=f"gradient of the {what} .* epoch 2, "
                                                     "batch 1") as info:
        fit(_config(switch_epoch), particles, run, resume=True)
    assert "\n" not in str(info.value)
    assert (run / "checkpoint.pt").read_bytes() == before  # the last good one, untouched
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]

    # recovery: without the fault, --resume continues from epoch 1
    monkeypatch.undo()
    done = fit(_config(switch_epoch), particles, run, resume=True)
    assert done.finished and done.epochs_completed == 2


def test_cli_reports_a_non_finite_gradient_in_one_line(particles, tmp_path, monkeypatch,
                                                       capsys):
    run = tmp_path / "run"
    fit(_config(1, particles), particles, run, stop_after=1)
    real = autodecode.pose_nll
    monkeypatch.setattr(autodecode, "pose_nll",
                        lambda v, r, *a, **k: real(v, r, *a, **k) + _nan_gradient(r))
    capsys.readouterr()
    assert cli_main(["reconstruct", "--resume", str(run), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1
    assert "non-finite gradient of the poses in autodecode epoch 2, batch 1" in err[0]
