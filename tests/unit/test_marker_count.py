"""``rundir.marker_count``: the count a workflow folder's marker (``halves.json``,
``starts.json``) records, with one-line errors for a missing or broken marker."""

from __future__ import annotations

import json

import pytest

from cryospin.errors import InputError
from cryospin.rundir import marker_count


def test_the_count_its_default_and_its_minimum(tmp_path):
    marker = tmp_path / "starts.json"
    marker.write_text(json.dumps({"starts": 3}))
    assert marker_count(marker, "starts", kind="--starts", minimum=2) == 3
    marker.write_text(json.dumps({"kind": "gold-standard halves"}))  # from before "starts"
    assert marker_count(marker, "starts", kind="--halves", default=1) == 1
    with pytest.raises(InputError, match="starts.json is unreadable"):
        marker_count(marker, "starts", kind="--starts")  # no default: it must be there
    marker.write_text(json.dumps({"starts": 1}))
    with pytest.raises(InputError, match=r"starts.json names 1 starts \(at least 2\)"):
        marker_count(marker, "starts", kind="--starts", minimum=2)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"starts": "many"}'])
def test_a_broken_marker_is_named(tmp_path, text):
    marker = tmp_path / "halves.json"
    marker.write_text(text)
    with pytest.raises(InputError, match="halves.json is unreadable"):
        marker_count(marker, "starts", kind="--halves", default=1)


def test_no_marker_says_which_workflow_it_is_not(tmp_path):
    with pytest.raises(InputError, match=r"not a --starts run \(no starts.json here\)"):
        marker_count(tmp_path / "starts.json", "starts", kind="--starts")
