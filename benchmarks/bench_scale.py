"""Scaling benchmark: the streaming loader against the in-memory one, and cost against N.

(a) A stack at least twice the memory budget: by default 140,000 particles at 64 px (a 2.3 GB
    float32 stack). The budget ``--max-memory`` covers the whole process (Python + torch alone
    take about 0.45 GB), default: the streaming plan + 15 % (about 1.04 GB here). Measured: one
    stage-2 epoch (local pose refinement, the fastest epoch and so the one most sensitive to
    loading) with the in-memory loader and with the streaming loader forced by the budget,
    images/s and the peak resident memory (``VmHWM`` of the run's process) against the
    predicted plan; a third run streams from the on-disk cache of preprocessed float16 images
    (``cache_dir``, built by that run before its epoch). The run starts at the switch
    (``switch_epoch 0``) with a narrow one-head encoder (width 0.125) that only seeds the
    poses, so that the encoder's activations do not set the floor of the budget.
(b) Time per epoch (stage 1, and a stage-2 epoch of local refinement; the
    switch's inference pass is not counted) and peak memory for N = 5k, 10k, 20k, 40k at 64 px
    with the default preset, in memory, with the time and memory per 1,000 particles (cost should be
    linear in N). (A stage-2 epoch with the global search costs ~4x a local one; see the
    reconstruction benchmarks.)

Each run is a fresh process running ``fit`` on the particles loaded as ``reconstruct`` loads
them (the finite-pixel scan of ``load_particles`` hands back each chunk's memory-mapped pages,
so it does not grow the resident memory). Particles are simulated once with
``cryospin simulate`` into ``--workdir``; smaller N are the first particles of that stack.
The stack is read through the operating system's page cache, which is not part of the
process's resident memory.

    python benchmarks/bench_scale.py --workdir bench_out/scale
    python benchmarks/bench_scale.py --workdir bench_out/scale --tile-from bench_out/spike64/data
    python benchmarks/bench_scale.py --quick        # smoke test: 32 px, 1,000 particles

``--tile-from`` builds the 140,000-particle stack by repeating an existing 64 px simulation
(e.g. the 20,000 particles of ``bench_reconstruct.py``) instead of simulating all of them
(~30 min on 2 cores); the loaders' cost does not depend on the images' content.

Prints Markdown tables and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

_DRIVER = """
import json, resource, sys, time
import numpy as np
from cryospin.io.particles import load_particles
from cryospin.train.config import build_config
from cryospin.train.fit import fit
from cryospin.rundir import read_metrics
star, n, overrides, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
ps = load_particles(star)
if n < len(ps):
    ps = ps.subset(np.arange(n))
t0 = time.perf_counter()
fit(build_config("default", overrides), ps, out)
rows = read_metrics(out + "/metrics.jsonl")
def peak_bytes():
    # VmHWM, the peak resident set of this process's own memory map. Not ru_maxrss: Linux
    # carries the parent's resident set at fork over into the child's ru_maxrss, so a child of
    # a large benchmark process (e.g. one that just wrote the tiled stack) reported the
    # parent's size.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_bytes": peak_bytes(),
                  "wall_s": time.perf_counter() - t0,
                  "epochs": [{k: r[k] for k in ("stage", "wall_time_s", "images_per_s")}
                             for r in rows]}))
"""


#: part (a): one stage-2 epoch seeded by a tiny encoder (see the module docstring)
STREAM_SETTINGS = {
    "schedule": {"epochs": 1, "switch_epoch": 0, "search_epochs": 0},
    "model": {"width_multiplier": 0.125, "num_heads": 1},
    "run": {"inference_batch_size": 64},
}


def _overrides(args: argparse.Namespace, data: dict, settings: dict | None = None) -> dict:
    out = {
        "schedule": {"epochs": 2, "switch_epoch": 1, "search_epochs": 0},
        "run": {"device": "cpu", "num_threads": args.threads, "seed": 0, "progress": False,
                "keep_epoch_maps": False, "final_map": "decoder"},
        "data": data,
    }
    for section, values in (settings or {}).items():
        out[section] = {**out.get(section, {}), **values}
    return out


def _fit(args: argparse.Namespace, star: Path, n: int, data: dict, out: Path,
         settings: dict | None = None) -> dict:
    """One short run (default: 1 stage-1 + 1 stage-2 epoch) in a fresh process."""
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    argv = [sys.executable, "-c", _DRIVER, str(star), str(n),
            json.dumps(_overrides(args, data, settings)), str(out)]
    print(f"$ {shlex.join(argv[:2])} <driver> {shlex.join(argv[3:])}", file=sys.stderr,
          flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    (out.parent / f"{out.name}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"run failed (see {out.parent / (out.name + '.log')}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _predicted(args: argparse.Namespace, n: int, data: dict,
               settings: dict | None = None) -> dict[str, float]:
    from cryospin.forward.lattice import disc_frequencies
    from cryospin.train.config import build_config
    from cryospin.train.memory import plan_memory

    cfg = build_config("default", _overrides(args, data, settings))
    P = int(disc_frequencies(args.box).shape[0])
    return {loader: plan_memory(cfg, num_particles=n, box_px=args.box, num_frequencies=P,
                                use_ctf=True, loader=loader).total_bytes / 2**20
            for loader in ("in-memory", "streaming")}


def _tile_dataset(src: Path, dst: Path, n: int) -> None:
    """``dst``: a stack of ``n`` particles that repeats the particles of the simulated dataset
    ``src`` (one ``particles.mrcs`` written chunk by chunk, and its ``particles.star``)."""
    import mrcfile
    import numpy as np
    import starfile

    tables = starfile.read(src / "particles.star", always_dict=True)
    parts = tables["particles"]
    with mrcfile.mmap(src / "particles.mrcs", mode="r") as m:
        stack = m.data
        m_src, L = stack.shape[0], stack.shape[-1]
        voxel = float(m.voxel_size.x)
        dst.mkdir(parents=True, exist_ok=True)
        tmp = dst / "particles.mrcs.tmp"
        with mrcfile.new_mmap(tmp, shape=(n, L, L), mrc_mode=2, overwrite=True) as out:
            for start in range(0, n, m_src):
                k = min(m_src, n - start)
                out.data[start:start + k] = stack[:k]
            out.set_image_stack()
            out.voxel_size = voxel
        tmp.replace(dst / "particles.mrcs")
    reps = -(-n // m_src)
    rows = parts.iloc[np.tile(np.arange(len(parts)), reps)[:n]].reset_index(drop=True)
    rows["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    starfile.write({**tables, "particles": rows}, dst / "particles.star", overwrite=True)


def _stage(res: dict, stage: str) -> dict:
    return next(e for e in res["epochs"] if e["stage"] == stage)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("bench_out/scale"))
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=3.4)
    p.add_argument("--sizes", default="5000,10000,20000,40000",
                   help="N of part (b), comma-separated")
    p.add_argument("--stream-n", type=int, default=140000,
                   help="N of part (a) (the stack must be >= 2x the budget)")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="--max-memory of part (a); default: the streaming plan + 15 %%")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", choices=("a", "b"), default=None, help="leave out one part")
    p.add_argument("--tile-from", type=Path, default=None,
                   help="build the stack by repeating this `cryospin simulate` folder's particles "
                        "(same box) instead of simulating all of them (loading cost does not "
                        "depend on the images' content)")
    p.add_argument("--quick", action="store_true", help="32 px, N = 500, 1000 (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.box, args.pixel_size, args.sizes, args.stream_n = 32, 6.8, "500,1000", 1000
    sizes = sorted(int(s) for s in args.sizes.split(","))
    total = max(sizes[-1], args.stream_n)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / f"data{args.box}_{total}"
    star = data_dir / "particles.star"
    commands = []
    if not star.exists() and args.tile_from is not None:
        _tile_dataset(args.tile_from, data_dir, total)
        commands.append(f"stack of {total:,} particles: {args.tile_from}/particles.mrcs repeated "
                        "(benchmarks/bench_scale.py _tile_dataset)")
    if not star.exists():
        sim = [sys.executable, "-m", "cryospin.cli.main", "simulate", "bundled:6vyb",
               "-o", str(data_dir), "--n-particles", str(total), "--box", str(args.box),
               "--pixel-size", str(args.pixel_size), "--snr", "0.1", "--seed", "0",
               "--no-progress"]
        print(f"$ {shlex.join(sim)}", file=sys.stderr, flush=True)
        subprocess.run(sim, check=True, stdout=subprocess.DEVNULL)
        commands.append(shlex.join(sim))
    image_mb = args.box * args.box * 4 / 2**20

    if args.skip != "a":
        # (a) streaming vs in-memory on a stack >= 2x the budget
        n = args.stream_n
        stack_mb = n * image_mb
        budget = args.budget_gb
        if budget is None:
            budget = round(_predicted(args, n, {}, STREAM_SETTINGS)["streaming"] * 2**20 * 1.15
                           / 1e9, 2)
        cache = work / "cache"
        if cache.exists():
            subprocess.run(["rm", "-rf", str(cache)], check=True)
        runs = {"in-memory": {}, "streaming": {"max_memory_gb": budget},
                "streaming + cache": {"max_memory_gb": budget, "cache_dir": str(cache)}}
        results = {}
        for name, data in runs.items():
            out = work / ("run_a_" + name.replace(" + ", "_"))
            results[name] = _fit(args, star, n, data, out, STREAM_SETTINGS)
            commands.append(f"fit on {star} (N={n}) with data={json.dumps(data)}, "
                            f"{json.dumps(STREAM_SETTINGS)}")
        pred = _predicted(args, n, {}, STREAM_SETTINGS)
        pred["streaming + cache"] = pred["streaming"]
        budget_mb = budget * 1e9 / 2**20
        print(f"\n### (a) streaming vs in-memory, {args.box} px, N = {n:,}: stack "
              f"{stack_mb:,.0f} MB = {stack_mb / budget_mb:.2f}x the budget "
              f"(--max-memory {budget:g} GB = {budget_mb:,.0f} MB)\n")
        print("| loader | stage-2 epoch (s) | stage-2 img/s | vs in-memory | whole fit (s) "
              "| predicted peak (MB) | measured peak (MB) | within budget |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        base = _stage(results["in-memory"], "autodecode")["images_per_s"]
        for name, res in results.items():
            e2 = _stage(res, "autodecode")
            peak = res["peak_bytes"] / 2**20
            ok = "-" if name == "in-memory" else ("yes" if res["peak_bytes"] <= budget * 1e9
                                                  else "NO")
            print(f"| {name} | {e2['wall_time_s']:.0f} | {e2['images_per_s']:.0f} | "
                  f"{e2['images_per_s'] / base:.2f} | {res['wall_s']:.0f} | {pred[name]:,.0f} | "
                  f"{peak:,.0f} | {ok} |")
        print("\n(whole fit: preprocessing — with the cache, building it —, the switch's "
              "inference pass, the epoch and the outputs)")

    if args.skip != "b":
        # (b) cost against N (in-memory, default preset)
        from cryospin.train.memory import RUNTIME_BYTES

        print(f"\n### (b) time per epoch and peak memory against N, {args.box} px, in-memory\n")
        print("| N | stage-1 epoch (s) | stage-2 epoch (s) | s per 1k (stage 1 + 2) | "
              "predicted peak (MB) | measured peak (MB) | measured MB per 1k above runtime |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n_i in sizes:
            res = _fit(args, star, n_i, {}, work / f"run_b_{n_i}")
            commands.append(f"fit on {star} (N={n_i}) in memory")
            t1 = _stage(res, "autoencode")["wall_time_s"]
            t2 = _stage(res, "autodecode")["wall_time_s"]
            peak = res["peak_bytes"] / 2**20
            print(f"| {n_i:,} | {t1:.1f} | {t2:.1f} | {(t1 + t2) / n_i * 1000:.2f} | "
                  f"{_predicted(args, n_i, {})['in-memory']:,.0f} | {peak:,.0f} | "
                  f"{(peak - RUNTIME_BYTES / 2**20) / n_i * 1000:.1f} |", flush=True)
    print("\nCommands (each fit in a fresh process; see the driver in "
          "benchmarks/bench_scale.py):\n")
    print(f"    python {shlex.join(sys.argv)}")
    for c in commands:
        print(f"    {c}")
    print(f"\n({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads)")


if __name__ == "__main__":
    main()
