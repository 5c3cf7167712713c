"""``noise_spectrum.json`` (:mod:`cryospin.train.noise_record`): the spectrum a run whitened
with, relative to its mean, written and read back exactly; absent without whitening; bad
files refused with one line naming them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests._synthetic import coloured_noise, ctf_params, dft_radius

from cryospin.errors import InputError
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.train.config import DataConfig
from cryospin.train.data import prepare_data
from cryospin.train.noise_record import (
    NoiseSpectrumRecord,
    noise_record,
    read_noise_spectrum,
    write_noise_spectrum,
)

F64 = torch.float64
L, N, APIX = 32, 600, 2.5


@pytest.fixture(scope="module")
def coloured_stack(tmp_path_factory):
    """Coloured noise only (its power falls ~5x from low to high frequency), with CTFs."""
    folder = tmp_path_factory.mktemp("noise_record")
    power = 0.3 + 3.0 * torch.exp(-dft_radius(L) / 4.0)
    write_stack(folder / "particles.mrcs",
                coloured_noise(N, power, torch.Generator().manual_seed(3)), APIX)
    write_cryodrgn_ctf(folder / "ctf.pkl",
                       ctf_params(torch.linspace(9000.0, 14000.0, N, dtype=F64)), L, APIX)
    return load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")


def test_the_record_is_the_whitening_spectrum_over_its_reference(coloured_stack) -> None:
    data = prepare_data(coloured_stack, DataConfig(whiten_noise=True, loss_radius_px=12.0))
    assert data.noise_spectrum is not None
    record = noise_record(data)
    assert record is not None
    assert record.box_px == L and record.pixel_size_angstrom == pytest.approx(APIX)
    np.testing.assert_allclose(record.relative_power * record.noise_variance_hartley,
                               data.noise_spectrum.numpy(), rtol=1e-12)
    assert record.loss_radius_cycles_per_box == pytest.approx(
        float(data.frequencies.double().norm(dim=-1).max()))
    assert record.loss_radius_cycles_per_box <= 12.0
    np.testing.assert_array_equal(record.shells, np.arange(L // 2 + 1))
    np.testing.assert_allclose(record.frequency_per_angstrom, np.arange(L // 2 + 1) / (L * APIX))
    used = record.used_shells()
    assert not used[0] and used[1] and used[12] and not used[13:].any()
    # the stack's noise is coloured: strongest at the lowest shells, weaker than its mean
    # towards the disc's edge
    assert record.relative_power[1] > 2.0 and record.relative_power[12] < 1.0


def test_no_record_without_whitening(coloured_stack) -> None:
    assert noise_record(prepare_data(coloured_stack, DataConfig(whiten_noise=False))) is None


def test_written_and_read_back_exactly(coloured_stack, tmp_path) -> None:
    record = noise_record(prepare_data(coloured_stack, DataConfig(whiten_noise=True)))
    assert record is not None
    path = tmp_path / "noise_spectrum.json"
    write_noise_spectrum(path, record)
    back = read_noise_spectrum(path)
    assert (back.box_px, back.pixel_size_angstrom, back.noise_variance_hartley,
            back.loss_radius_cycles_per_box) == (
        record.box_px, record.pixel_size_angstrom, record.noise_variance_hartley,
        record.loss_radius_cycles_per_box)
    np.testing.assert_array_equal(back.relative_power, record.relative_power)
    raw = json.loads(path.read_text())  # the columns outside tools read
    assert raw["shell_cycles_per_box"] == list(range(L // 2 + 1))
    np.testing.assert_allclose(raw["frequency_per_angstrom"], record.frequency_per_angstrom)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary left


def _valid() -> dict[str, object]:
    record = NoiseSpectrumRecord(8, 2.0, 64.0, 4.0, np.linspace(2.0, 0.5, 5))
    return {"box_px": record.box_px, "pixel_size_angstrom": record.pixel_size_angstrom,
            "noise_variance_hartley": record.noise_variance_hartley,
            "loss_radius_cycles_per_box": record.loss_radius_cycles_per_box,
            "relative_power": record.relative_power.tolist()}


@pytest.mark.parametrize(("change", "message"), [
    ({"relative_power": [1.0, 1.0]}, "relative_power has 2 values, a 8 px box has 5 shells"),
    ({"relative_power": [1.0, -1.0, 1.0, 1.0, 1.0]}, "needs finite numbers"),
    ({"relative_power": [1.0, float("nan"), 1.0, 1.0, 1.0]}, "needs finite numbers"),
    ({"pixel_size_angstrom": 0.0}, "needs finite numbers"),
    ({"box_px": None}, "not a noise spectrum record (TypeError"),
    ({"noise_variance_hartley": "x"}, "not a noise spectrum record (ValueError"),
])
def test_bad_records_are_refused_naming_the_file(tmp_path, change, message) -> None:
    path = tmp_path / "noise_spectrum.json"
    path.write_text(json.dumps({**_valid(), **change}))
    with pytest.raises(InputError) as err:
        read_noise_spectrum(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_json_or_lacks_a_key(tmp_path) -> None:
    path = tmp_path / "noise_spectrum.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="JSONDecodeError"):
        read_noise_spectrum(path)
    missing = _valid()
    del missing["relative_power"]
    path.write_text(json.dumps(missing))
    with pytest.raises(InputError, match="KeyError"):
        read_noise_spectrum(path)
    read_back = _valid()
    path.write_text(json.dumps(read_back))
    assert read_noise_spectrum(path).relative_power.tolist() == read_back["relative_power"]
