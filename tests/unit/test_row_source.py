"""The row sources (:mod:`cryospin.train.row_source`): both satisfy the one protocol, give the
same rows for the same particles, and each draws its epoch exactly from the generator (the
in-memory permutation, the streamed chunk plan), whole or sharded. Values compared exactly
(``atol=0``): both preprocess with the same function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests._synthetic import make_dataset

from cryospin.io.particles import load_particles
from cryospin.sources import storage_layout
from cryospin.train.batches import Batch, batch_indices, num_batches
from cryospin.train.config import DataConfig
from cryospin.train.data import TrainingData, prepare_data
from cryospin.train.row_source import InMemoryRows, RowSource, StreamedRows
from cryospin.train.rows import HeldParticles
from cryospin.train.stream import StreamOptions, plan_epoch

L = 16
N = 53
BATCH = 12
OPTS = StreamOptions(chunk_images=8, window_chunks=2, prefetch_chunks=1)


@pytest.fixture(scope="module")
def lazy(tmp_path_factory) -> TrainingData:
    folder = tmp_path_factory.mktemp("rows")
    make_dataset(folder, box_px=L, n=N, seed=2, defocus="linspace", draw_order=("rotations",),
                 n_blobs=4)
    particles = load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")
    # shuffled: the storage order (the streamed chunks) is not the particle order
    particles = particles.subset(torch.randperm(N, generator=torch.Generator().manual_seed(1)))
    return prepare_data(particles, DataConfig(), preload=False)


@pytest.fixture(scope="module")
def eager(lazy) -> TrainingData:
    return lazy.in_memory()


def _same(got: Batch, ref: Batch) -> None:
    assert torch.equal(got.indices, ref.indices) and got.global_size == ref.global_size
    for name in ("images", "hartley", "ctf"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0)


def test_both_sources_satisfy_the_protocol(lazy, eager):
    assert isinstance(lazy.rows, StreamedRows) and isinstance(eager.rows, InMemoryRows)
    for data in (lazy, eager):
        assert isinstance(data.rows, RowSource)
        assert data.rows.held == HeldParticles(N)
    assert lazy.rows.resident is None and not lazy.preloaded
    assert eager.rows.resident is not None and eager.preloaded
    assert eager.images is eager.rows.resident.images and lazy.images is None
    # finishing is idempotent where it has nothing to do
    assert eager.rows.in_memory(4) is eager.rows and eager.rows.with_cache(None) is eager.rows
    assert lazy.rows.with_cache(lazy.config) is lazy.rows  # no cache folder configured


def test_both_sources_give_identical_batches_for_the_same_generator(lazy, eager):
    """The in-memory epoch's batches, asked of either source by index, are identical."""
    got = list(eager.epoch_batches(BATCH, torch.Generator().manual_seed(4)))
    order = list(batch_indices(N, BATCH, torch.Generator().manual_seed(4)))
    assert len(got) == len(order) == num_batches(N, BATCH)
    for batch, idx in zip(got, order, strict=True):
        _same(batch, eager.rows.batch(idx))
        _same(batch, lazy.rows.batch(idx))


def test_each_source_draws_its_epoch_from_the_generator(lazy, eager):
    """Streamed: the chunk plan drawn from the same generator, each batch's rows equal to the
    in-memory rows of its particles; both leave the generator as a resumed run finds it."""
    g_plan = torch.Generator().manual_seed(6)
    order, chunks = storage_layout(lazy.reader.stored, N, OPTS.chunk_images)
    plan = plan_epoch(order, chunks, BATCH, OPTS.window_chunks, g_plan)
    g_stream = torch.Generator().manual_seed(6)
    streamed = list(lazy.epoch_batches(BATCH, g_stream, OPTS))
    assert torch.equal(g_stream.get_state(), g_plan.get_state())
    assert [int(b.indices.numel()) for b in streamed] == plan.sizes
    assert torch.equal(torch.cat([b.indices for b in streamed]), plan.order)
    for batch in streamed:
        _same(batch, eager.batch(batch.indices))
    again = list(lazy.epoch_batches(BATCH, torch.Generator().manual_seed(6), OPTS))
    for a, b in zip(again, streamed, strict=True):
        _same(a, b)
    g_mem = torch.Generator().manual_seed(6)
    list(eager.epoch_batches(BATCH, g_mem))
    batch_indices(N, BATCH, g_check := torch.Generator().manual_seed(6))
    assert torch.equal(g_mem.get_state(), g_check.get_state())
    assert not np.array_equal(plan.order.numpy(), np.arange(N))


@pytest.mark.parametrize("source", ["in memory", "streamed"])
def test_sharded_sources_yield_their_part_of_each_global_batch(lazy, eager, source):
    whole = eager if source == "in memory" else lazy
    ref = list(whole.epoch_batches(BATCH, torch.Generator().manual_seed(8), OPTS))
    seen = []
    for rank in range(2):
        held = HeldParticles.of(torch.arange(rank, N, 2), N)
        rows = whole.rows.holding(held)
        assert isinstance(rows, RowSource) and type(rows) is type(whole.rows)
        assert rows.held == held
        parts = list(rows.epoch_batches(BATCH, torch.Generator().manual_seed(8), OPTS))
        for part, full in zip(parts, ref, strict=True):
            keep = held.holds(full.indices)
            _same(part, Batch(full.indices[keep], full.images[keep], full.hartley[keep],
                              full.ctf[keep], global_size=int(full.indices.numel())))
            seen.extend(part.indices.tolist())
        with pytest.raises(ValueError, match="not held"):
            rows.batch(torch.tensor([1 - rank]))
    assert sorted(seen) == list(range(N))


def test_held_particles_map_global_indices_to_rows():
    every = HeldParticles(5)
    assert not every.sharded and every.num_held == 5
    assert torch.equal(every.ids(), torch.arange(5))
    assert torch.equal(every.local_rows(torch.tensor([4, 0])), torch.tensor([4, 0]))
    held = HeldParticles.of(torch.tensor([7, 2, 7, 4]), 9)  # sorted, repeats dropped
    assert held.sharded and held.num_held == 3 and held.ids().tolist() == [2, 4, 7]
    assert held.holds(torch.tensor([2, 3, 7, 8])).tolist() == [True, False, True, False]
    assert held.local_rows(torch.tensor([7, 2, 4])).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"particles 3 \(1 of 2 requested\) are not held"):
        held.local_rows(torch.tensor([2, 3]))
    assert not HeldParticles.of(torch.tensor([], dtype=torch.int64), 4).holds(
        torch.tensor([0, 1])).any()
    with pytest.raises(ValueError, match="outside 0..8"):
        HeldParticles.of(torch.tensor([9]), 9)


def test_the_source_is_the_only_mode_switch(eager, lazy):
    """TrainingData keeps the shared metadata; the rows decide everything else."""
    assert eager.box_px == lazy.box_px and eager.reader is lazy.reader
    assert torch.equal(eager.frequencies, lazy.frequencies)
    assert eager.summary() == {**lazy.summary(), "preloaded": True}
    assert eager.source is not None and eager.source is lazy.source
