"""cryospin: ab initio cryo-EM reconstruction with semi-amortized pose inference.

Conventions (axes, FFT centring, Hartley sign, rotations, RELION Euler angles, shift sign,
units) are documented in ``docs/conventions.md``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
