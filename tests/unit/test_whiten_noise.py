"""Whitening the noise in the training data (``data.whiten_noise``, ``--whiten-noise``): the
rows are the plain rows times the filter, their noise is white on the disc, the streamed and
in-memory rows agree, and coloured noise stops looking like junk."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from tests._synthetic import coloured_noise, ctf_params, dft_radius

from cryospin.cli import reconstruct as cli
from cryospin.cli.flags import reconstruct as flags
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.losses import random_phase_log_likelihood_ratio
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import prepare_data, radial_profile

F64 = torch.float64
L, N, APIX = 32, 1200, 3.0


def _coloured_noise(n: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise `(n, L, L)` whose power falls ~5x from low to high frequency."""
    return coloured_noise(n, 0.3 + 3.0 * torch.exp(-dft_radius(L) / 4.0), gen)


@pytest.fixture(scope="module")
def noise_stack(tmp_path_factory):
    """A stack of coloured noise only (no particle), with CTF parameters."""
    folder = tmp_path_factory.mktemp("coloured")
    write_stack(folder / "particles.mrcs", _coloured_noise(N, torch.Generator().manual_seed(0)),
                APIX)
    write_cryodrgn_ctf(folder / "ctf.pkl",
                       ctf_params(torch.linspace(8000.0, 15000.0, N, dtype=F64)), L, APIX)
    return load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")


def test_whitened_rows_are_the_plain_rows_times_the_filter(noise_stack) -> None:
    plain = prepare_data(noise_stack, DataConfig())
    white = prepare_data(noise_stack, DataConfig(whiten_noise=True))
    assert plain.noise_spectrum is None and plain.reader is not None
    assert plain.reader.whitening is None
    assert white.noise_spectrum is not None and white.reader is not None
    w = white.reader.whitening
    assert w is not None and w.shape == (white.frequencies.shape[0],)
    assert white.noise_variance == plain.noise_variance  # the reference is the plain σ²
    assert white.image_scale == plain.image_scale
    idx = torch.arange(0, N, 7)
    a, b = plain.batch(idx), white.batch(idx)
    torch.testing.assert_close(b.images, a.images, rtol=0, atol=0)  # the encoder's input
    torch.testing.assert_close(b.hartley, (a.hartley.double() * w).float(), rtol=1e-6, atol=1e-5)
    assert a.ctf is not None and b.ctf is not None
    torch.testing.assert_close(b.ctf, (a.ctf.double() * w).float(), rtol=1e-6, atol=1e-6)
    # streamed (lazy) and in-memory rows are the same rows
    eager = white.in_memory().batch(idx)
    for name in ("images", "hartley", "ctf"):
        torch.testing.assert_close(getattr(eager, name), getattr(b, name), rtol=0, atol=0)
    assert white.summary()["noise_whitened"] is True
    assert plain.summary()["noise_whitened"] is False


def test_whitened_noise_is_white_on_the_disc(noise_stack) -> None:
    """The rows' noise variance per shell: ~5x from shell 1 to the edge before, within 8 %
    of ``noise_variance`` in every shell after (the estimate's accuracy from 2,000 images,
    ``test_noise_spectrum``; here from the 1,200 of the stack)."""
    shells = L // 2 + 1
    profiles = {}
    for whiten in (False, True):
        data = prepare_data(noise_stack, DataConfig(whiten_noise=whiten)).in_memory()
        assert data.hartley is not None
        profiles[whiten] = radial_profile(data.hartley.double().square(), data.frequencies,
                                          shells)[1:-1] / data.noise_variance
    assert float(profiles[False][0] / profiles[False][-1]) > 4.0
    assert float((profiles[True] - 1).abs().max()) < 0.08, profiles[True]


def test_coloured_noise_looks_like_junk_until_whitened(noise_stack) -> None:
    """Images of noise alone against the junk class of a map whose power sits at low
    frequencies: unwhitened, the noise's excess power there makes them likelier junk than
    empty (what kept the junk class off on coloured data); whitened, as they should be, they
    are likelier empty."""
    for whiten, likelier_junk in ((False, True), (True, False)):
        data = prepare_data(noise_stack, DataConfig(whiten_noise=whiten)).in_memory()
        assert data.hartley is not None and data.ctf is not None
        shell = torch.round(data.frequencies.double().norm(dim=-1))
        signal = 2.0 * data.noise_variance * torch.exp(-shell / 3.0)  # (P,) the map's power
        power = data.ctf.double().square() * signal  # at each image's CTF
        llr = random_phase_log_likelihood_ratio(data.hartley.double(), power,
                                                data.noise_variance)
        assert (float(llr.mean()) > 0) is likelier_junk, (whiten, float(llr.mean()))


def test_without_the_ctf_nothing_is_whitened(noise_stack) -> None:
    data = prepare_data(noise_stack, DataConfig(no_ctf=True, whiten_noise=True))
    assert data.noise_spectrum is None and data.reader is not None
    assert data.reader.whitening is None


@pytest.mark.parametrize(("flag", "value"), [("--whiten-noise", True),
                                             ("--no-whiten-noise", False), (None, False)])
def test_the_flag_reaches_the_config(flag, value) -> None:
    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", *([flag] if flag else [])])
    preset = {"data": {"whiten_noise": not value}} if flag else {}
    assert build_config(None, {**preset, **cli._overrides(args)}).data.whiten_noise is value


def test_the_spectrum_is_measured_on_the_background_only(noise_stack, tmp_path) -> None:
    """A bright disc inside the inscribed circle (a particle) changes the scale but not the
    measured spectrum's shape."""
    images = noise_stack.images().double().numpy()
    yy, xx = np.mgrid[:L, :L] - L // 2
    disc = (np.hypot(yy, xx) < L / 4).astype(np.float64)
    write_stack(tmp_path / "p.mrcs", images + 5.0 * disc, APIX)
    write_cryodrgn_ctf(tmp_path / "ctf.pkl",
                       ctf_params(torch.linspace(8000.0, 15000.0, N, dtype=F64)), L, APIX)
    with_particle = load_particles(tmp_path / "p.mrcs", ctf_pkl=tmp_path / "ctf.pkl")
    a = prepare_data(noise_stack, DataConfig(whiten_noise=True))
    b = prepare_data(with_particle, DataConfig(whiten_noise=True))
    assert a.noise_spectrum is not None and b.noise_spectrum is not None
    # the same background pixels, in units of each run's own image scale
    torch.testing.assert_close(b.noise_spectrum / b.image_scale**2,
                               a.noise_spectrum / a.image_scale**2, rtol=1e-9, atol=0)
