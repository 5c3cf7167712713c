"""Distributed training (``torchrun``, gloo on CPU) equals single-process training.

:mod:`cryospin.train.distributed` is designed so that ``W`` ranks compute the same run as one
process: the same global batches (same seeded permutation, each rank keeping the particles it
owns), gradients averaged so that they are those of the global batch mean, batch norm on the
global batch. So the comparison here is not statistical (FSC, median pose error): the maps of
a 2-rank and a 1-rank run must agree to float32 round-off.

Tolerances (float32 training; the reduction order differs: per-rank sums, all-reduce):
maps ``max |a − b| ≤ 1e-3 · max |a|``; poses: median difference ≤ 1e-3° and at least 99 % of
the particles within 0.01°. Measured on this data: maps 2.4e-7, poses max 3e-5°. Why not
"every pose": the per-row Adam of the pose table divides a row's gradient by its running RMS,
so for a particle whose gradient is near zero, round-off in the gradient becomes a step of
order the learning rate (seen once in 200 particles on another dataset: 0.5° after a local
epoch, final map 1.5e-4). Another batch order or per-rank batch-norm statistics change the
poses by degrees and the maps by percents, so these bounds still separate "the same run" from
"another run" by orders of magnitude.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cryospin.io.mrc import read_map
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.io.star_tables import numbers, read_star_tables
from cryospin.rotations import geodesic_distance_deg
from cryospin.rundir import load_checkpoint, read_metrics
from cryospin.train.starts import starts_of

BOX_PX, N_PARTICLES = 16, 200
# 1 auto-encoding epoch, the switch, 1 search epoch, 1 local epoch. The copy consensus (on
# as auto in the default preset) is off except in its own test: on these 16 px maps its
# discrete choices (the group's placement, copies near a tie) follow the last bits of a map
# that one and two processes round differently, so the runs could part after it
TRAIN = ["--epochs", "3", "--switch-epoch", "1", "--search-epochs", "1",
         "--heads", "2", "--width", "0.125", "--no-bf16", "--batch-size", "50",
         "--search-rotations", "128", "--search-radius", "3", "--device", "cpu",
         "--threads", "1", "--no-progress", "--seed", "11", "--copy-consensus", "off"]
MAP_RTOL = 1e-3
POSE_TOL_DEG = 0.01  # for 99 % of the particles
POSE_MEDIAN_TOL_DEG = 1e-3


def run_cryospin(argv: list[str], *, nproc: int | None = None,
                 timeout: float = 240.0) -> subprocess.CompletedProcess:
    """``cryospin reconstruct ARGV``: one process, or ``nproc`` ranks under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [sys.executable]
    if nproc is not None:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(nproc)]
    cmd = [*launch, "-m", "cryospin.cli.main", "reconstruct", *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung collective fails the test, never blocks it
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_same_map(a: Path, b: Path) -> None:
    x, y = read_map(a)[0].astype(np.float64), read_map(b)[0].astype(np.float64)
    err = np.abs(x - y).max() / np.abs(x).max()
    assert err <= MAP_RTOL, f"{a.name}: relative difference {err:.3g}"


def assert_same_poses(a: Path, b: Path) -> None:
    rot_a, shift_a = read_cryodrgn_poses(a, BOX_PX)
    rot_b, shift_b = read_cryodrgn_poses(b, BOX_PX)
    angle = geodesic_distance_deg(rot_a.double(), rot_b.double())  # (N,)
    assert float(angle.median()) <= POSE_MEDIAN_TOL_DEG, f"median {float(angle.median())}°"
    close = float((angle <= POSE_TOL_DEG).double().mean())
    assert close >= 0.99, f"only {close:.1%} of the poses within {POSE_TOL_DEG}°"
    shift_close = (shift_a.double() - shift_b.double()).norm(dim=-1) <= 1e-3  # (N,)
    assert float(shift_close.double().mean()) >= 0.99


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    """200 simulated particles of the bundled 6VYB, 16 px, CTF, SNR 1."""
    from cryospin.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("sim")
    simulate_dataset("bundled:6vyb", folder, n_particles=N_PARTICLES, box_px=BOX_PX,
                     pixel_size_angstrom=16.0, snr=1.0, seed=0)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def reference(particles, tmp_path_factory) -> Path:
    """The single-process run, 3 epochs, never stopped."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert_ok(run_cryospin([str(particles), "-o", str(run), *TRAIN]))
    return run


# ----------------------------------------------------------------------------- tests


def test_collectives_match_one_process(tmp_path):
    """Float64, 2 ranks: GlobalBatchNorm2d (output, input and weight gradients, running
    statistics) equals BatchNorm2d on the union of the ranks' inputs; sharded objectives with
    averaged gradients equal the gradient of the global mean; gather_rows reassembles rows;
    teardown after a normal end waits at a barrier for the last rank."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent("""
        import os
        import torch, torch.distributed as dist
        from torch import nn
        from cryospin.train.distributed import (Shard, convert_batch_norm, world_from_env)
        torch.set_default_dtype(torch.float64)
        world = world_from_env()
        dist.init_process_group("gloo")
        shard = Shard(world)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(7, 3, 4, 5, generator=g) * 3 + 1  # the global batch
        idx = torch.arange(7)
        mine = shard.owns(idx)
        ref_bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            ref_bn.weight.uniform_(0.5, 2, generator=g); ref_bn.bias.normal_(generator=g)
        bn = convert_batch_norm(nn.Sequential(nn.BatchNorm2d(3)))
        bn.load_state_dict(nn.Sequential(ref_bn).state_dict())
        w = torch.randn(7, 3, 4, 5, generator=g)  # loss weights
        xr = x.clone().requires_grad_(True)
        ref_out = ref_bn(xr)  # one training step of the reference
        (ref_out * w).sum().backward()
        xl = x[mine].clone().requires_grad_(True)
        out = bn(xl)
        (out * w[mine]).sum().backward()  # sum of the ranks' terms is the global sum
        assert torch.allclose(out, ref_out[mine].detach(), atol=1e-12), "bn output"
        assert torch.allclose(xl.grad, xr.grad[mine], atol=1e-12), "bn input gradient"
        gw = shard.all_sum(bn[0].weight.grad)
        assert torch.allclose(gw, ref_bn.weight.grad, atol=1e-12), "bn weight gradient"
        assert torch.allclose(bn[0].running_var, ref_bn.running_var, atol=1e-12)
        assert torch.allclose(bn[0].running_mean, ref_bn.running_mean, atol=1e-12)
        # objective: W * sum_local / B averaged over ranks == grad of the global mean
        theta = torch.randn(3, generator=g, requires_grad=True)
        loss = lambda rows: (rows.flatten(1)[:, :3] @ theta).square()  # per-image (B,)
        ref = torch.autograd.grad(loss(x).mean(), theta)[0]
        shard.objective(loss(x[mine]), 7).backward()
        shard.average_gradients([theta])
        assert torch.allclose(theta.grad, ref, atol=1e-12), "averaged gradient"
        # gather_rows: rank r's copy is valid on its own rows only
        full = torch.arange(7.0)[:, None].repeat(1, 2)
        local = torch.where(mine[:, None], full, torch.full_like(full, -1.0))
        got = shard.gather_rows(local)
        if world.is_main:
            assert torch.equal(got, full), got
        else:
            assert got is None
        # teardown after a normal end waits for every rank: rank 1 leaves only when rank 0
        # (which writes the checkpoint after the others are done) arrives
        import time
        from cryospin.train.distributed import teardown_distributed
        if world.is_main:
            time.sleep(1.0)
        t0 = time.perf_counter()
        teardown_distributed(True, synchronise=True)
        if not world.is_main:
            waited = time.perf_counter() - t0
            assert waited >= 0.5, "left %.2f s after arriving, before rank 0" % waited
        assert not dist.is_initialized()
        # one write per rank: the ranks share the pipe, and print()'s separate writes of
        # the words and the newline interleaved (observed output: okok 0 / 1)
        os.write(1, ("ok %d" % world.rank + chr(10)).encode())
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", str(script)], env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ok 0" in proc.stdout and "ok 1" in proc.stdout


def test_teardown_frees_the_process_group_after_an_optimiser_was_built(tmp_path):
    """After :func:`teardown_distributed` no gloo thread is left running, even when
    ``torch.optim`` was first used after the group existed (its first optimiser imports
    torch._dynamo and with it ``torch.distributed.nn``, whose default arguments used to keep the
    default group alive: its threads then ran until interpreter exit, which now and then aborted
    with SIGABRT after a run had written its outputs). Linux: threads read from /proc."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to list the process's threads")
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent("""
        import os
        import torch
        from cryospin.train.distributed import (init_distributed, teardown_distributed,
                                                world_from_env)
        from cryospin.train.optimizer import adam

        def gloo_threads():
            names = []
            for task in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{task}/comm") as f:
                        names.append(f.read().strip())
                except OSError:  # a thread that ended meanwhile
                    pass
            return sorted(n for n in names if "gloo" in n)

        world = world_from_env()
        created = init_distributed(world, torch.device("cpu"))
        assert created
        adam([torch.nn.Parameter(torch.zeros(3))], 0.1)
        x = torch.ones(3)
        torch.distributed.all_reduce(x)
        during = gloo_threads()
        teardown_distributed(created, synchronise=True)
        after = gloo_threads()
        assert during, "no gloo thread found while the group exists: cannot check"
        assert not after, f"rank {world.rank}: left running after teardown: {after}"
        os.write(1, ("ok %d" % world.rank + chr(10)).encode())
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", str(script)], env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ok 0" in proc.stdout and "ok 1" in proc.stdout


def test_two_ranks_then_resumed_on_one_equal_one_process(particles, reference, tmp_path):
    """2 ranks for the auto-encoding epoch, the switch and the search epoch; then the run is
    resumed by a single process: every map and the final poses equal the 1-process run's."""
    run = tmp_path / "run"
    proc = run_cryospin([str(particles), "-o", str(run), *TRAIN, "--stop-after", "2"],
                        nproc=2)
    assert_ok(proc)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone writes
    ref_rows = read_metrics(reference / "metrics.jsonl")
    for mine, ref in zip(rows, ref_rows, strict=False):
        assert mine["num_images"] == ref["num_images"] == N_PARTICLES
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert mine["head_usage"] == pytest.approx(ref["head_usage"], abs=1e-6)
        if ref.get("jump_fraction") is not None:  # summed over the ranks like the loss
            assert mine["jump_fraction"] == pytest.approx(ref["jump_fraction"], abs=0.01)
    for epoch in (1, 2):
        assert_same_map(reference / f"map.{epoch:03d}.mrc", run / f"map.{epoch:03d}.mrc")
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["pose_table"]["rotations"].shape == (N_PARTICLES, 3, 3)  # every rank's rows
    assert state["pose_table"]["step"].min() >= 1  # every row refined (by its owner)

    assert_ok(run_cryospin(["--resume", str(run)]))
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert_same_map(reference / "map.003.mrc", run / "map.003.mrc")
    assert_same_map(reference / "map.mrc", run / "map.mrc")
    assert_same_poses(reference / "poses.pkl", run / "poses.pkl")


def test_a_relaxed_run_on_two_ranks_equals_one_process(particles, tmp_path):
    """``--relax-symmetry C3`` (:mod:`cryospin.train.relax`): every rank places the group on
    the same volume and takes rank 0's frame, each moves its own rows to their best copy, and
    the fraction moved is summed over the ranks: maps, poses and records are the 1-process
    run's."""
    relax = [*TRAIN, "--search-epochs", "0", "--relax-symmetry", "C3"]  # the copies decide
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cryospin([str(particles), "-o", str(one), *relax]))
    assert_ok(run_cryospin([str(particles), "-o", str(two), *relax], nproc=2))
    a, b = (read_metrics(run / "metrics.jsonl") for run in (one, two))
    assert [r["epoch"] for r in b] == [1, 2, 3] and "relax" not in b[0]["extra"]
    moved = [r["extra"]["relax"]["moved_fraction"] for r in a[1:]]
    assert moved[0] > 0  # the bundled trimer at 16 px: some particles change copy
    assert [r["extra"]["relax"]["moved_fraction"] for r in b[1:]] == pytest.approx(moved,
                                                                                   abs=0.01)
    for x, y in zip(a[1:], b[1:], strict=True):
        assert y["extra"]["relax"]["score"] == pytest.approx(x["extra"]["relax"]["score"],
                                                             abs=1e-4)
    assert_same_map(one / "map.mrc", two / "map.mrc")
    assert_same_poses(one / "poses.pkl", two / "poses.pkl")


@pytest.mark.slow
def test_one_rank_then_resumed_on_two_equal_one_process(particles, reference, tmp_path):
    """Stage 1 by one process, then the switch, both auto-decoding epochs and the final
    outputs (rank 0, from the gathered poses) on 2 ranks."""
    run = tmp_path / "run"
    assert_ok(run_cryospin([str(particles), "-o", str(run), *TRAIN, "--stop-after", "1"]))
    proc = run_cryospin(["--resume", str(run)], nproc=2)
    assert_ok(proc)
    assert proc.stdout.count("done: 3 epochs") == 1  # rank 0 alone reports
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    for name in ("map.002.mrc", "map.003.mrc", "map_decoder.mrc", "map.mrc"):
        assert_same_map(reference / name, run / name)
    assert_same_poses(reference / "poses.pkl", run / "poses.pkl")
    track = np.load(run / "pose_track.npz")
    ref_track = np.load(reference / "pose_track.npz")
    for key in ref_track.files:
        if ref_track[key].dtype.kind == "f":
            np.testing.assert_allclose(track[key], ref_track[key], rtol=1e-3, atol=1e-3)


def test_each_rank_holds_and_preprocesses_only_its_particles(particles, tmp_path):
    """Under torchrun (2 ranks), ``plan_and_load`` with the shard: in memory, a rank
    preprocesses and holds exactly its particles ``i mod 2 == rank`` (N/2 rows); streaming,
    nothing is preprocessed up front and an epoch preprocesses exactly those particles, in the
    parts of the same global batches on both ranks (checked by all-gathering the parts)."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import torch, torch.distributed as dist
        import cryospin.train.data as D
        import cryospin.train.rows as R
        from cryospin.io.particles import load_particles
        from cryospin.train.config import build_config
        from cryospin.train.distributed import Shard, world_from_env
        from cryospin.train.memory import plan_and_load
        from cryospin.train.stream import StreamOptions
        world = world_from_env()
        dist.init_process_group("gloo")
        shard = Shard(world)
        N = {N_PARTICLES}
        owned = list(range(world.rank, N, world.world_size))
        seen = []
        real = R.preprocess_rows
        def counting(particles, idx, *args, **kwargs):
            seen.extend(int(i) for i in idx)
            return real(particles, idx, *args, **kwargs)
        R.preprocess_rows = counting
        particles = load_particles({str(particles)!r})
        for preload_gb, preloaded in ((10.0, True), (1e-9, False)):
            cfg = build_config("default", {{"data": {{"max_preload_gb": preload_gb}}}})
            lazy = D.prepare_data(particles, cfg.data, preload=False)
            seen.clear()
            data = plan_and_load(cfg, lazy, shard=shard)
            assert data.preloaded == preloaded and len(data) == N
            assert data.rows.held.ids().tolist() == owned
            if preloaded:
                assert sorted(seen) == owned, "in memory: owned rows preprocessed once"
                assert data.images.shape[0] == data.hartley.shape[0] == len(owned)
            else:
                assert seen == [], "streaming: nothing preprocessed up front"
                gen = torch.Generator().manual_seed(3)
                parts = list(data.epoch_batches(50, gen, StreamOptions(chunk_images=32)))
                assert sorted(seen) == owned, "an epoch preprocesses the owned rows only"
                assert all(shard.owns(p.indices).all() for p in parts)
                sizes = torch.tensor([p.global_size for p in parts])
                mine = torch.zeros(N, dtype=torch.int64)  # batch number of each particle
                for b, p in enumerate(parts, start=1):
                    mine[p.indices] = b
                every = mine.clone()
                dist.all_reduce(every)  # the parts are disjoint: every particle's batch
                assert bool((every >= 1).all()), "each particle in one rank's part"
                counts = torch.bincount(every, minlength=len(sizes) + 1)[1:]
                assert torch.equal(counts, sizes), "parts add up to the global batches"
                other = sizes.clone()
                dist.broadcast(other, src=0)
                assert torch.equal(other, sizes), "the same global batches on every rank"
        dist.destroy_process_group()
        os.write(1, ("ok %d" % world.rank + chr(10)).encode())
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", str(script)], env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ok 0" in proc.stdout and "ok 1" in proc.stdout


@pytest.mark.slow
def test_amortized_two_ranks_equal_one_process(particles, tmp_path):
    """Stage 1 only (``--method amortized``): the final poses come from rank 0's inference
    pass over every particle, read lazily from the stacks (its in-memory data hold only its
    own particles)."""
    drop = {"--epochs", "--switch-epoch", "--search-epochs", "--search-rotations",
            "--search-radius"}
    common = [a for i, a in enumerate(TRAIN) if a not in drop and TRAIN[i - 1] not in drop]
    argv = ["--method", "amortized", "--epochs", "2", *common]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert_ok(run_cryospin([str(particles), "-o", str(ref), *argv]))
    assert_ok(run_cryospin([str(particles), "-o", str(run), *argv], nproc=2))
    for name in ("map.002.mrc", "map.mrc"):
        assert_same_map(ref / name, run / name)
    assert_same_poses(ref / "poses.pkl", run / "poses.pkl")


@pytest.mark.parametrize("classes", [["--empty-class", "--no-junk-class"],
                                     ["--empty-class", "--junk-class"]])
def test_the_image_classes_on_two_ranks_equal_one_process(particles, tmp_path, classes):
    """``--empty-class`` (and ``--junk-class``): each rank weighs its own images (the junk
    class's power pooled over the global batch), the volume's objective and the counts of
    images likeliest empty or junk are those of all ranks; the final scores are rank 0's
    over every particle."""
    argv = [*TRAIN, *classes]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cryospin([str(particles), "-o", str(one), *argv]))
    assert_ok(run_cryospin([str(particles), "-o", str(two), *argv], nproc=2))
    a, b = (read_metrics(run / "metrics.jsonl") for run in (one, two))
    assert all(r["empty_fraction"] is not None for r in a[1:])
    junk = "--junk-class" in classes
    assert all((r.get("junk_fraction") is not None) == junk for r in a[1:])
    for key in ("empty_fraction", "jump_fraction", *(["junk_fraction"] if junk else [])):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=0.01)
    assert_same_map(one / "map.mrc", two / "map.mrc")
    assert_same_poses(one / "poses.pkl", two / "poses.pkl")
    scores = [numbers(read_star_tables(run / "poses.star")[0]["rlnLogLikeliContribution"])
              for run in (one, two)]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-3, atol=0.05)


def test_symmetry_step_two_ranks_equal_one_process(particles, tmp_path):
    """``--symmetry C2``: C1 until the search ends, then the impose-symmetry step at epoch 3;
    every rank takes rank 0's frame and converts its own rows (cryospin.train.impose)."""
    argv = [*TRAIN, "--symmetry", "C2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert_ok(run_cryospin([str(particles), "-o", str(ref), *argv]))
    assert_ok(run_cryospin([str(particles), "-o", str(run), *argv], nproc=2))
    steps = [(row["epoch"], row["extra"]["symmetry"]) for row in read_metrics(run / "metrics.jsonl")
             if "symmetry" in (row.get("extra") or {})]
    assert [(e, s["group"]) for e, s in steps] == [(3, "C2")]
    for name in ("map.003.mrc", "map.mrc"):
        assert_same_map(ref / name, run / name)
    assert_same_poses(ref / "poses.pkl", run / "poses.pkl")


def test_world_from_env_reads_torchrun_then_slurm_variables():
    from cryospin.errors import InputError
    from cryospin.train.distributed import WorldInfo, world_from_env

    assert world_from_env({}) == WorldInfo()
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == \
        WorldInfo(rank=3, local_rank=1, world_size=4)
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert world_from_env(slurm) == WorldInfo()  # no rendezvous address: one process
    assert world_from_env({**slurm, "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}) == \
        WorldInfo(rank=5, local_rank=1, world_size=8)
    for bad in ({"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}):
        with pytest.raises(InputError):
            world_from_env(bad)


def test_switch_hypotheses_two_ranks_equal_one_process(particles, tmp_path):
    """``--switch-hypotheses 2``: each rank infers its own particles' two best heads, refines
    them and keeps the best into the rows it owns; the share that kept another than the winner
    is summed over the ranks."""
    argv = [*TRAIN, "--switch-poses", "inference", "--switch-hypotheses", "2",
            "--switch-refine-steps", "3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert_ok(run_cryospin([str(particles), "-o", str(ref), *argv]))
    assert_ok(run_cryospin([str(particles), "-o", str(run), *argv], nproc=2))
    records = [read_metrics(r / "metrics.jsonl")[1]["extra"]["switch"]["hypotheses"]
               for r in (ref, run)]
    assert records[0]["count"] == records[1]["count"] == 2
    assert records[0]["other_than_winner_fraction"] == pytest.approx(
        records[1]["other_than_winner_fraction"], abs=1.0 / N_PARTICLES)
    for name in ("map.003.mrc", "map.mrc"):
        assert_same_map(ref / name, run / name)
    assert_same_poses(ref / "poses.pkl", run / "poses.pkl")


@pytest.mark.parametrize("group", ["C1", "C2"])
def test_rebackproject_after_search_two_ranks_equals_one_process(particles, tmp_path, group):
    """``--rebackproject-after-search`` (:mod:`cryospin.train.rebackproject`): rank 0
    backprojects every particle from the gathered pose table (with the imposed group when
    there is one) and the map reaches the other ranks by a sum: the local epoch starts from
    the same volume, so the maps and poses are the 1-process run's."""
    argv = [*TRAIN, "--rebackproject-after-search", "--symmetry", group]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cryospin([str(particles), "-o", str(one), *argv]))
    assert_ok(run_cryospin([str(particles), "-o", str(two), *argv], nproc=2))
    records = [[(row["epoch"], row["extra"]["rebackproject"]) for row in
                read_metrics(run / "metrics.jsonl")
                if "rebackproject" in (row.get("extra") or {})] for run in (one, two)]
    assert [(e, r["images"], r["group"]) for e, r in records[1]] == \
        [(e, r["images"], r["group"]) for e, r in records[0]] == [(3, N_PARTICLES, group)]
    for name in ("map.003.mrc", "map.mrc"):
        assert_same_map(one / name, two / name)
    assert_same_poses(one / "poses.pkl", two / "poses.pkl")


@pytest.fixture(scope="module")
def c3_particles(tmp_path_factory) -> Path:
    """200 simulated particles of an exactly C3 assembly of 6VYB's residues A:330-530, 16 px,
    CTF, SNR 1."""
    from cryospin.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("sim_c3")
    simulate_dataset("bundled:6vyb", folder, n_particles=N_PARTICLES, box_px=BOX_PX,
                     pixel_size_angstrom=16.0, snr=1.0, seed=0, select="A:330-530",
                     symmetry="C3")
    return folder / "particles.star"


def test_copy_consensus_two_ranks_sum_what_one_process_counts(c3_particles, tmp_path):
    """``--copy-consensus C3`` (:mod:`cryospin.train.consensus`; a given group is placed in
    the C1 map whatever its score, so the step runs): rank 0 backprojects every particle from
    the gathered pose table and places the group, every rank scrambles with the same draw and
    moves the particles it holds, and the NLLs and moved fractions are summed over the ranks.
    The old poses' mean NLL and the first round's moved fraction are the 1-process run's; the
    later rounds may part (a copy choice near a tie follows the rounding of the map), so only
    their bookkeeping is compared. The particle is exactly C3, so the group's placement is
    clear in the 16 px map (score ~0.59): on the pseudo-C3 spike (score ~0.25–0.28) the
    placement followed the map's last bits, and on an AMD EPYC (AVX2, float32) one and two
    processes placed it differently (scores 0.284 and 0.255; first rounds 48 % and 42.5 %)."""
    argv = [*TRAIN, "--rebackproject-after-search", "--copy-consensus", "C3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cryospin([str(c3_particles), "-o", str(one), *argv]))
    assert_ok(run_cryospin([str(c3_particles), "-o", str(two), *argv], nproc=2))
    records = [[(row["epoch"], row["extra"]["consensus"]) for row in
                read_metrics(run / "metrics.jsonl")
                if "consensus" in (row.get("extra") or {})] for run in (one, two)]
    assert [e for e, _ in records[0]] == [e for e, _ in records[1]] == [3]
    a, b = records[0][0][1], records[1][0][1]
    assert a["group"] == b["group"] == "C3" and a["given"] and b["given"]
    assert b["nll_before"] == pytest.approx(a["nll_before"], rel=1e-6)
    assert b["moved_fractions"][0] == pytest.approx(a["moved_fractions"][0],
                                                    abs=1.0 / N_PARTICLES)
    for r in (a, b):
        assert 1 <= r["rounds"] == len(r["moved_fractions"])
        assert r["kept"] == (r["nll_after"] < r["nll_before"])
    rotations, _ = read_cryodrgn_poses(two / "poses.pkl", BOX_PX)
    assert rotations.shape == (N_PARTICLES, 3, 3)


@pytest.mark.parametrize("starts", [1, 2])
def test_halves_on_two_ranks_equal_one_process(particles, tmp_path, starts):
    """``--halves [--starts 2]`` under torchrun: every rank trains each half (each start of
    each half, those a half gets for fitting its images clearly worse included), rank 0 alone
    sets up, writes, adds starts, chooses and combines; the halves' starts and their maps,
    each half's choice and the combined map are the 1-process run's."""
    flags = [*TRAIN, "--halves", "--starts", str(starts)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cryospin([str(particles), "-o", str(one), *flags]))
    proc = run_cryospin([str(particles), "-o", str(two), *flags], nproc=2)
    assert_ok(proc)
    assert "joined process group: rank 0 of 2" in (two / "run.log").read_text()
    np.testing.assert_array_equal(np.load(one / "half_set.npy"), np.load(two / "half_set.npy"))
    for half in ("half_A", "half_B"):
        count = starts_of(one / half)
        assert starts_of(two / half) == count >= starts
        for run in (f"{half}/start_{k}" for k in range(1, count + 1)):
            assert [r["epoch"] for r in read_metrics(two / run / "metrics.jsonl")] == [1, 2, 3]
            assert_same_map(one / run / "map.mrc", two / run / "map.mrc")
        assert (two / half / "chosen").readlink() == (one / half / "chosen").readlink()
    fsc_one, fsc_two = (json.loads((run / "fsc.json").read_text()) for run in (one, two))
    assert fsc_two["half_runs"] == fsc_one["half_runs"]
    assert_same_map(one / "map.mrc", two / "map.mrc")
    assert (two / "report.html").is_file()
    assert proc.stdout.count("FSC 0.143") == 1  # rank 0 alone reports


def test_starts_on_two_ranks_stopped_and_resumed_equal_one_process(particles, tmp_path):
    """``--starts 2`` under torchrun, stopped after epoch 2 of each start and resumed under
    torchrun: the starts and the choice are the 1-process run's."""
    flags = [*TRAIN, "--starts", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_cryospin([str(particles), "-o", str(one), *flags]))
    assert_ok(run_cryospin([str(particles), "-o", str(two), *flags, "--stop-after", "2"],
                           nproc=2))
    assert not (two / "chosen").exists()
    assert_ok(run_cryospin(["--resume", str(two)], nproc=2))
    for k in (1, 2):
        assert_same_map(one / f"start_{k}" / "map.mrc", two / f"start_{k}" / "map.mrc")
        assert_same_poses(one / f"start_{k}" / "poses.pkl", two / f"start_{k}" / "poses.pkl")
    assert (two / "chosen").readlink() == (one / "chosen").readlink()
    choice = json.loads((two / "choice.json").read_text())
    assert [r["final_loss_nats"] for r in choice["runs"]] == pytest.approx(
        [r["final_loss_nats"] for r in json.loads((one / "choice.json").read_text())["runs"]],
        rel=1e-5)
