"""cryospin: ab initio cryo-EM reconstruction with semi-amortized pose inference.

Conventions (axes, FFT centring, Hartley sign, rotations, RELION Euler angles, shift sign,
units) are documented in ``docs/conventions.md``.
"""

#: The one version literal: pyproject.toml reads it (``dynamic = ["version"]``), so the built
#: package, ``cryospin --version`` and the version recorded in runs agree.
__version__ = "0.2.0"

__all__ = ["__version__"]
