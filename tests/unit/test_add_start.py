"""``add_start``: one more start named in a ``--starts`` folder's marker (how a half of
``--halves`` grows), the other fields kept."""

from __future__ import annotations

import json

import pytest

from cryospin.errors import InputError
from cryospin.train.starts import add_start, starts_of


def _marker(folder, record) -> None:
    folder.mkdir()
    (folder / "starts.json").write_text(json.dumps(record))


def test_a_start_is_added_with_the_next_seed_and_folder(tmp_path):
    folder = tmp_path / "half_B"
    _marker(folder, {"kind": "k", "starts": 1, "seeds": [1004], "folders": ["start_1"]})
    assert add_start(folder) == 2
    assert add_start(folder) == 3
    marker = json.loads((folder / "starts.json").read_text())
    assert marker == {"kind": "k", "starts": 3, "seeds": [1004, 1005, 1006],
                      "folders": ["start_1", "start_2", "start_3"]}
    assert starts_of(folder) == 3
    assert not list(folder.glob("start_*"))  # the start runs at the next fit_starts


def test_an_unreadable_marker_is_named(tmp_path):
    folder = tmp_path / "half_A"
    _marker(folder, {"starts": 1})  # no seeds
    with pytest.raises(InputError, match="starts.json is unreadable") as err:
        add_start(folder)
    assert str(folder / "starts.json") in str(err.value)
    with pytest.raises(InputError, match="not a --starts run"):
        add_start(tmp_path / "nothing")
