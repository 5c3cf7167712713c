"""``cryospin.train.choose``: which runs may be compared, and the lowest final loss chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cryospin.errors import InputError
from cryospin.io.identity import ParticleSetIdentity, save_identity
from cryospin.rundir import HALVES_MARKER, STARTS_MARKER
from cryospin.train.choose import choose_run, comparison_problems, run_outcome
from cryospin.train.config import build_config, save_config

_IDENTITY = ParticleSetIdentity(num_particles=1000, box_px=32, image_names_sha256="a" * 64,
                                end_pixels_sha256="b" * 64, source="/data/particles.star")


def _run(folder: Path, losses: list[float], *, seed: int = 1, finished: bool = True,
         identity: ParticleSetIdentity | None = _IDENTITY, stop_after: int | None = None,
         rule: str = "settled", **sections: dict[str, object]) -> Path:
    """A run folder as ``fit`` leaves it: config.yaml, metrics.jsonl (one line per loss),
    particle_set.json and (finished) map.mrc; ``sections``: configuration overrides."""
    folder.mkdir(parents=True)
    overrides: dict[str, dict[str, object]] = {"run": {"seed": seed}}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    save_config(folder / "config.yaml", build_config("default", overrides),
                ["cryospin", "reconstruct"])
    rows = []
    for epoch, loss in enumerate(losses, start=1):
        extra = ({"search_stop": {"after_epoch": epoch, "rule": rule}}
                 if epoch == stop_after else {})
        rows.append(json.dumps({"epoch": epoch, "stage": "autodecode", "loss": loss,
                                "extra": extra}))
    (folder / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    if identity is not None:
        save_identity(folder / "particle_set.json", identity)
    if finished:
        (folder / "map.mrc").write_bytes(b"")
    return folder


def test_the_run_with_the_lowest_final_loss_is_chosen(tmp_path):
    runs = [_run(tmp_path / "a", [500.0, 418.2], seed=6),
            _run(tmp_path / "b", [520.0, 364.8], seed=101, stop_after=1, rule="few"),
            _run(tmp_path / "c", [480.0, 365.4], seed=102)]
    outcomes = [run_outcome(r) for r in runs]
    assert choose_run(outcomes) == 1
    b = outcomes[1]
    assert (b.seed, b.epochs, b.final_loss_nats) == (101, 2, 364.8)
    assert (b.search_stop_rule, b.search_stopped_after) == ("few", 1)
    assert (outcomes[0].search_stop_rule, outcomes[0].search_stopped_after) == (None, None)


def test_the_final_loss_is_the_last_epochs_not_the_lowest_seen(tmp_path):
    runs = [_run(tmp_path / "a", [300.0, 400.0]), _run(tmp_path / "b", [390.0, 390.0])]
    assert choose_run([run_outcome(r) for r in runs]) == 1


def test_equal_losses_choose_the_first_given(tmp_path):
    runs = [_run(tmp_path / "a", [400.0], seed=1), _run(tmp_path / "b", [400.0], seed=2)]
    outcomes = [run_outcome(r) for r in runs]
    assert choose_run(outcomes) == 0
    assert choose_run(outcomes[::-1]) == 0


def test_seed_threads_device_and_precision_may_differ(tmp_path):
    a = run_outcome(_run(tmp_path / "a", [400.0], seed=1))
    b = run_outcome(_run(tmp_path / "b", [401.0], seed=2,
                         run={"num_threads": 4, "device": "cpu", "final_map": "decoder"},
                         model={"precision": "fp32"}))
    assert comparison_problems(a, b) == []


def test_a_setting_that_changes_the_fit_is_named_with_both_values(tmp_path):
    a = run_outcome(_run(tmp_path / "a", [400.0]))
    b = run_outcome(_run(tmp_path / "b", [380.0], schedule={"epochs": 20},
                         optim={"pose_lr": 0.1}))
    assert comparison_problems(a, b) == ["optim.pose_lr 0.1 vs 0.05", "schedule.epochs 20 vs 16"]
    with pytest.raises(InputError) as err:
        choose_run([a, b])
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'b'}: not comparable with {tmp_path / 'a'}: ")
    assert "schedule.epochs 20 vs 16" in text and "differ only in their seed" in text


def test_a_field_one_config_lacks_is_a_difference(tmp_path):
    a = run_outcome(_run(tmp_path / "a", [400.0]))
    b_dir = _run(tmp_path / "b", [400.0])
    text = (b_dir / "config.yaml").read_text()
    (b_dir / "config.yaml").write_text(text.replace("  search_settled_nats: 1.0\n", ""))
    assert comparison_problems(a, run_outcome(b_dir)) == [
        "schedule.search_settled_nats (absent) vs 1.0"]


def test_other_particles_or_another_version_are_not_comparable(tmp_path):
    a = run_outcome(_run(tmp_path / "a", [400.0]))
    other = ParticleSetIdentity(num_particles=900, box_px=32, image_names_sha256="c" * 64,
                                end_pixels_sha256="b" * 64, source="/elsewhere.star")
    b = run_outcome(_run(tmp_path / "b", [300.0], identity=other))
    assert comparison_problems(a, b) == ["particles: count 900 vs 1000", "particles: image names"]
    moved = ParticleSetIdentity(**{**_IDENTITY.__dict__, "source": "/moved/particles.star"})
    assert comparison_problems(a, run_outcome(_run(tmp_path / "c", [1.0], identity=moved))) == []
    d_dir = _run(tmp_path / "d", [400.0])
    text = (d_dir / "config.yaml").read_text()
    version = text.splitlines()[0]
    assert version.startswith("cryospin_version: ")
    (d_dir / "config.yaml").write_text(text.replace(version, "cryospin_version: 0.0.1"))
    assert comparison_problems(a, run_outcome(d_dir)) == [
        f"cryospin 0.0.1 vs {version.split(': ')[1]}"]


@pytest.mark.parametrize(("case", "needle"), [
    ("unfinished", "has not finished (last epoch 2, no map.mrc): finish it first with "
                   "cryospin reconstruct --resume"),
    ("halves", "a --halves run"),
    ("starts", "a --starts run: its choice is in choice.json"),
    ("no identity", "no particle_set.json"),
    ("nan loss", "the last epoch's loss is nan"),
    ("empty", "not a cryospin run folder"),
])
def test_a_run_that_cannot_be_compared_is_named(tmp_path, case, needle):
    folder = tmp_path / "run"
    if case == "unfinished":
        _run(folder, [400.0, 390.0], finished=False)
    elif case == "halves":
        _run(folder, [400.0]).joinpath(HALVES_MARKER).write_text("{}")
    elif case == "starts":
        folder.mkdir()
        (folder / STARTS_MARKER).write_text("{}")
    elif case == "no identity":
        _run(folder, [400.0], identity=None)
    elif case == "nan loss":
        _run(folder, [400.0, float("nan")])
    else:
        folder.mkdir()
    with pytest.raises(InputError) as err:
        run_outcome(folder)
    assert needle in str(err.value) and str(folder) in str(err.value)


def test_no_run_or_one_given_twice_are_refused_and_one_run_is_chosen(tmp_path):
    a = run_outcome(_run(tmp_path / "a", [400.0]))
    assert choose_run([a]) == 0  # a starts folder of one start
    with pytest.raises(InputError, match="no run to choose from"):
        choose_run([])
    with pytest.raises(InputError, match="the same run folder given twice"):
        choose_run([a, run_outcome(tmp_path / "a" / ".." / "a")])
