"""The streaming loader (:mod:`cryospin.train.stream`): coverage, determinism, contiguous reads,
the prefetch thread's life cycle, the float16 cache, and a training run that streams."""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._synthetic import ctf_params, make_dataset

from cryospin.errors import InputError
from cryospin.forward.ctf import CTFParams
from cryospin.io import mrc
from cryospin.io.mrc import write_stack
from cryospin.io.particles import load_particles
from cryospin.io.pkl import write_cryodrgn_ctf
from cryospin.sources import storage_layout
from cryospin.train.batches import batch_sizes
from cryospin.train.cache import PreprocessedCache, open_cache
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import TrainingData, num_batches, prepare_data
from cryospin.train.row_source import StreamedRows
from cryospin.train.rows import RowReader
from cryospin.train.stream import StreamOptions

L = 16
SIZES = (100, 60)  # two stacks
N = sum(SIZES)
OPTS = StreamOptions(chunk_images=16, window_chunks=2, prefetch_chunks=1)


def _ctf(n: int) -> CTFParams:
    return ctf_params(torch.linspace(8000.0, 15000.0, n, dtype=torch.float64))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two stacks listed in ``stacks.txt`` and a ``ctf.pkl``; random images."""
    folder = tmp_path_factory.mktemp("stream")
    g = torch.Generator().manual_seed(0)
    for k, n in enumerate(SIZES):
        write_stack(folder / f"s{k}.mrcs", torch.randn(n, L, L, generator=g) + 0.5, 4.0)
    (folder / "stacks.txt").write_text("s0.mrcs\ns1.mrcs\n")
    write_cryodrgn_ctf(folder / "ctf.pkl", _ctf(N), L, 4.0)
    return folder


def _particles(folder: Path):
    return load_particles(folder / "stacks.txt", ctf_pkl=folder / "ctf.pkl")


@pytest.fixture(scope="module")
def lazy(dataset) -> TrainingData:
    data = prepare_data(_particles(dataset), DataConfig(), preload=False)
    assert not data.preloaded
    return data


@pytest.fixture(scope="module")
def eager(lazy) -> TrainingData:
    return lazy.in_memory()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cryospin-prefetch" and t.is_alive()]


def _wait_no_threads(timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        gc.collect()
        if not _prefetch_threads():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- order


def test_layout_sorts_by_stack_and_never_crosses_a_stack(lazy):
    order, chunks = storage_layout(lazy.source, N, 16)
    assert sorted(order.tolist()) == list(range(N))
    assert chunks[0] == (0, 16) and chunks[-1][1] == N
    assert (96, 100) in chunks and (100, 116) in chunks and not any(a < 100 < b for a, b in chunks)
    assert len(chunks) == math.ceil(100 / 16) + math.ceil(60 / 16)


@pytest.mark.parametrize("n,b", [(160, 24), (161, 32), (5, 8), (33, 32), (64, 32)])
def test_batch_sizes_match_num_batches(n, b):
    sizes = batch_sizes(n, b)
    assert sum(sizes) == n and len(sizes) == num_batches(n, b) and min(sizes) >= min(n, 2)


def test_every_particle_once_deterministic_and_new_order_each_epoch(lazy):
    gen = torch.Generator().manual_seed(7)
    first = [b.indices for b in lazy.epoch_batches(24, gen, OPTS)]
    second = [b.indices for b in lazy.epoch_batches(24, gen, OPTS)]
    for epoch in (first, second):
        assert len(epoch) == num_batches(N, 24)
        assert sorted(torch.cat(epoch).tolist()) == list(range(N))
    assert not torch.equal(torch.cat(first), torch.cat(second))
    again = [b.indices for b in lazy.epoch_batches(24, torch.Generator().manual_seed(7), OPTS)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # the generator advances exactly as much as the epoch drew (resume is exact)
    gen2 = torch.Generator().manual_seed(7)
    lazy.epoch_batches(24, gen2, OPTS)  # drawn at creation, never iterated
    lazy.epoch_batches(24, gen2, OPTS)
    assert torch.equal(gen.get_state(), gen2.get_state())
    assert _wait_no_threads()


def test_streamed_batches_equal_the_preloaded_rows(lazy, eager):
    gen = torch.Generator().manual_seed(1)
    for batch in lazy.epoch_batches(40, gen, OPTS):
        ref = eager.batch(batch.indices)
        for name in ("images", "hartley", "ctf"):
            torch.testing.assert_close(getattr(batch, name), getattr(ref, name), rtol=0, atol=0)


def test_preloaded_epochs_keep_the_batch_indices_permutation(eager):
    from cryospin.train.data import batch_indices

    got = [b.indices for b in eager.epoch_batches(32, torch.Generator().manual_seed(3))]
    want = list(batch_indices(N, 32, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_batch_mixes_several_chunks(lazy):
    order, chunks = storage_layout(lazy.source, N, OPTS.chunk_images)
    rank = np.empty(N, np.int64)
    rank[order] = np.arange(N)
    chunk_of = np.searchsorted([a for a, _ in chunks], rank, side="right") - 1
    gen = torch.Generator().manual_seed(2)
    spread = [len(set(chunk_of[b.indices.numpy()].tolist()))
              for b in lazy.epoch_batches(16, gen, OPTS)]
    assert max(spread) >= 2


# ----------------------------------------------------------------------------- reads


def test_reads_are_contiguous_chunks_from_cached_stacks(lazy, monkeypatch):
    calls: list[np.ndarray] = []
    opened: list[str] = []
    real_read, real_init = mrc.ImageStack.read, mrc.ImageStack.__init__

    def counting_read(self, indices=None):
        calls.append(np.atleast_1d(np.asarray(indices)).copy())
        return real_read(self, indices)

    def counting_init(self, path):
        opened.append(str(path))
        real_init(self, path)

    monkeypatch.setattr(mrc.ImageStack, "read", counting_read)
    monkeypatch.setattr(mrc.ImageStack, "__init__", counting_init)
    batches = list(lazy.epoch_batches(24, torch.Generator().manual_seed(0), OPTS))
    _, chunks = storage_layout(lazy.source, N, OPTS.chunk_images)
    assert len(calls) == len(chunks)  # one read per chunk, not per image or per batch
    assert all(bool(np.all(np.diff(c) == 1)) for c in calls)  # consecutive images
    assert sum(len(c) for c in calls) == N and len(batches) == num_batches(N, 24)
    assert len(opened) <= len(SIZES)  # stacks come from open_stack's cache


# ----------------------------------------------------------------------------- prefetch thread


def test_thread_stops_when_the_consumer_stops_early(lazy):
    it = lazy.epoch_batches(8, torch.Generator().manual_seed(0), OPTS)
    next(it)
    assert _prefetch_threads()
    it.close()
    assert _wait_no_threads()

    it = lazy.epoch_batches(8, torch.Generator().manual_seed(0), OPTS)
    for _ in it:
        break
    del it  # dropped: the generator's finally stops the thread
    assert _wait_no_threads()


def test_thread_stops_when_the_consumer_raises(lazy):
    def consume():
        for b, _batch in enumerate(lazy.epoch_batches(8, torch.Generator().manual_seed(0),
                                                      OPTS)):
            if b == 2:
                raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        consume()
    assert _wait_no_threads()


def test_loader_errors_reach_the_consumer_and_stop_the_thread(lazy, monkeypatch):
    calls = {"n": 0}
    real = RowReader.read

    def failing(self, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise InputError("particle images near index 3 contain NaN or Inf", "x.mrcs")
        return real(self, indices)

    monkeypatch.setattr(RowReader, "read", failing)
    with pytest.raises(InputError, match="NaN or Inf"):
        list(lazy.epoch_batches(8, torch.Generator().manual_seed(0), OPTS))
    assert _wait_no_threads()


def test_full_epoch_leaves_no_thread(lazy):
    batches = list(lazy.epoch_batches(50, torch.Generator().manual_seed(0), OPTS))
    assert len(batches) == num_batches(N, 50)
    assert _wait_no_threads()


# ----------------------------------------------------------------------------- cache


def _cache(data: TrainingData) -> PreprocessedCache:
    """The float16 cache the streamed rows of ``data`` read (asserts there is one)."""
    assert isinstance(data.rows, StreamedRows) and data.rows.cache is not None
    return data.rows.cache


def _assert_f16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)


def test_cache_round_trip_in_float16_and_reuse(dataset, eager, tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    data = prepare_data(_particles(dataset), cfg, preload=False).streaming()
    cache = _cache(data)
    folder = cache.folder
    assert cache.images.dtype == np.float16 and cache.hartley.dtype == np.float16
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    seen = []
    for batch in data.epoch_batches(32, torch.Generator().manual_seed(0), OPTS):
        ref = eager.batch(batch.indices)
        for name in ("images", "hartley", "ctf"):
            _assert_f16_close(getattr(batch, name), getattr(ref, name))
        seen.append(batch.indices)
    assert sorted(torch.cat(seen).tolist()) == list(range(N))
    # same inputs: the cache is reused, not rewritten
    again = prepare_data(_particles(dataset), cfg, preload=False).streaming()
    assert _cache(again).folder == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    # the streamed order does not depend on the cache
    plain = [b.indices for b in eager.epoch_batches(32, torch.Generator().manual_seed(0))]
    assert len(plain) == len(seen)


def test_cache_is_invalidated_when_inputs_or_config_change(dataset, tmp_path):
    root = tmp_path / "cache"
    base = prepare_data(_particles(dataset), DataConfig(cache_dir=str(root)), preload=False)
    first = _cache(base.streaming()).folder
    # preprocessing configuration changed: another cache
    inverted = prepare_data(_particles(dataset),
                            DataConfig(cache_dir=str(root), invert_contrast=True), preload=False)
    cache_inv = _cache(inverted.streaming())
    assert cache_inv.folder != first
    assert float(cache_inv.images[0, 0, 0]) == pytest.approx(
        -float(np.load(first / "images.npy")[0, 0, 0]), rel=1e-3)
    # a settings change that does not change the values keeps the cache
    same = prepare_data(_particles(dataset),
                        DataConfig(cache_dir=str(root), max_preload_gb=1.0), preload=False)
    assert _cache(same.streaming()).folder == first
    # an interrupted build (no meta.json) is rebuilt
    (first / "meta.json").unlink()
    rebuilt = _cache(base.streaming())
    assert (first / "meta.json").is_file() and len(rebuilt) == N
    # the stack file rewritten: another key
    copy = tmp_path / "moved"
    copy.mkdir()
    for name in ("s0.mrcs", "s1.mrcs", "stacks.txt", "ctf.pkl"):
        (copy / name).write_bytes((dataset / name).read_bytes())
    g = torch.Generator().manual_seed(5)
    write_stack(copy / "s1.mrcs", torch.randn(SIZES[1], L, L, generator=g), 4.0)
    other = prepare_data(_particles(copy), DataConfig(cache_dir=str(root)), preload=False)
    assert _cache(other.streaming()).folder != first


def test_cache_of_a_source_without_stacks_is_skipped(lazy, tmp_path):
    import dataclasses

    class Plain:
        pass

    reader = dataclasses.replace(lazy.reader, stored=Plain())
    assert open_cache(reader, lazy.config, tmp_path) is None


# ----------------------------------------------------------------------------- training


def _simulated(folder: Path, n: int = 128) -> Path:
    """Blob volume, random poses, CTF and noise (SNR 1) in ``particles.mrcs`` + ``ctf.pkl``."""
    make_dataset(folder, box_px=L, n=n, seed=11, defocus="linspace", draw_order=("rotations",),
                 n_blobs=5)
    return folder


def _tiny_config(data: dict):
    return build_config("default", {
        "model": {"num_heads": 3, "width_multiplier": 0.125, "head_hidden": 32,
                  "precision": "fp32"},
        "optim": {"batch_size": 32, "encoder_lr": 1e-3, "search_rotations": 256,
                  "search_radius_px": 3.0},
        "schedule": {"epochs": 3, "switch_epoch": 1, "search_epochs": 1},
        "run": {"device": "cpu", "num_threads": 1, "seed": 3, "progress": False,
                "keep_epoch_maps": False},
        "data": data,
    })


def test_streaming_training_run_matches_the_in_memory_run(tmp_path, caplog):
    """Same data, same seed: the streamed run visits particles in another order, so it is
    not bitwise equal; it must finish and reach a per-epoch loss within 5 % of the in-memory
    run's (the NLL per image, which measures how well map and poses explain the data)."""
    from cryospin.rundir import read_metrics
    from cryospin.train.fit import fit

    folder = _simulated(tmp_path / "data")
    particles = load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")
    caplog.set_level("INFO", logger="cryospin.train.memory")
    ref = fit(_tiny_config({}), particles, tmp_path / "mem")
    assert "loader: in-memory" in caplog.text
    caplog.clear()
    streamed = fit(_tiny_config({"max_preload_gb": 0.0, "cache_dir": str(tmp_path / "c")}),
                   particles, tmp_path / "stream")
    assert "loader: streaming" in caplog.text and "| total" not in caplog.text.split("loader")[1]
    assert ref.finished and streamed.finished
    a, b = read_metrics(ref.run_dir / "metrics.jsonl"), read_metrics(
        streamed.run_dir / "metrics.jsonl")
    for ra, rb in zip(a, b, strict=True):
        assert rb["num_images"] == ra["num_images"] == 128
        assert rb["loss"] == pytest.approx(ra["loss"], rel=0.05)
    assert a[-1]["loss"] < a[0]["loss"] and b[-1]["loss"] < b[0]["loss"]
    from cryospin.io.mrc import read_map

    assert np.isfinite(read_map(streamed.map_path)[0]).all()
    assert _wait_no_threads()


def test_a_budget_below_the_streaming_plan_stops_before_training(tmp_path):
    from cryospin.train.fit import fit

    folder = _simulated(tmp_path / "data", n=64)
    particles = load_particles(folder / "particles.mrcs", ctf_pkl=folder / "ctf.pkl")
    with pytest.raises(InputError, match="smaller --batch-size or --box"):
        fit(_tiny_config({"max_memory_gb": 0.01}), particles, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert os.path.isdir(tmp_path / "run")


def test_prepare_data_hands_back_the_pages_of_its_statistics_sample(dataset, monkeypatch):
    """The spread-out statistics sample is read in small groups whose pages are released (a
    fault on a memory-mapped stack can map a whole page-cache folio; measured: 2,000 sample
    images of a 2.3 GB stack made all of it resident), and so is the contrast check's."""
    import cryospin.train.data as data_module
    from cryospin.preprocess import sample_contrast
    from cryospin.train.data import _SAMPLE_CHUNK, _stats_indices

    released: list[np.ndarray] = []
    original = data_module.release_pages
    monkeypatch.setattr(data_module, "release_pages",
                        lambda source, idx: (released.append(np.asarray(idx)),
                                             original(source, idx))[1])
    particles = _particles(dataset)
    prepare_data(particles, DataConfig(), preload=False)
    sample = _stats_indices(len(particles)).numpy()
    done = np.concatenate(released)
    assert set(sample.tolist()) <= set(done.tolist())  # every sample image handed back
    assert max(len(r) for r in released) <= _SAMPLE_CHUNK

    calls: list[np.ndarray] = []
    monkeypatch.setattr(type(particles), "release_pages",
                        lambda self, idx: calls.append(np.asarray(idx)))
    check = sample_contrast(particles)
    assert sum(len(c) for c in calls) == check.num_images


def test_the_prefetch_thread_runs_its_kernels_on_one_openmp_thread() -> None:
    """The streaming loader's background thread adds one compute thread beside the training's
    team, not a second team (OpenMP's per-thread limit); the main thread keeps its threads."""
    import threading

    from cryospin.train import stream

    lib = stream._torch_openmp_runtime()
    if lib is None:
        pytest.skip("this torch build ships no OpenMP runtime")
    before = int(lib.omp_get_max_threads())
    seen: list[int] = []

    def worker() -> None:
        assert stream.limit_openmp_threads_of_this_thread(1)
        seen.append(int(lib.omp_get_max_threads()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1]
    assert int(lib.omp_get_max_threads()) == before
