"""Hostile-input tests of cryospin's readers (shared helpers).

Contract under test: every malformed input ends either in a correct parse or in
:class:`cryospin.errors.InputError` whose one-line message names the file and the problem --
never another exception type, never a hang, never a silent wrong value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from cryospin.errors import InputError

__all__ = [
    "FUZZ",
    "FUZZ_FEW",
    "outcome",
    "expect_input_error",
    "write_stack",
    "star_text",
    "CTF_OPTICS",
]

# hypothesis settings shared by the fuzz tests: modest by default (the suite must stay fast);
# CRYOSPIN_FUZZ_EXAMPLES=1000 runs a deep search
_N_EXAMPLES = int(os.environ.get("CRYOSPIN_FUZZ_EXAMPLES", "40"))
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FUZZ = settings(max_examples=_N_EXAMPLES, deadline=None, suppress_health_check=_HEALTH)
FUZZ_FEW = settings(max_examples=max(_N_EXAMPLES // 2, 1), deadline=None,
                    suppress_health_check=_HEALTH)


def outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[str, Any]:
    """Run ``fn``: ``("ok", result)`` or ``("input_error", exc)``; anything else fails the test.

    An InputError message must be one line.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "ok", fn(*args, **kw)
        except InputError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg, f"InputError message is not one line: {msg!r}"
            return "input_error", exc
        except Exception as exc:  # noqa: BLE001 - this is what the contract forbids
            pytest.fail(f"{fn.__name__} raised {type(exc).__name__} instead of InputError: {exc}")


def expect_input_error(fn: Callable[..., Any], *needles: str, **kw: Any) -> str:
    """Call ``fn(**kw)``; it must raise InputError whose message contains every needle
    (case-insensitive). Returns the message."""
    kind, val = outcome(fn, **kw)
    assert kind == "input_error", f"expected InputError, got a parse: {val!r}"
    msg = str(val)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    return msg


def write_stack(path: Path, data: np.ndarray, pixel: float = 2.0) -> Path:
    """Write ``data`` `(n, L, L)` (any mrcfile dtype) as an image stack with mrcfile."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = pixel
    return path


CTF_OPTICS = {"rlnVoltage": 300, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}


def star_text(
    names: list[str],
    *,
    version: str = "3.1",
    pixel: float = 2.0,
    box: int = 16,
    extra_particle_cols: dict[str, list[Any]] | None = None,
) -> str:
    """A valid RELION particle star (``version`` "3.0", "3.1" or "5") for image ``names``.

    Particle columns: image name, defocus U/V/angle, Euler angles, origins (pixels for 3.0,
    Å otherwise), optics group (3.1+). 3.0 puts the optics columns on each particle.
    """
    n = len(names)
    cols: dict[str, list[Any]] = {
        "rlnImageName": names,
        "rlnDefocusU": [15000 + 10 * i for i in range(n)],
        "rlnDefocusV": [14000 + 10 * i for i in range(n)],
        "rlnDefocusAngle": [10] * n,
        "rlnAngleRot": [5 * i for i in range(n)],
        "rlnAngleTilt": [20] * n,
        "rlnAnglePsi": [30] * n,
    }
    if version == "3.0":
        cols["rlnOriginX"] = [1.5] * n
        cols["rlnOriginY"] = [-2.0] * n
        for k, v in CTF_OPTICS.items():
            cols[k] = [v] * n
        cols["rlnDetectorPixelSize"] = [pixel] * n
        cols["rlnMagnification"] = [10000.0] * n
    else:
        cols["rlnOriginXAngst"] = [3.0] * n
        cols["rlnOriginYAngst"] = [-4.0] * n
        cols["rlnOpticsGroup"] = [1] * n
    cols.update(extra_particle_cols or {})
    lines = ["", f"# version {'50001' if version == '5' else '30001'}", ""]
    if version != "3.0":
        optics = {"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1, **CTF_OPTICS,
                  "rlnImagePixelSize": pixel, "rlnImageSize": box,
                  "rlnImageDimensionality": 2}
        lines += ["data_optics", "", "loop_"]
        lines += [f"_{c} #{i + 1}" for i, c in enumerate(optics)]
        lines += [" ".join(str(v) for v in optics.values()), ""]
    lines += ["data_particles" if version != "3.0" else "data_", "", "loop_"]
    lines += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for r in range(n):
        lines.append(" ".join(str(cols[c][r]) for c in cols))
    return "\n".join(lines) + "\n"
