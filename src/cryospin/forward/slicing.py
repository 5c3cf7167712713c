"""Central slices of a 3D transform (Fourier slice theorem) and their exact adjoint.

Convention (see ``docs/conventions.md``): the volume is indexed ``[z, y, x]`` on the centred grid
(frequency of index ``i`` is ``i − L//2`` cycles per box); rotation matrices left-multiply xyz
column vectors and the slice of pose ``R`` samples the volume at ``q = k @ R`` for the row vector
``k = (kx, ky, 0)`` (i.e. at ``Rᵀ k``). Interpolation is trilinear, zero outside the grid.
Typically the volume is a real Hartley volume, whose slice is then the 2D Hartley transform of
the projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cryospin.forward.lattice import frequency_grid_2d
from cryospin.forward.trilinear import sample_volume, sample_volume_adjoint

__all__ = ["extract_central_slices", "insert_central_slices"]

# samples per call of the insertion kernel in insert_central_slices
_INSERT_CHUNK_SAMPLES = 1 << 18
# samples per chunk of the explicit scatter (a few MB: per corner an int64 index and C values each)
_SCATTER_CHUNK_SAMPLES = 1 << 16


def _check_volume(volume: Tensor) -> int:
    if volume.ndim != 3 or not (volume.shape[0] == volume.shape[1] == volume.shape[2]):
        raise ValueError(f"volume must have shape (L, L, L), got {tuple(volume.shape)}")
    L = int(volume.shape[0])
    if L < 2:
        raise ValueError(f"volume box must be at least 2 voxels, got {L}")
    return L


def _check_rotations(rotations: Tensor) -> None:
    if rotations.ndim < 2 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must have shape (..., 3, 3), got {tuple(rotations.shape)}")


def _frequencies(
    frequencies: Tensor | None, L: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    if frequencies is None:
        return frequency_grid_2d(L, dtype=dtype, device=device).reshape(L * L, 2)  # (L*L, 2)
    if frequencies.ndim != 2 or frequencies.shape[-1] != 2:
        raise ValueError(f"frequencies must have shape (P, 2), got {tuple(frequencies.shape)}")
    return frequencies.to(dtype=dtype, device=device)


def _slice_points(rotations: Tensor, freqs: Tensor) -> Tensor:
    """Points ``(kx, ky, 0) @ R`` `(B, P, 3)` (xyz, cycles/box) for `(B, 3, 3)` rotations."""
    return freqs @ rotations[:, :2, :]  # (P, 2) @ (B, 2, 3) -> (B, P, 3)


def extract_central_slices(
    volume: Tensor, rotations: Tensor, *, frequencies: Tensor | None = None
) -> Tensor:
    """Central slices of a real 3D transform at the given poses (trilinear, zero outside).

    One trilinear ``grid_sample`` of the whole batch's points, split over the CPU threads
    (:func:`cryospin.forward.trilinear.sample_volume`); the volume is never copied per pose.
    Differentiable with respect to ``volume`` and ``rotations``.

    Parameters
    ----------
    volume : `(L, L, L)`
        Real volume on the centred grid, indexed ``[z, y, x]`` (e.g. a Hartley volume).
    rotations : `(..., 3, 3)`
        Rotation matrices (left-multiply xyz column vectors); cast to ``volume.dtype``.
    frequencies : `(P, 2)`, optional
        2D frequencies ``(kx, ky)`` in cycles per box to sample; default the full centred
        ``L × L`` grid.

    Returns
    -------
    `(..., L, L)` or `(..., P)`
        ``volume`` sampled at ``(kx, ky, 0) @ R``, in ``volume.dtype``.
    """
    L = _check_volume(volume)
    _check_rotations(rotations)
    batch_shape = rotations.shape[:-2]
    rot = rotations.to(volume.dtype).reshape(-1, 3, 3)  # (B, 3, 3)
    freqs = _frequencies(frequencies, L, volume.dtype, volume.device)  # (P, 2)
    P = freqs.shape[0]
    q = _slice_points(rot, freqs)  # (B, P, 3) xyz frequencies
    # align_corners=True: normalised coordinate -1 + 2 i / (L - 1) for index i = q + L//2
    grid = (q + (L // 2)) * (2.0 / (L - 1)) - 1.0  # (B, P, 3), last dim (x, y, z) = (W, H, D)
    out = sample_volume(volume[None], grid.reshape(-1, 3))[0]  # (B*P,)
    out = out.reshape(*batch_shape, P)
    if frequencies is None:
        out = out.reshape(*batch_shape, L, L)
    return out


def _lower_corners(index_xyz: Tensor, L: int) -> tuple[Tensor, Tensor, Tensor]:
    """Lower trilinear corners of points in a zero-padded ``(L + 2)³`` copy of the volume.

    Parameters
    ----------
    index_xyz : `(S, 3)`
        Continuous voxel indices ``(ix, iy, iz)`` (``i = k + L//2``) of ``S`` points.
    L : int
        Box size.

    Returns
    -------
    base : `(S,)` int64
        Flat index, in the row-major ``[z, y, x]`` padded volume, of the lower corner; the 8
        corners are ``base + _corner_offsets(L)``. Corners outside the ``L³`` grid fall in the
        zero padding.
    frac : `(S, 3)`
        The points' offsets ``(fx, fy, fz)`` from their lower corner, in ``[0, 1)``: the upper
        corner's weight along each axis (the lower one's ``1 − f``).
    valid : `(S,)` bool
        False for points whose 8 corners all lie outside the grid (their base is clamped).
    """
    lo = torch.floor(index_xyz)
    frac = index_xyz - lo  # (S, 3)
    lo = lo.to(torch.int64)
    valid = ((lo >= -1) & (lo <= L - 1)).all(-1)  # (S,)
    lo = lo.clamp(-1, L - 1) + 1  # padded coordinates in [0, L]
    Lp = L + 2
    base = (lo[:, 2] * Lp + lo[:, 1]) * Lp + lo[:, 0]
    return base, frac, valid


def _trilinear_setup(
    index_xyz: Tensor, L: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_lower_corners` with the weights of the lower and upper corner along x, y, z,
    ``wx, wy, wz`` `(S, 2)` each: ``(base, wx, wy, wz, valid)``."""
    base, frac, valid = _lower_corners(index_xyz, L)
    wx, wy, wz = (torch.stack([1 - frac[:, a], frac[:, a]], -1) for a in range(3))
    return base, wx, wy, wz, valid


def _corner_offsets(L: int, device: torch.device) -> Tensor:
    """Flat offsets `(8,)` of the corners ``(dz, dy, dx)`` (x fastest) in the padded volume."""
    Lp = L + 2
    d = torch.arange(2, device=device)
    return (d[:, None, None] * Lp * Lp + d[None, :, None] * Lp + d[None, None, :]).reshape(8)


def _extract_central_slices_gather(
    volume: Tensor, rotations: Tensor, *, frequencies: Tensor | None = None
) -> Tensor:
    """Reference implementation of :func:`extract_central_slices` by explicit gathers.

    Same weights as ``grid_sample`` (used by the benchmark and the tests as a second method).
    """
    L = _check_volume(volume)
    _check_rotations(rotations)
    batch_shape = rotations.shape[:-2]
    rot = rotations.to(volume.dtype).reshape(-1, 3, 3)  # (B, 3, 3)
    freqs = _frequencies(frequencies, L, volume.dtype, volume.device)
    P = freqs.shape[0]
    q = _slice_points(rot, freqs).reshape(-1, 3)  # (B*P, 3)
    base, wx, wy, wz, valid = _trilinear_setup(q + (L // 2), L)
    padded = F.pad(volume, (1, 1, 1, 1, 1, 1)).reshape(-1)  # ((L+2)^3,)
    corners = padded[base[:, None] + _corner_offsets(L, volume.device)]  # (S, 8)
    c = corners.reshape(-1, 2, 2, 2)  # (S, z, y, x)
    c = (c * wx[:, None, None, :]).sum(-1)  # (S, 2, 2)
    c = (c * wy[:, None, :]).sum(-1)  # (S, 2)
    out = (c * wz).sum(-1) * valid
    out = out.reshape(*batch_shape, P)
    if frequencies is None:
        out = out.reshape(*batch_shape, L, L)
    return out


def insert_central_slices(
    slices: Tensor,
    rotations: Tensor,
    box_px: int,
    *,
    frequencies: Tensor | None = None,
    channels: bool = False,
) -> Tensor:
    """Adjoint of :func:`extract_central_slices` with respect to the volume (backprojection).

    Each slice value is spread onto the 8 surrounding voxels with the trilinear weights of the
    extraction (corners outside the grid are dropped), so that
    ``<extract(V, R), S> = <V, insert(S, R)>``. Computed by ATen's fused
    ``grid_sampler_3d_backward`` kernel (the exact adjoint of the ``grid_sample`` used by
    :func:`extract_central_slices`), except in float64 on the CPU, where that kernel is 25–36×
    slower than in float32 and an explicit trilinear scatter (``index_add_``) is 15–20× faster
    than it; both chunked over poses to bound memory, equal to 1e-12 (tests). With ``channels=True``
    several value channels share one weight computation (e.g. ``CTF·image`` and ``CTF²`` in
    backprojection). Inserting ``torch.ones`` gives the sampling weights. Not differentiable
    (:func:`_insert_by_index_add` is, for `(C, B, P)` values at given frequencies).

    Parameters
    ----------
    slices : `(..., L, L)` or `(..., P)`; with ``channels=True`` `(C, ..., L, L)` / `(C, ..., P)`
        Values on the centred 2D grid (or at ``frequencies``); leading dims broadcast against
        those of ``rotations``.
    rotations : `(..., 3, 3)`
        Rotation matrices (left-multiply xyz column vectors); cast to ``slices.dtype``.
    box_px : int
        Box size ``L`` of the output volume.
    frequencies : `(P, 2)`, optional
        2D frequencies ``(kx, ky)`` in cycles per box of the slice values; default the full
        ``L × L`` grid.
    channels : bool
        Whether ``slices`` has a leading channel axis.

    Returns
    -------
    `(L, L, L)`, or `(C, L, L, L)` with ``channels=True``
        Volume indexed ``[z, y, x]``, in ``slices.dtype``.
    """
    L = int(box_px)
    if L < 2:
        raise ValueError(f"box_px must be at least 2, got {box_px}")
    _check_rotations(rotations)
    values = slices if channels else slices[None]  # (C, ..., L, L) or (C, ..., P)
    C = values.shape[0]
    freqs = _frequencies(frequencies, L, values.dtype, values.device)  # (P, 2)
    P = freqs.shape[0]
    if frequencies is None:
        if values.ndim < 3 or values.shape[-2:] != (L, L):
            raise ValueError(f"slices must have shape (..., {L}, {L}), got {tuple(slices.shape)}")
        values = values.reshape(C, *values.shape[1:-2], P)  # (C, ..., P)
    elif values.ndim < 2 or values.shape[-1] != P:
        raise ValueError(f"slices must have shape (..., {P}), got {tuple(slices.shape)}")
    batch_shape = torch.broadcast_shapes(values.shape[1:-1], rotations.shape[:-2])
    values = values.expand(C, *batch_shape, P).reshape(C, -1, P)  # (C, B, P)
    rot = rotations.to(values.dtype).expand(*batch_shape, 3, 3).reshape(-1, 3, 3)  # (B, 3, 3)
    with torch.no_grad():
        # ATen's CPU kernel is 25-36x slower in float64 than in float32 (benchmarks/RESULTS.md,
        # "Backprojection in float64"); the explicit scatter is then 15-20x faster than it
        if values.dtype == torch.float64 and values.device.type == "cpu":
            out = _insert_by_index_add(values, rot, freqs, L)  # (C, L, L, L)
        else:
            out = _insert_by_kernel(values, rot, freqs, L)
    return out if channels else out[0]


def _insert_by_kernel(values: Tensor, rot: Tensor, freqs: Tensor, L: int) -> Tensor:
    """`(C, B, P)` values at the points ``freqs @ R`` of `(B, 3, 3)` rotations, inserted into a
    `(C, L, L, L)` volume by ATen's ``grid_sampler_3d_backward`` kernel (the exact adjoint of
    the ``grid_sample`` of :func:`extract_central_slices`), chunked over poses. No autograd."""
    C, P = values.shape[0], freqs.shape[0]
    out: Tensor | None = None  # the first chunk's result, then the sum (no extra volume)
    # each kernel call zeroes and returns (C, L, L, L) volumes (one per thread's chunk): chunks
    # of at least L³/2 samples (their grid, 3 values each, is 1.5 volumes) keep that cost small
    # beside the scatter's
    per_chunk = max(1, max(_INSERT_CHUNK_SAMPLES, L**3 // 2) // max(P, 1))
    for start in range(0, rot.shape[0], per_chunk):
        grid = _slice_points(rot[start : start + per_chunk], freqs)  # (b, P, 3)
        grid.add_(L // 2).mul_(2.0 / (L - 1)).sub_(1.0)  # same mapping as extraction
        v = values[:, start : start + per_chunk].reshape(C, -1)  # (C, b*P)
        inserted = sample_volume_adjoint(v, grid.reshape(-1, 3), L)  # (C, L, L, L)
        out = inserted if out is None else out.add_(inserted)
    if out is None:  # no poses
        return torch.zeros(C, L, L, L, dtype=values.dtype, device=values.device)
    return out


def _insert_by_index_add(values: Tensor, rot: Tensor, freqs: Tensor, L: int) -> Tensor:
    """The same insertion as :func:`_insert_by_kernel`, `(C, B, P)` -> `(C, L, L, L)`, by an
    explicit trilinear scatter (``index_add_`` into a zero-padded ``(L + 2)³`` grid; corners
    outside the grid fall in the padding), the ``C`` channels sharing each stencil; chunked over
    poses. Each corner's values are built from contiguous `(S,)` weights, products of the
    three axes' factors, and added by one ``index_add_`` per corner (1.2–1.7× faster than one
    `(S, 8)` stencil product and add: ``benchmarks/RESULTS.md``, "The float64 scatter by
    corner").
    Differentiable with respect to ``values`` and ``rot``."""
    C, P = values.shape[0], freqs.shape[0]
    Lp = L + 2
    out = torch.zeros(C, Lp * Lp * Lp, dtype=values.dtype, device=values.device)
    per_chunk = max(1, _SCATTER_CHUNK_SAMPLES // max(P, 1))
    for start in range(0, rot.shape[0], per_chunk):
        v = values[:, start : start + per_chunk].reshape(C, -1)  # (C, S)
        q = _slice_points(rot[start : start + per_chunk], freqs).reshape(-1, 3)  # (S, 3)
        base, frac, valid = _lower_corners(q + (L // 2), L)
        on = valid.to(frac.dtype)
        fx, fy, fz = frac[:, 0].contiguous(), frac[:, 1].contiguous(), frac[:, 2] * on
        for dz, wz in ((0, on - fz), (1, fz)):
            vz = v * wz  # (C, S)
            for dy, wy in ((0, 1 - fy), (1, fy)):
                vzy = vz * wy
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    out.index_add_(1, base + (dz * Lp * Lp + dy * Lp + dx), vzy * wx)
    return out.reshape(C, Lp, Lp, Lp)[:, 1:-1, 1:-1, 1:-1].contiguous()
