"""The run folder's contract (cryospin.rundir): names, stages, the typed checkpoint, load_run."""

from __future__ import annotations

import json

import pytest
import torch

from cryospin.errors import InputError
from cryospin.rundir import (
    CHECKPOINT_FORMAT,
    EPOCH_MAP_PATTERN,
    Checkpoint,
    EpochMetrics,
    RunFiles,
    Stage,
    append_metrics,
    epoch_map_name,
    load_checkpoint,
    load_run,
    resume_conflicts,
    save_checkpoint,
)


def test_stage_values_are_the_strings_on_disk():
    assert Stage.AUTOENCODE == "autoencode" and Stage.AUTODECODE == "autodecode"
    assert f"{Stage.AUTODECODE}" == "autodecode"
    assert json.dumps([Stage.AUTOENCODE]) == '["autoencode"]'


def test_epoch_map_name_matches_its_pattern():
    name = epoch_map_name(7)
    assert name == "map.007.mrc"
    assert int(EPOCH_MAP_PATTERN.match(name).group(1)) == 7
    assert EPOCH_MAP_PATTERN.match(epoch_map_name(1234)).group(1) == "1234"


def _same(a: object, b: object) -> bool:
    """Equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


def _old_format_dict() -> dict:
    """A checkpoint dict as cryospin 0.1 wrote it: no data, no search stop, no switch record."""
    return {
        "format": 1,
        "cryospin_version": "0.1.0",
        "config": {"model": {"num_heads": 3}},
        "stage": "autodecode",
        "epoch": 4,
        "volume": {"w": torch.arange(3.0)},
        "encoder": None,
        "pose_table": {"rotations": torch.eye(3).expand(2, 3, 3).clone()},
        "optimizers": {"decoder": {"state": {}, "param_groups": []}},
        "rng": {"torch": torch.get_rng_state()},
        "extra": {"elapsed_s": 12.5},
    }


def test_old_format_checkpoint_reads_and_round_trips(tmp_path):
    old = _old_format_dict()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, old)
    ckpt = Checkpoint.load(path)
    assert ckpt.stage is Stage.AUTODECODE and ckpt.epoch == 4
    assert ckpt.elapsed_s == 12.5 and ckpt.search_stopped_after is None
    assert ckpt.switch_record is None and ckpt.data == {}
    again = ckpt.to_dict()
    for key, value in old.items():  # every old key keeps its value
        if key not in ("extra", "cryospin_version"):
            assert _same(again[key], value), key
    assert again["extra"] == {"elapsed_s": 12.5, "search_stopped_after": None}
    assert again["stage"] == "autodecode" and type(again["stage"]) is str
    assert torch.equal(again["volume"]["w"], old["volume"]["w"])
    # the current format round-trips exactly, through the file too
    ckpt.save(path)
    back = load_checkpoint(path)
    assert back["format"] == CHECKPOINT_FORMAT
    assert _same(back, again)
    assert _same(Checkpoint.from_dict(back).to_dict(), again)


def test_checkpoint_with_unknown_stage_or_missing_key_is_an_input_error():
    bad = _old_format_dict()
    bad["stage"] = "stage3"
    with pytest.raises(InputError, match="unknown stage"):
        Checkpoint.from_dict(bad)
    del bad["volume"]
    bad["stage"] = "autoencode"
    with pytest.raises(InputError, match="volume"):
        Checkpoint.from_dict(bad)


def test_resume_conflicts_ignores_resumable_fields_and_input():
    saved = {"run": {"device": "cpu", "seed": 0, "final_map": "backprojection"},
             "schedule": {"epochs": 5, "switch_epoch": 2},
             "input": {"particles": "/a.star"}}
    given = {"run": {"device": "cuda", "seed": 0, "final_map": "decoder"},
             "schedule": {"epochs": 9, "switch_epoch": 2},
             "input": {"particles": "/moved/a.star"}}
    assert resume_conflicts(given, saved) == []
    given["schedule"]["switch_epoch"] = 3
    given["run"]["seed"] = 1
    assert resume_conflicts(given, saved) == ["run.seed", "schedule.switch_epoch"]


def test_load_run_finds_metrics_config_and_maps(tmp_path):
    files = RunFiles(tmp_path)
    with pytest.raises(InputError, match="not a cryospin run folder"):
        load_run(tmp_path)
    files.config.write_text("run:\n  seed: 3\n", encoding="utf-8")
    for epoch in (2, 1):
        append_metrics(files.metrics, EpochMetrics(epoch=epoch, stage=Stage.AUTOENCODE,
                                                   loss=1.0, num_images=4, wall_time_s=1.0,
                                                   images_per_s=4.0))
    files.epoch_map(1).write_bytes(b"")
    files.epoch_map(2).write_bytes(b"")
    run = load_run(tmp_path)
    assert [r["epoch"] for r in run.metrics] == [1, 2]
    assert run.config == {"run": {"seed": 3}}
    assert list(run.epoch_maps) == [1, 2] and run.map_path == files.epoch_map(2)
    assert not run.finished and run.poses_path is None
    files.map.write_bytes(b"")
    assert load_run(tmp_path).map_path == files.map
    with pytest.raises(InputError, match="run folder not found"):
        load_run(tmp_path / "missing")
