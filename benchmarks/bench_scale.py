"""Scaling benchmark: the streaming loader against the in-memory one, and cost against N.

(a) On one stack (default 64 px, 40,000 particles: a 655 MB float32 stack, 1.6 GB of
    preprocessed images + Hartley values + CTF), one stage-1 and one stage-2 epoch with the
    in-memory loader and with the streaming loader forced by ``--max-memory`` (default: the
    streaming plan + 15 %; the budget covers the whole process: Python + torch alone take
    about 0.45 GB and the default encoder's activations ~0.5 GB at 64 px, so a stack twice the
    budget needs N ≈ 120k here, ``--sizes ...,120000``). Reports images/s per stage,
    the predicted and measured peak resident memory (``ru_maxrss`` of the run's process).
(b) Time per epoch (stage 1 and stage 2) and peak memory for N = 5k, 10k, 20k, 40k at 64 px,
    in-memory, with the time and memory per 1,000 particles (cost should be linear in N).

Each run is a fresh process running ``fit`` on the particles loaded as ``reconstruct`` loads
them (the finite-pixel scan of ``load_particles`` hands back each chunk's memory-mapped pages,
so it does not grow the resident memory). Particles are simulated once with ``cryospin simulate`` into ``--workdir`` (the 40k
stack; smaller N are its first particles via ``--ind``-style index files).

    python benchmarks/bench_scale.py --workdir bench_out/scale
    python benchmarks/bench_scale.py --quick        # smoke test: 32 px, 1,000 particles

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
from cryospin.train.metrics import read_metrics
star, n, overrides, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
ps = load_particles(star)
if n < len(ps):
    ps = ps.subset(np.arange(n))
t0 = time.perf_counter()
fit(build_config("default", overrides), ps, out)
rows = read_metrics(out + "/metrics.jsonl")
print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "wall_s": time.perf_counter() - t0,
                  "epochs": [{k: r[k] for k in ("stage", "wall_time_s", "images_per_s")}
                             for r in rows]}))
"""


def _overrides(args: argparse.Namespace, data: dict) -> dict:
    return {
        "schedule": {"epochs": 2, "switch_epoch": 1, "search_epochs": 1},
        "run": {"device": "cpu", "num_threads": args.threads, "seed": 0, "progress": False,
                "keep_epoch_maps": False},
        "data": data,
    }


def _fit(args: argparse.Namespace, star: Path, n: int, data: dict, out: Path) -> dict:
    """One short run (1 stage-1 + 1 stage-2 epoch) in a fresh process."""
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    argv = [sys.executable, "-c", _DRIVER, str(star), str(n),
            json.dumps(_overrides(args, data)), str(out)]
    print(f"$ {shlex.join(argv[:2])} <driver> {shlex.join(argv[3:])}", file=sys.stderr,
          flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    (out.parent / f"{out.name}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"run failed (see {out.parent / (out.name + '.log')}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _predicted(args: argparse.Namespace, n: int, data: dict) -> dict[str, float]:
    from cryospin.forward.lattice import disc_frequencies
    from cryospin.train.config import build_config
    from cryospin.train.memory import plan_memory

    cfg = build_config("default", _overrides(args, data))
    P = int(disc_frequencies(args.box).shape[0])
    return {loader: plan_memory(cfg, num_particles=n, box_px=args.box, num_frequencies=P,
                                use_ctf=True, loader=loader).total_bytes / 2**20
            for loader in ("in-memory", "streaming")}


def _stage(res: dict, stage: str) -> dict:
    return next(e for e in res["epochs"] if e["stage"] == stage)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("bench_out/scale"))
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=3.4)
    p.add_argument("--sizes", default="5000,10000,20000,40000")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="--max-memory of part (a); default: the streaming plan + 15 %%")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="32 px, N = 500, 1000 (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.box, args.pixel_size, args.sizes = 32, 6.8, "500,1000"
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / f"data{args.box}_{sizes[-1]}"
    star = data_dir / "particles.star"
    commands = []
    if not star.exists():
        sim = [sys.executable, "-m", "cryospin.cli.main", "simulate", "bundled:6vyb",
               "-o", str(data_dir), "--n-particles", str(sizes[-1]), "--box", str(args.box),
               "--pixel-size", str(args.pixel_size), "--snr", "0.1", "--seed", "0",
               "--no-progress"]
        print(f"$ {shlex.join(sim)}", file=sys.stderr, flush=True)
        subprocess.run(sim, check=True, stdout=subprocess.DEVNULL)
        commands.append(shlex.join(sim))
    stack_mb = sum(f.stat().st_size for f in data_dir.glob("*.mrcs")) / 2**20

    # (a) streaming vs in-memory on the largest stack
    n = sizes[-1]
    budget = args.budget_gb
    if budget is None:
        budget = round(_predicted(args, n, {})["streaming"] * 2**20 * 1.15 / 1e9, 2)
    runs = {"in-memory": {}, "streaming": {"max_memory_gb": budget},
            "streaming + cache": {"max_memory_gb": budget,
                                  "cache_dir": str(work / "cache")}}
    results = {}
    for name, data in runs.items():
        out = work / ("run_a_" + name.replace(" ", "").replace("+", "_"))
        results[name] = _fit(args, star, n, data, out)
        commands.append(f"fit on {star} (N={n}) with data={json.dumps(data)}")
    pred = _predicted(args, n, {})
    print(f"\n### (a) streaming vs in-memory, {args.box} px, N = {n:,} "
          f"(stack {stack_mb:,.0f} MB, --max-memory {budget:g} GB = {budget * 1e9 / 2**20:,.0f}"
          f" MB)\n")
    print("| loader | stage-1 img/s | stage-2 img/s | predicted peak (MB) | measured peak (MB) "
          "| within budget |")
    print("|---|---:|---:|---:|---:|---|")
    for name, res in results.items():
        peak = res["peak_bytes"] / 2**20
        pk = pred["in-memory" if name == "in-memory" else "streaming"]
        ok = "-" if name == "in-memory" else ("yes" if res["peak_bytes"] <= budget * 1e9
                                              else "NO")
        print(f"| {name} | {_stage(res, 'autoencode')['images_per_s']:.0f} | "
              f"{_stage(res, 'autodecode')['images_per_s']:.0f} | {pk:,.0f} | {peak:,.0f} "
              f"| {ok} |")
    print("\n(streaming + cache: the second of two runs would read the float16 cache only; "
          "this first run also writes it.)")

    # (b) cost against N (in-memory)
    print(f"\n### (b) time per epoch and peak memory against N, {args.box} px, in-memory\n")
    print("| N | stage-1 epoch (s) | stage-2 epoch (s) | s per 1k (stage 1 + 2) | predicted "
          "peak (MB) | measured peak (MB) | measured MB per 1k above runtime |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n_i in sizes:
        res = results["in-memory"] if n_i == n else _fit(
            args, star, n_i, {}, work / f"run_b_{n_i}")
        if n_i != n:
            commands.append(f"fit on {star} (N={n_i}) in memory")
        t1 = _stage(res, "autoencode")["wall_time_s"]
        t2 = _stage(res, "autodecode")["wall_time_s"]
        peak = res["peak_bytes"] / 2**20
        from cryospin.train.memory import RUNTIME_BYTES

        print(f"| {n_i:,} | {t1:.1f} | {t2:.1f} | {(t1 + t2) / n_i * 1000:.2f} | "
              f"{_predicted(args, n_i, {})['in-memory']:,.0f} | {peak:,.0f} | "
              f"{(peak - RUNTIME_BYTES / 2**20) / n_i * 1000:.1f} |")
    print("\nCommands (each fit in a fresh process; see the driver in "
          "benchmarks/bench_scale.py):\n")
    print(f"    python {shlex.join(sys.argv)}")
    for c in commands:
        print(f"    {c}")
    print(f"\n({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads)")


if __name__ == "__main__":
    main()
