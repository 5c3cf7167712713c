"""Trilinear sampling split over CPU threads: the same values, gradients and adjoint as one
``grid_sample`` call, for every number of chunks (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cryospin.forward import trilinear
from cryospin.forward.slicing import extract_central_slices, insert_central_slices
from cryospin.forward.trilinear import point_chunks, sample_volume, sample_volume_adjoint
from cryospin.rotations import random_rotations

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_call(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The reference: one ``grid_sample`` with the points as one batch item, `(C, S)`."""
    out = F.grid_sample(volume[None], points.reshape(1, 1, 1, -1, 3), mode="bilinear",
                        padding_mode="zeros", align_corners=True)  # (1, C, 1, 1, S)
    return out[0, :, 0, 0]


def _points(S: int, seed: int) -> torch.Tensor:
    """`(S, 3)` normalised points, some outside [-1, 1] (they read 0)."""
    return (torch.rand(S, 3, generator=_gen(seed), dtype=F64) * 2 - 1) * 1.1


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
@pytest.mark.parametrize("S", [1, 29, 30, 31])  # divisible by some chunk counts, not by others
def test_split_sampling_equals_one_call_values_and_gradients(
    monkeypatch: pytest.MonkeyPatch, chunks: int, S: int
) -> None:
    monkeypatch.setattr(trilinear, "point_chunks", lambda *a, **k: chunks)
    vol = torch.randn(2, 5, 6, 7, dtype=F64, generator=_gen(0))
    pts = _points(S, 1)
    v1, p1 = vol.clone().requires_grad_(), pts.clone().requires_grad_()
    v2, p2 = vol.clone().requires_grad_(), pts.clone().requires_grad_()
    ref = _one_call(v1, p1)
    out = sample_volume(v2, p2)
    assert out.shape == (2, S) and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # point by point: bit for bit
    weights = torch.randn(2, S, dtype=F64, generator=_gen(2))
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    assert v1.grad is not None and v2.grad is not None and p2.grad is not None
    torch.testing.assert_close(v2.grad, v1.grad, rtol=0, atol=1e-12)  # a sum of T volumes
    torch.testing.assert_close(p2.grad, p1.grad, rtol=0, atol=0)


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_split_adjoint_is_the_adjoint(monkeypatch: pytest.MonkeyPatch, chunks: int) -> None:
    monkeypatch.setattr(trilinear, "point_chunks", lambda *a, **k: chunks)
    L, S = 6, 47
    vol = torch.randn(3, L, L, L, dtype=F64, generator=_gen(3))
    pts = _points(S, 4)
    vals = torch.randn(3, S, dtype=F64, generator=_gen(5))
    back = sample_volume_adjoint(vals, pts, L)
    assert back.shape == (3, L, L, L) and back.dtype == F64
    lhs = (sample_volume(vol, pts) * vals).sum()
    torch.testing.assert_close(lhs, (vol * back).sum(), rtol=1e-12, atol=1e-12)


def test_slices_and_insertion_do_not_depend_on_the_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    L = 8
    vol = torch.randn(L, L, L, dtype=F64, generator=_gen(6))
    R = random_rotations(5, generator=_gen(7), dtype=F64)
    S = torch.randn(5, L, L, dtype=F64, generator=_gen(8))
    one = extract_central_slices(vol, R)
    inserted = insert_central_slices(S.float(), R, L)  # float32: ATen's kernel path
    monkeypatch.setattr(trilinear, "point_chunks", lambda *a, **k: 4)
    torch.testing.assert_close(extract_central_slices(vol, R), one, rtol=0, atol=0)
    torch.testing.assert_close(insert_central_slices(S.float(), R, L), inserted,
                               rtol=1e-6, atol=1e-5)


def test_chunk_count_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    big = 1 << 24
    # not on the CPU: the device's kernels already run in parallel over the points
    assert point_chunks(128**3, 4, big, meta, writes_volume=True) == 1
    # reading only: as many threads as have enough points each
    assert point_chunks(128**3, 4, big, cpu, writes_volume=False) == 4
    assert point_chunks(128**3, 4, 3 * (1 << 14), cpu, writes_volume=False) == 3
    assert point_chunks(128**3, 4, 100, cpu, writes_volume=False) == 1
    # writing a volume per chunk: bounded by the points per voxel ...
    vox = 128**3
    assert point_chunks(vox, 4, int(vox / 16 * 2), cpu, writes_volume=True) == 2
    assert point_chunks(vox, 4, vox // 32, cpu, writes_volume=True) == 1
    # ... and by the memory of the extra volumes (256 MiB: 4 float32 volumes of 256³)
    assert point_chunks(256**3, 4, big * 8, cpu, writes_volume=True) == 4
    assert point_chunks(512**3, 4, big * 64, cpu, writes_volume=True) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert point_chunks(128**3, 4, big, cpu, writes_volume=False) == 1
