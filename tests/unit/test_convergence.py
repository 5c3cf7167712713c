"""The convergence check of a plain run (``cryospin.train.convergence``): the FSC of the
final map and the trained volume, recorded and logged as a convergence check, never as a
resolution."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from cryospin.evaluate.fsc import fsc
from cryospin.train.convergence import (
    CONVERGENCE_NOTE,
    convergence_check,
    record_convergence_check,
)

F64 = torch.float64


def test_curve_is_the_fsc_of_the_two_maps_and_labelled_not_a_resolution(tmp_path) -> None:
    L = 16
    g = torch.Generator().manual_seed(0)
    trained = torch.randn(L, L, L, generator=g, dtype=F64)
    final = trained + 0.7 * torch.randn(L, L, L, generator=g, dtype=F64)
    check = convergence_check(final.numpy(), trained, pixel_size_angstrom=3.0)
    expected = fsc(final, trained, pixel_size_angstrom=3.0)
    np.testing.assert_array_equal(check.fsc.fsc, expected.fsc)
    assert check.crossing(0.5) == expected.resolution(0.5)

    path = tmp_path / "convergence_fsc.json"
    record_convergence_check(path, final, trained, pixel_size_angstrom=3.0)
    data = json.loads(path.read_text())
    assert data["kind"] == "convergence check" and data["is_resolution"] is False
    assert data["note"] == CONVERGENCE_NOTE and "NOT a resolution" in data["note"]
    assert "--halves" in data["note"]
    assert data["maps"] == ["map.mrc", "map_decoder.mrc"]
    assert data["fsc_0.5_crossing_angstrom"] == pytest.approx(expected.resolution(0.5))
    assert not [k for k in data if "resolution" in k and k != "is_resolution"]
    np.testing.assert_allclose(data["fsc"], expected.fsc)


def test_logged_line_says_it_is_not_a_resolution(tmp_path, caplog) -> None:
    v = torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with caplog.at_level(logging.INFO, logger="cryospin.train.convergence"):
        record_convergence_check(tmp_path / "c.json", v, v)  # identical: agree to Nyquist
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("convergence check (NOT a resolution)")
    assert "2.00 px" in line and "cryospin reconstruct --halves" in line
