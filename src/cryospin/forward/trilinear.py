"""Trilinear sampling of one volume at many points, and its adjoint, on every CPU thread.

ATen's CPU kernels of 3D ``grid_sample`` (``grid_sampler_3d`` and its backward) run in
parallel over the batch axis ``N`` only. A volume sampled at many points as one batch item
(``N = 1``: every central slice of a batch, a symmetrised grid) therefore runs on one thread
whatever ``torch.get_num_threads()`` says (measured: 1.0× from 1 to 2 threads for 64 slices of a
128³ volume; benchmarks/RESULTS.md, "Trilinear sampling on every CPU thread"). Here the points
are split into ``T`` equal chunks given as ``T`` batch items of the same volume (an expanded
view: no copy). The values are those of the single call, point by point; the volume's gradient
is the sum of ``T`` per-chunk gradients (autograd's ``expand`` backward), equal up to rounding.
That backward writes ``T`` volumes, so ``T`` is bounded by the work per chunk and by memory
(:func:`point_chunks`). Other devices run in parallel over the points already: ``T = 1``.

Coordinates are ``grid_sample``'s normalised ones (``align_corners=True``, ``(x, y, z)`` =
``(W, H, D)``), zero outside the volume, as in :mod:`cryospin.forward.slicing`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["point_chunks", "sample_volume", "sample_volume_adjoint"]

# fewest points per chunk worth a thread of its own
_MIN_CHUNK_POINTS = 1 << 14
# where each chunk writes a volume of its own (a backward, an insertion): at least this many
# points per voxel of that volume a chunk, below which zeroing and summing the chunk's extra
# volume would cost more than its thread saves (at 128 px a batch of 64 slices on the disc has
# ~0.4 points per voxel and gains 1.7-1.8x on 2 threads)
_MIN_POINTS_PER_VOXEL = 1.0 / 16
# extra memory the chunks' volumes may take (bytes)
_CHUNK_VOLUME_BYTES = 256 << 20
# a sample point outside [-1, 1]: reads 0 (padding of the last chunk)
_OUTSIDE = 2.0


def point_chunks(volume_numel: int, element_bytes: int, num_points: int, device: torch.device,
                 *, writes_volume: bool) -> int:
    """Number ``T >= 1`` of chunks to split ``num_points`` sample points into.

    On the CPU: at most ``torch.get_num_threads()``, at least ``_MIN_CHUNK_POINTS`` points a
    chunk; when each chunk writes a volume of its own (a volume gradient, an insertion) also at
    most ``1 + _CHUNK_VOLUME_BYTES / (volume_numel · element_bytes)`` and at least
    ``volume_numel · _MIN_POINTS_PER_VOXEL`` points a chunk. Elsewhere 1.
    """
    if device.type != "cpu":
        return 1
    t = min(torch.get_num_threads(), num_points // _MIN_CHUNK_POINTS)
    if writes_volume:
        volume_bytes = max(volume_numel * element_bytes, 1)
        t = min(t, 1 + _CHUNK_VOLUME_BYTES // volume_bytes,
                int(num_points / (volume_numel * _MIN_POINTS_PER_VOXEL)))
    return max(t, 1)


def _chunked(points: Tensor, chunks: int) -> Tensor:
    """`(S, 3)` -> `(T, 1, 1, ceil(S / T), 3)`, the last chunk padded with points outside."""
    S = points.shape[0]
    per = -(-S // chunks)
    pad = per * chunks - S
    if pad:
        points = torch.cat([points, points.new_full((pad, 3), _OUTSIDE)])
    return points.reshape(chunks, 1, 1, per, 3)


def sample_volume(volume: Tensor, points: Tensor) -> Tensor:
    """Trilinear values of ``volume`` at ``points`` (zero outside), on every CPU thread.

    Parameters
    ----------
    volume : `(C, D, H, W)`
        Channels of one volume.
    points : `(S, 3)`
        Normalised coordinates ``(x, y, z)`` in ``[-1, 1]`` (``align_corners=True``); dtype of
        ``volume``.

    Returns
    -------
    `(C, S)`
        Differentiable with respect to ``volume`` and ``points`` (as ``grid_sample``).
    """
    S = points.shape[0]
    writes = volume.requires_grad and torch.is_grad_enabled()
    T = point_chunks(volume.numel(), volume.element_size(), S, volume.device,
                     writes_volume=writes)
    out = F.grid_sample(
        volume[None].expand(T, *volume.shape),  # (T, C, D, H, W), a view
        _chunked(points, T),  # (T, 1, 1, S/T, 3)
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )  # (T, C, 1, 1, S/T)
    return out.permute(1, 0, 2, 3, 4).reshape(volume.shape[0], -1)[:, :S]


def sample_volume_adjoint(values: Tensor, points: Tensor, box_px: int) -> Tensor:
    """Adjoint of :func:`sample_volume`: ``values`` spread trilinearly onto a `(C, L, L, L)`
    volume (ATen's ``grid_sampler_3d_backward``), on every CPU thread. No autograd.

    Parameters
    ----------
    values : `(C, S)`
    points : `(S, 3)`
        Normalised coordinates as in :func:`sample_volume`; dtype of ``values``.
    box_px : int
        ``L``.

    Returns
    -------
    `(C, L, L, L)`
        ``<sample_volume(V, points), values> = <V, sample_volume_adjoint(values, points)>``.
    """
    C, S = values.shape
    L = int(box_px)
    T = point_chunks(C * L**3, values.element_size(), S, values.device, writes_volume=True)
    per = -(-S // T)
    if per * T != S:
        values = torch.cat([values, values.new_zeros(C, per * T - S)], dim=1)
    v = values.reshape(C, T, per).permute(1, 0, 2).reshape(T, C, 1, 1, per)
    # only its shape is read (output_mask [True, False]): expanded from one element, no memory
    shape_only = torch.empty(1, dtype=values.dtype, device=values.device).expand(T, C, L, L, L)
    grad_input, _ = torch.ops.aten.grid_sampler_3d_backward(
        v.contiguous(), shape_only, _chunked(points, T).contiguous(),
        0, 0, True, [True, False],  # bilinear, zeros padding, align_corners
    )  # (T, C, L, L, L)
    return grad_input.sum(0) if T > 1 else grad_input[0]
