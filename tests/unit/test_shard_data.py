"""Sharded training data (distributed training without torchrun): a rank holds, reads and
preprocesses only its particles ``i mod W == rank``, and its epochs are the parts of the
single-process global batches.

The ranks are simulated in one process with hand-made ``Shard(WorldInfo(rank, W))`` objects
(nothing here is a collective). Values are compared exactly (``atol=0``): a held row is
preprocessed by the same function as in a single process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cryospin.forward.ctf import CTFParams
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.train import rows as rows_module
from cryospin.train.cache import open_cache
from cryospin.train.config import DataConfig
from cryospin.train.data import Batch, TrainingData, num_batches, prepare_data
from cryospin.train.distributed import Shard, WorldInfo
from cryospin.train.row_source import StreamedRows
from cryospin.train.stream import StreamOptions

L = 16
SIZES = (70, 47)  # two stacks
N = sum(SIZES)
OPTS = StreamOptions(chunk_images=16, window_chunks=2, prefetch_chunks=1)
BATCH = 20


def _ctf(n: int) -> CTFParams:
    f64 = {"dtype": torch.float64}
    d = torch.linspace(8000.0, 15000.0, n, **f64)
    return CTFParams(
        defocus_u_angstrom=d, defocus_v_angstrom=d.clone(),
        defocus_angle_deg=torch.zeros(n, **f64), voltage_kv=torch.full((n,), 300.0, **f64),
        cs_mm=torch.full((n,), 2.7, **f64), amplitude_contrast=torch.full((n,), 0.1, **f64),
        phase_shift_deg=torch.zeros(n, **f64), bfactor_a2=torch.zeros(n, **f64),
    )


def _shard(rank: int, world_size: int) -> Shard:
    return Shard(WorldInfo(rank=rank, local_rank=rank, world_size=world_size))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shard")
    g = torch.Generator().manual_seed(0)
    for k, n in enumerate(SIZES):
        write_stack(folder / f"s{k}.mrcs", torch.randn(n, L, L, generator=g) + 0.5, 4.0)
    (folder / "stacks.txt").write_text("s0.mrcs\ns1.mrcs\n")
    write_cryodrgn_ctf(folder / "ctf.pkl", _ctf(N), L, 4.0)
    return folder


@pytest.fixture(scope="module")
def lazy(dataset) -> TrainingData:
    """Particles in a shuffled order, so the storage order (by stack and image) is not the
    particle order and a chunk's owned particles are irregular."""
    particles = load_particles(dataset / "stacks.txt", ctf_pkl=dataset / "ctf.pkl")
    particles = particles.subset(torch.randperm(N, generator=torch.Generator().manual_seed(5)))
    return prepare_data(particles, DataConfig(), preload=False)


@pytest.fixture(scope="module")
def eager(lazy) -> TrainingData:
    return lazy.in_memory()


@pytest.fixture
def preprocessed(monkeypatch) -> list[int]:
    """Every particle index handed to the preprocessing function, in order."""
    seen: list[int] = []
    real = rows_module.preprocess_rows

    def counting(particles, idx, *args, **kwargs):
        seen.extend(int(i) for i in idx)
        return real(particles, idx, *args, **kwargs)

    monkeypatch.setattr(rows_module, "preprocess_rows", counting)
    return seen


def _assert_same_rows(got: Batch, ref: Batch) -> None:
    assert torch.equal(got.indices, ref.indices)
    for name in ("images", "hartley", "ctf"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0)


# ----------------------------------------------------------------------------- row map


def test_row_map_of_a_shard_maps_global_indices_to_held_rows_and_refuses_others(lazy, eager):
    shard = _shard(1, 3)
    owned = shard.owned(N)  # 1, 4, 7, ...
    data = eager.holding(owned)  # from the whole preloaded data: keep the owned rows
    assert data.rows.held.sharded and data.rows.held.num_held == owned.numel() \
        == len(range(1, N, 3))
    assert len(data) == N  # global indices throughout
    assert data.images.shape == (owned.numel(), L, L)
    assert torch.equal(data.rows.held.local_rows(torch.tensor([1, 4, 7, 13, 4])),
                       torch.tensor([0, 1, 2, 4, 1]))
    assert torch.equal(data.rows.held.holds(torch.tensor([0, 1, 2, 3, 4])),
                       torch.tensor([False, True, False, False, True]))
    idx = torch.tensor([owned[-1], 1, 10])
    _assert_same_rows(data.batch(idx), eager.batch(idx))
    with pytest.raises(ValueError, match=r"particles 3, 5 \(2 of 3 requested\) are not held"):
        data.batch(torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="not held"):
        lazy.holding(owned).batch(torch.tensor([0]))  # lazy sharded data refuse too
    assert not data.unsharded().rows.held.sharded and not data.unsharded().preloaded
    _assert_same_rows(data.unsharded().batch(torch.tensor([0, 2])),
                      eager.batch(torch.tensor([0, 2])))  # reads any particle lazily
    assert eager.unsharded() is eager and eager.holding(None) is eager
    with pytest.raises(ValueError, match="outside"):
        lazy.holding(torch.tensor([N]))


# ----------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("world_size", [2, 3])
def test_in_memory_shard_preprocesses_and_holds_only_owned_rows(lazy, eager, preprocessed,
                                                                world_size):
    held_rows = []
    for rank in range(world_size):
        shard = _shard(rank, world_size)
        preprocessed.clear()
        data = lazy.holding(shard.owned(N)).in_memory()
        expected = list(range(rank, N, world_size))
        assert sorted(preprocessed) == expected  # each owned particle once, nothing else
        assert data.images.shape[0] == data.hartley.shape[0] == data.ctf.shape[0] \
            == len(expected) <= -(-N // world_size)
        _assert_same_rows(data.batch(shard.owned(N)), eager.batch(shard.owned(N)))
        held_rows.append(len(expected))
    assert sum(held_rows) == N


# ----------------------------------------------------------------------------- epochs


def _check_epoch_parts(whole: TrainingData, parts: list[TrainingData], options, seed: int):
    """Every rank's epoch is its part of each global batch of the single-process epoch, with
    the same draws from the generator."""
    gen = torch.Generator().manual_seed(seed)
    ref = list(whole.epoch_batches(BATCH, gen, options))
    assert len(ref) == num_batches(N, BATCH)
    W = len(parts)
    for rank, data in enumerate(parts):
        g = torch.Generator().manual_seed(seed)
        got = list(data.epoch_batches(BATCH, g, options))
        assert torch.equal(g.get_state(), gen.get_state())  # same draws: resume stays exact
        assert len(got) == len(ref)
        for mine, full in zip(got, ref, strict=True):
            assert mine.global_size == full.indices.numel()
            keep = _shard(rank, W).owns(full.indices)
            expected = Batch(full.indices[keep], full.images[keep], full.hartley[keep],
                             full.ctf[keep])
            _assert_same_rows(mine, expected)
            # the trainer's view: the part passes through with the global batch size
            [(part, total)] = list(_shard(rank, W).local_batches([mine]))
            assert part is mine and total == full.indices.numel()


def test_in_memory_sharded_epochs_are_the_parts_of_the_global_batches(lazy, eager):
    parts = [lazy.holding(_shard(r, 2).owned(N)).in_memory() for r in range(2)]
    _check_epoch_parts(eager, parts, None, seed=3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_streamed_sharded_epochs_preprocess_only_owned_rows(lazy, preprocessed, world_size):
    parts = [lazy.holding(_shard(r, world_size).owned(N)).streaming()
             for r in range(world_size)]
    for rank, data in enumerate(parts):
        preprocessed.clear()
        batches = list(data.epoch_batches(BATCH, torch.Generator().manual_seed(9), OPTS))
        assert sorted(preprocessed) == list(range(rank, N, world_size))  # owned rows, once
        got = torch.cat([b.indices for b in batches])
        assert sorted(got.tolist()) == list(range(rank, N, world_size))
    _check_epoch_parts(lazy, parts, OPTS, seed=9)


def test_streamed_sharded_epochs_from_the_cache_read_owned_rows(lazy, preprocessed,
                                                                 tmp_path, monkeypatch):
    cache = open_cache(lazy.reader, lazy.config, tmp_path)  # built by one process (all rows)
    assert isinstance(lazy.rows, StreamedRows)
    whole = dataclasses.replace(lazy, rows=dataclasses.replace(lazy.rows, cache=cache))
    read_rows: list[int] = []
    real_read = type(cache).read

    def counting(self, start, stop, keep=None):
        rows = real_read(self, start, stop, keep)
        read_rows.append(int(rows[0].shape[0]))
        return rows

    monkeypatch.setattr(type(cache), "read", counting)
    parts = [whole.holding(_shard(r, 2).owned(N)) for r in range(2)]
    preprocessed.clear()
    for rank, data in enumerate(parts):
        read_rows.clear()
        list(data.epoch_batches(BATCH, torch.Generator().manual_seed(4), OPTS))
        assert sum(read_rows) == len(range(rank, N, 2))
    assert preprocessed == []  # the cache holds the preprocessed rows
    _check_epoch_parts(whole, parts, OPTS, seed=4)


def test_local_batches_refuse_a_part_of_another_rank():
    batch = Batch(torch.tensor([0, 2]), torch.zeros(2, L, L), torch.zeros(2, 3), None,
                  global_size=5)
    assert list(_shard(0, 2).local_batches([batch]))[0][1] == 5
    with pytest.raises(ValueError, match="another rank"):
        list(_shard(1, 2).local_batches([batch]))
