"""One resume allow-list: ``cryospin reconstruct --resume`` (its flags) and the trainer (the
configuration against the checkpoint's) accept and refuse the same changes
(``cryospin.rundir.RESUMABLE_OPTIONS``)."""

from __future__ import annotations

import argparse

import pytest

from cryospin.cli import reconstruct as cli
from cryospin.cli.flags import reconstruct as cli_flags
from cryospin.errors import InputError
from cryospin.rundir import RESUMABLE_OPTIONS, Checkpoint, Stage
from cryospin.train.config import build_config, config_to_dict
from cryospin.train.setup import check_resume_config

ACCEPTED = [["--final-map", "decoder"], ["--epochs", "30"], ["--device", "cpu"],
            ["--threads", "2"], ["--precision", "fp32"], ["--progress-interval", "5"]]
REFUSED = [["--seed", "3"], ["--batch-size", "16"], ["--heads", "3"], ["--decoder-lr", "0.01"],
           ["--switch-epoch", "3"], ["--max-memory", "4"], ["--box", "32"],
           ["--symmetry", "D7"]]


def _args(flags: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_flags.add_args(parser)
    return parser.parse_args(["--resume", "RUN", *flags])


def _trainer_accepts(flags: list[str], tmp_path) -> bool:
    """The trainer's check of the configuration these flags give against a checkpoint of the
    configuration without them."""
    saved = build_config("default", {})
    given = build_config("default", cli._overrides(_args(flags)))
    ckpt = Checkpoint(config=config_to_dict(saved), stage=Stage.AUTOENCODE, epoch=1, volume={})
    try:
        check_resume_config(given, ckpt, tmp_path / "checkpoint.pt")
    except InputError:
        return False
    return True


@pytest.mark.parametrize("flags", ACCEPTED + REFUSED, ids=lambda f: f[0])
def test_cli_and_trainer_agree_on_resume(flags, tmp_path):
    cli_accepts = cli.refused_on_resume(_args(flags)) == []
    assert cli_accepts == _trainer_accepts(flags, tmp_path)
    assert cli_accepts == (flags in ACCEPTED)


def test_final_map_may_change_on_resume(tmp_path):
    """The issue's case: ``--resume RUN --final-map decoder`` only changes what the end writes,
    and both checks accept it."""
    assert "run.final_map" in RESUMABLE_OPTIONS
    assert cli.refused_on_resume(_args(["--final-map", "decoder"])) == []
    assert _trainer_accepts(["--final-map", "decoder"], tmp_path)


def test_every_refused_flag_is_named():
    refused = cli.refused_on_resume(_args(["--seed", "3", "--epochs", "9", "--heads", "2"]))
    assert refused == ["--heads", "--seed"]


def test_symmetry_may_not_change_on_resume(tmp_path):
    """The volume's group, the search's grid and the final map's symmetry come from
    ``model.symmetry``: a resume with another group is refused by both checks."""
    assert "model.symmetry" not in RESUMABLE_OPTIONS
    assert cli.refused_on_resume(_args(["--symmetry", "C4"])) == ["--symmetry"]
    assert not _trainer_accepts(["--symmetry", "C4"], tmp_path)
    assert build_config("default", cli._overrides(_args(["--symmetry", "D7"]))).model.symmetry \
        == "D7"
