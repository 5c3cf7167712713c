"""HEALPix pixelisation of the sphere (RING scheme): pixel centres and the pixel of a direction.

Equal-area pixels, ``12 · nside²`` of them; used to grid view directions (the pose posterior of
:mod:`cryospin.posterior`) and to draw such grids (:mod:`cryospin.plotting`). A core
module: NumPy only. Directions are unit vectors ``(x, y, z)`` or colatitude ``θ`` and longitude
``φ`` in radians, ``(sin θ cos φ, sin θ sin φ, cos θ)``.

HEALPix (Górski et al. 2005, ApJ 622:759), RING scheme: pixels are numbered ring by ring from
the north pole (``z = +1``), each ring in increasing longitude ``φ ∈ [0, 2π)``. Rings
``i = 1 … 4·nside − 1``; a polar-cap ring ``i < nside`` has ``4i`` pixels at
``z = 1 − i²/(3 nside²)``, ``φ = (j − ½) π / (2i)``; an equatorial ring ``nside ≤ i ≤ 3 nside``
has ``4 nside`` pixels at ``z = 4/3 − 2i/(3 nside)``, ``φ = (j − f) π / (2 nside)`` with
``f = 1`` when ``i + nside`` is odd and ``½`` otherwise; the south cap mirrors the north.
Implemented here from the paper (healpy is not a dependency).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "check_nside",
    "healpix_npix",
    "healpix_pixel_centres",
    "healpix_vectors",
    "healpix_ang2pix",
]


def check_nside(nside: int) -> int:
    """``nside`` as an int (ValueError unless it is a positive integer)."""
    if isinstance(nside, bool) or int(nside) != nside or nside < 1:
        raise ValueError(f"nside must be a positive integer, got {nside!r}")
    return int(nside)


def healpix_npix(nside: int) -> int:
    """Number of HEALPix pixels, ``12 · nside²``."""
    nside = check_nside(nside)
    return 12 * nside * nside


def healpix_pixel_centres(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the RING-scheme pixels: colatitude ``θ`` and longitude ``φ`` (radians).

    Returns
    -------
    theta : `(12 nside²,)` float64 in ``(0, π)``
    phi : `(12 nside²,)` float64 in ``[0, 2π)``
    """
    nside = check_nside(nside)
    z_parts, phi_parts = [], []
    for i in range(1, 4 * nside):
        if i < nside or i > 3 * nside:  # polar caps: ring i' from the nearer pole
            ip = i if i < nside else 4 * nside - i
            j = np.arange(1, 4 * ip + 1, dtype=np.float64)
            z = 1.0 - ip * ip / (3.0 * nside * nside)
            phi = (j - 0.5) * math.pi / (2 * ip)
            if i > 3 * nside:
                z = -z
        else:  # equatorial belt
            j = np.arange(1, 4 * nside + 1, dtype=np.float64)
            z = 4.0 / 3.0 - 2.0 * i / (3.0 * nside)
            f = 1.0 if (i + nside) % 2 == 1 else 0.5
            phi = (j - f) * math.pi / (2 * nside)
        z_parts.append(np.full(j.shape, z))
        phi_parts.append(phi)
    z_all = np.concatenate(z_parts)
    return np.arccos(np.clip(z_all, -1.0, 1.0)), np.concatenate(phi_parts)


def healpix_vectors(nside: int) -> np.ndarray:
    """Unit vectors ``(x, y, z)`` of the pixel centres, `(12 nside², 3)` float64."""
    theta, phi = healpix_pixel_centres(nside)
    s = np.sin(theta)
    return np.stack([s * np.cos(phi), s * np.sin(phi), np.cos(theta)], axis=1)


def healpix_ang2pix(nside: int, theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """RING-scheme pixel index of each direction (colatitude ``θ``, longitude ``φ``, radians).

    Parameters
    ----------
    theta, phi : `(...)` arrays (broadcast together); ``φ`` is taken modulo ``2π``.

    Returns
    -------
    `(...)` int64 in ``[0, 12 nside²)``
    """
    nside = check_nside(nside)
    theta, phi = np.broadcast_arrays(np.asarray(theta, np.float64), np.asarray(phi, np.float64))
    z = np.cos(theta)
    za = np.abs(z)
    tt = np.mod(phi, 2 * math.pi) / (0.5 * math.pi)  # in [0, 4)
    tt = np.where(tt >= 4.0, 0.0, tt)
    npix, ncap, nl4 = 12 * nside * nside, 2 * nside * (nside - 1), 4 * nside
    out = np.empty(z.shape, dtype=np.int64)

    eq = za <= 2.0 / 3.0
    # equatorial belt: the pixel is between two ascending and two descending edge lines
    t1 = nside * (0.5 + tt[eq])
    t2 = nside * z[eq] * 0.75
    jp = np.floor(t1 - t2).astype(np.int64)
    jm = np.floor(t1 + t2).astype(np.int64)
    ir = nside + 1 + jp - jm  # ring in the belt, 1 … 2 nside + 1
    kshift = 1 - (ir & 1)
    ip = ((jp + jm - nside + kshift + 1) // 2) % nl4
    out[eq] = ncap + (ir - 1) * nl4 + ip

    pol = ~eq
    tp = tt[pol] - np.floor(tt[pol])
    tmp = nside * np.sqrt(3.0 * (1.0 - za[pol]))
    jp = np.floor(tp * tmp).astype(np.int64)
    jm = np.floor((1.0 - tp) * tmp).astype(np.int64)
    ir = jp + jm + 1  # ring counted from the nearer pole
    ip = np.floor(tt[pol] * ir).astype(np.int64) % (4 * ir)
    out[pol] = np.where(z[pol] > 0, 2 * ir * (ir - 1) + ip, npix - 2 * ir * (ir + 1) + ip)
    return out
