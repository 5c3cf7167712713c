"""Distributed speed-up: epoch time of ``cryospin reconstruct`` with 1 process and with
``torchrun --nproc_per_node 2`` (gloo, CPU, ``--threads 1`` each) on the same particles.

The two runs compute the same training run (see ``docs/distributed.md``; the maps agree to
float32 round-off), so the epoch times compare like for like. Each epoch's ``wall_time_s`` is
read from ``metrics.jsonl``; the first stage-1 epoch includes DDP/gloo warm-up and is reported
separately from the later epochs. Also prints the relative difference of the two final maps.

    python benchmarks/bench_distributed.py --workdir bench_out/distributed
    python benchmarks/bench_distributed.py --quick    # smoke test: 16 px, 200 particles
    python benchmarks/bench_distributed.py --dataset DIR --full   # a whole default run

``--full`` trains with the ``default`` preset (all its epochs) instead of the short schedule, on
the simulated dataset ``--dataset`` (a ``cryospin simulate`` folder), and compares each run with
the ground truth (``cryospin pose-error``, modulo the point group of ``simulation.json``;
``cryospin fsc --align`` of the final map against ``gt.mrc``) and the two runs with each other.

Needs at least 2 free cores for a meaningful speed-up (each rank runs one thread). Prints a
Markdown table and the exact commands.
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

__all__ = ["main"]


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _map_difference(a: Path, b: Path) -> float:
    import numpy as np

    from cryospin.io.mrc import read_map

    x, y = read_map(a)[0].astype(np.float64), read_map(b)[0].astype(np.float64)
    return float(np.abs(x - y).max() / np.abs(x).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="bench_out/distributed")
    p.add_argument("--box", type=int, default=64, help="box size (px)")
    p.add_argument("--particles", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=4, help="epochs (switch after the 2nd)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the distributed run")
    p.add_argument("--quick", action="store_true", help="16 px, 200 particles, 3 epochs")
    p.add_argument("--dataset", type=Path, default=None,
                   help="a `cryospin simulate` folder to use instead of simulating 6VYB")
    p.add_argument("--full", action="store_true",
                   help="the default preset's whole run, evaluated against the ground truth")
    args = p.parse_args(argv)
    if args.quick:
        args.box, args.particles, args.epochs = 16, 200, 3
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    data = work / f"sim_{args.box}_{args.particles}" if args.dataset is None else \
        args.dataset.resolve()
    if not (data / "particles.star").exists():
        pixel = 3.4 * 64 / args.box  # the 64 px benchmarks' field of view
        _run([py, "-m", "cryospin.cli.main", "simulate", "bundled:6vyb", "-o", str(data),
              "--n-particles", str(args.particles), "--box", str(args.box), "--pixel-size",
              f"{pixel:.4g}", "--snr", "0.1", "--seed", "0", "--no-progress"])
    switch = max(1, args.epochs // 2)
    train = ["--epochs", str(args.epochs), "--switch-epoch", str(switch), "--search-epochs",
             "1", "--batch-size", str(args.batch_size), "--device", "cpu", "--threads", "1",
             "--no-progress", "--seed", "1"]
    if args.quick:
        train += ["--heads", "2", "--width", "0.125", "--no-bf16", "--search-rotations", "128"]
    if args.full:
        train = ["--preset", "default", "--device", "cpu", "--threads", "1", "--no-progress",
                 "--seed", "1"]
    rows, commands, runs = [], [], {}
    for nproc in (1, args.nproc):
        run = work / f"run_{data.name}_{'full_' if args.full else ''}np{nproc}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        launch = [py] if nproc == 1 else [py, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", str(nproc)]
        cmd = [*launch, "-m", "cryospin.cli.main", "reconstruct", str(data / "particles.star"),
               "-o", str(run), *train]
        total = _run(cmd)
        commands.append(shlex.join(cmd))
        runs[nproc] = run
        epochs = _epochs(run)
        first = epochs[0]["wall_time_s"]
        s1 = [e["wall_time_s"] for e in epochs[1:] if e["stage"] == "autoencode"]
        s2 = [e["wall_time_s"] for e in epochs if e["stage"] == "autodecode"]
        rows.append((nproc, first, _mean(s1), _mean(s2), total))
    base = rows[0]
    what = (f"{args.particles} particles, {args.box} px, batch {args.batch_size}"
            if args.dataset is None else data.name) + (", preset default" if args.full else "")
    print(f"\n### Distributed epoch time: {what}, gloo, 1 thread per process\n")
    print("| processes | epoch 1 (s, incl. warm-up) | later stage-1 epoch (s) "
          "| stage-2 epoch (s) | speed-up stage 1 | speed-up stage 2 | whole command (s) |")
    print("|---|---|---|---|---|---|---|")
    def cell(value: float) -> str:
        return "—" if value != value else f"{value:.2f}"  # nan: no such epoch

    for nproc, first, s1, s2, total in rows:
        print(f"| {nproc} | {first:.2f} | {cell(s1)} | {cell(s2)} | {cell(base[2] / s1)} | "
              f"{cell(base[3] / s2)} | {total:.1f} |")
    diff = _map_difference(runs[1] / "map.mrc", runs[args.nproc] / "map.mrc")
    print(f"\nFinal maps, max |1-process − {args.nproc}-process| / max |1-process| = "
          f"{diff:.2g}\n\nCommands (OMP_NUM_THREADS=1):\n")
    for c in commands:
        print(f"    {c}")
    if args.full:
        _compare(py, data, runs[1], runs[args.nproc], args.nproc)
    return 0


def _compare(py: str, data: Path, one: Path, many: Path, nproc: int) -> None:
    """Each run against the ground truth, and the two runs against each other."""
    sim = json.loads((data / "simulation.json").read_text())
    sym = ["--symmetry", sim["symmetry"]] if sim.get("symmetry") else []
    apix = ["--apix", str(sim["pixel_size_angstrom"])]
    rows = []
    for name, a, b in (("1 process vs ground truth", one / "poses.star", None),
                       (f"{nproc} processes vs ground truth", many / "poses.star", None),
                       (f"1 vs {nproc} processes", one / "poses.star", many / "poses.star")):
        gt_poses = data / "particles.star" if b is None else b
        out = a.parent / f"pose_error_{'gt' if b is None else 'other'}.json"
        _run([py, "-m", "cryospin.cli.main", "pose-error", str(a), str(gt_poses), *sym,
              "-o", str(out)])
        pe = json.loads(out.read_text())
        ref = data / "gt.mrc" if b is None else b.parent / "map.mrc"
        fsc_out = a.parent / f"fsc_{'gt' if b is None else 'other'}.json"
        _run([py, "-m", "cryospin.cli.main", "fsc", str(ref), str(a.parent / "map.mrc"),
              "--align", *apix, "-o", str(fsc_out)])
        fsc = json.loads(fsc_out.read_text())
        rows.append((name, pe["median_rotation_error_deg"], pe["mean_rotation_error_deg"],
                     fsc.get("resolution_0.5_angstrom")))
    print("\n| comparison | median rotation difference | mean | FSC = 0.5 of the final maps |")
    print("|---|---:|---:|---:|")
    for name, med, mean, res in rows:
        res_s = "—" if res is None else f"{res:.2f} Å"
        print(f"| {name} | {med:.2f}° | {mean:.2f}° | {res_s} |")


if __name__ == "__main__":
    raise SystemExit(main())
