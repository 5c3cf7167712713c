"""Checkpoints: round trip, RNG restoration, atomicity (the previous file survives a failure)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cryospin import rundir as ckpt
from cryospin.errors import InputError
from cryospin.rundir import load_checkpoint, save_checkpoint
from cryospin.train.state import capture_rng_state, restore_rng_state


def _draws(gen: torch.Generator) -> tuple:
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),  # noqa: NPY002 (the global state is under test)
        [random.random() for _ in range(3)],
        torch.randperm(10, generator=gen).tolist(),
    )


def test_round_trip_with_modules_optimisers_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.rand(2, generator=gen)
    state = {
        "stage": "autoencode",
        "epoch": 3,
        "model": model.state_dict(),
        "optimizers": {"encoder": opt.state_dict()},
        "rng": capture_rng_state(gen),
        "config": {"model": {"num_heads": 7, "max_shift_px": None}},
    }
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state)
    expected = _draws(gen)

    # scramble every generator, then restore
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002 (scrambles the global state under test)
    random.seed(123)
    gen2 = torch.Generator().manual_seed(999)
    back = load_checkpoint(path)
    restore_rng_state(back["rng"], gen2)
    assert _draws(gen2) == expected

    assert back["format"] == ckpt.CHECKPOINT_FORMAT
    assert (back["stage"], back["epoch"]) == ("autoencode", 3)
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(back["model"])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizers"]["encoder"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_previous_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(4)})
    before = path.read_bytes()

    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # half-written garbage in the temp file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(Exception, match="No space left"):
        save_checkpoint(path, {"epoch": 2, "w": torch.arange(8)})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_previous_checkpoint_survives_keyboard_interrupt(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def interrupted(obj, f, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert len(list(tmp_path.iterdir())) == 1


def test_load_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a readable cryospin checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"something": 1}, other)
    with pytest.raises(InputError, match="not a cryospin checkpoint"):
        load_checkpoint(other)
    future = tmp_path / "future.pt"
    torch.save({"format": 99}, future)
    with pytest.raises(InputError, match="format 99"):
        load_checkpoint(future)
