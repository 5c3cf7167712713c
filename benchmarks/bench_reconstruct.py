"""End-to-end accuracy and speed benchmark of `cryospin reconstruct` against the oracle.

Simulates a dataset (cached in --workdir), runs the ab initio reconstruction, the oracle
(`cryospin backproject` with the true poses), and evaluates both against the ground truth with
cryospin's own tools. Prints a Markdown table: median/mean rotation error, FSC = 0.5 resolution vs
the ground truth (aligned, both hands), the ratio to the oracle, images/s per stage, wall time and
peak resident memory of each step.

The issue's target configuration is the default::

    python benchmarks/bench_reconstruct.py --workdir bench_out/spike64

(6VYB, 64 px at 3.4 Å/px, 20,000 particles, SNR 0.1, centred, defocus 1.0-2.5 µm). Use
``--quick`` for a small smoke-sized run (32 px, 2,000 particles).

A symmetric particle (issue 3: multi-head vs single-head encoder), sharing one dataset::

    python benchmarks/bench_reconstruct.py --workdir bench_out/d7_m7 --data bench_out/d7_data \
        --select A:330-530 --symmetry D7 --box 48 --pixel-size 4.5 --n-particles 10000
    python benchmarks/bench_reconstruct.py --workdir bench_out/d7_m1 --data bench_out/d7_data \
        --select A:330-530 --symmetry D7 --box 48 --pixel-size 4.5 --n-particles 10000 \
        -- --heads 1

Pose errors of a symmetric particle are taken modulo its point group (``pose-error
--symmetry``). ``--impose G`` runs ``reconstruct --symmetry G`` and the oracle backprojection
with ``--symmetry G`` (the symmetric oracle; with ``--impose auto``, the simulated group)::

    python benchmarks/bench_reconstruct.py --workdir bench_out/d7_sym --data bench_out/d7_64 \
        --select A:330-530 --symmetry D7 --impose D7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("bench_out/spike64"))
    p.add_argument("--structure", default="bundled:6vyb")
    p.add_argument("--n-particles", type=int, default=20000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=3.4)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--shift-std-px", type=float, default=0.0)
    p.add_argument("--preset", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--select", default=None, help="simulate: atom selection, e.g. A:330-530")
    p.add_argument("--symmetry", default=None,
                   help="simulate a Cn/Dn assembly; pose errors modulo the group")
    p.add_argument("--impose", default=None, metavar="GROUP",
                   help="reconstruct and the oracle backprojection with --symmetry GROUP")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder (default WORKDIR/data; simulated if missing)")
    p.add_argument("--halves", action="store_true",
                   help="also run `reconstruct --halves` (gold standard) on the same data")
    p.add_argument("--quick", action="store_true", help="32 px, 2,000 particles")
    p.add_argument("reconstruct_args", nargs="*", help="extra flags for reconstruct (after --)")
    args = p.parse_args()
    if args.quick:
        args.n_particles, args.box, args.pixel_size = 2000, 32, 6.8
    exe = [sys.executable, "-m", "cryospin.cli.main"]
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    data, run_dir, oracle = args.data or work / "data", work / "run", work / "oracle"
    sim_extra = (["--select", args.select] if args.select else []) + (
        ["--symmetry", args.symmetry] if args.symmetry else [])
    err_extra = ["--symmetry", args.symmetry] if args.symmetry else []
    impose = ["--symmetry", args.impose] if args.impose else []
    # the symmetric oracle: with --impose auto, the simulated group (backproject has no auto)
    oracle_group = args.symmetry if args.impose and args.impose.lower() == "auto" else args.impose
    oracle_sym = ["--symmetry", oracle_group] if oracle_group else []
    rows: dict[str, tuple[float, float]] = {}
    if not (data / "particles.star").exists():
        rows["simulate"] = run(exe + [
            "simulate", args.structure, "-o", str(data), "--n-particles", str(args.n_particles),
            "--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr", str(args.snr),
            "--shift-std-px", str(args.shift_std_px), "--seed", str(args.seed), "--no-progress",
            *sim_extra,
        ], log)
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    rows["reconstruct"] = run(exe + [
        "reconstruct", str(data / "particles.star"), "-o", str(run_dir), "--preset", args.preset,
        "--seed", str(args.seed), "--no-progress", *impose, *args.reconstruct_args,
    ], log)
    rows["oracle backproject"] = run(exe + [
        "backproject", str(data / "particles.star"), "-o", str(oracle), "--force",
        *oracle_sym], log)
    run(exe + ["fsc", str(data / "gt.mrc"), str(run_dir / "map.mrc"), "--align",
                "-o", str(work / "fsc_run.json"), "--plot", str(work / "fsc_run.png")], log)
    run(exe + ["fsc", str(data / "gt.mrc"), str(oracle / "map.mrc"),
                "-o", str(work / "fsc_oracle.json")], log)
    run(exe + ["pose-error", str(run_dir / "poses.star"), str(data / "particles.star"),
                "-o", str(work / "pose_error.json"), *err_extra], log)

    halves = work / "halves"
    if args.halves:
        if halves.exists():
            subprocess.run(["rm", "-rf", str(halves)], check=True)
        rows["reconstruct --halves"] = run(exe + [
            "reconstruct", str(data / "particles.star"), "-o", str(halves), "--halves",
            "--preset", args.preset, "--seed", str(args.seed), "--no-progress",
            *impose, *args.reconstruct_args,
        ], log)

    fsc_run = json.loads((work / "fsc_run.json").read_text())
    fsc_oracle = json.loads((work / "fsc_oracle.json").read_text())
    err = json.loads((work / "pose_error.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speed: dict[str, list[float]] = {}
    for m in metrics:
        speed.setdefault(m["stage"], []).append(m["images_per_s"])
    res_run = fsc_run["resolution_0.5_angstrom"]
    res_oracle = fsc_oracle["resolution_0.5_angstrom"]

    what = args.structure + (f" {args.select}" if args.select else "") + (
        f" ({args.symmetry} assembly)" if args.symmetry else "")
    print(f"\n### {what}, {args.n_particles} particles, {args.box} px at "
          f"{args.pixel_size} Å/px, SNR {args.snr}, preset `{args.preset}`\n")
    print("| metric | value |")
    print("|---|---|")
    print(f"| median rotation error | {err['median_rotation_error_deg']:.2f}° |")
    print(f"| mean rotation error | {err['mean_rotation_error_deg']:.2f}° |")
    print(f"| fraction within 10° | {err['fraction_rotation_error_below_10_deg']:.3f} |")
    if args.shift_std_px > 0 and err.get("median_shift_error_px") is not None:
        print(f"| median shift error | {err['median_shift_error_px']:.2f} px "
              f"({err['median_shift_error_centered_px']:.2f} px after removing a global offset) |")
    print(f"| reconstruct flags | `{' '.join(impose + args.reconstruct_args) or '(preset)'}` |")
    usage = [m["head_usage"] for m in metrics if m.get("head_usage")]
    if usage:
        print(f"| head usage at the switch | {' '.join(f'{u:.2f}' for u in usage[-1])} |")
    print(f"| FSC=0.5 vs ground truth (ab initio) | {res_run:.2f} Å |")
    print(f"| FSC=0.5 vs ground truth (oracle, true poses) | {res_oracle:.2f} Å |")
    print(f"| ratio ab initio / oracle | {res_run / res_oracle:.3f} (target ≤ 1.15) |")
    if args.halves:
        gold = json.loads((halves / "fsc.json").read_text())["resolutions"]
        unmasked = gold["unmasked"]["0.143_angstrom"]
        corrected = gold["corrected"]["0.143_angstrom"]
        print(f"| --halves: half-map FSC=0.143, unmasked | {unmasked:.2f} Å |")
        print(f"| --halves: half-map FSC=0.143, masked, phase-randomisation corrected | "
              f"{corrected:.2f} Å |")
        print(f"| half-map FSC=0.143 (corrected) / full map vs ground truth FSC=0.5 | "
              f"{corrected / res_run:.3f} (target within 15%) |")
    resolved = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("resolved", {})
    if resolved:
        print(f"| encoder precision (auto: why) | {resolved.get('precision')} "
              f"({resolved.get('precision_reason')}); encoder box "
              f"{resolved.get('encoder_box_px')} px |")
    for stage, values in speed.items():
        best = max(values)
        print(f"| images/s, {stage} (best epoch) | {best:.0f} |")
    switch = [m["extra"]["switch"]["wall_time_s"] for m in metrics
              if (m.get("extra") or {}).get("switch")]
    if switch:
        print(f"| switch inference pass | {switch[0]:.0f} s |")
    jumps = [f"{100 * m['jump_fraction']:.1f}" for m in metrics
             if m.get("jump_fraction") is not None]
    print(f"| epochs run; % of particles jumping > 20° per stage-2 epoch | {len(metrics)}; "
          f"{' '.join(jumps) or '-'} |")
    for m in metrics:
        stop = (m.get("extra") or {}).get("search_stop")
        if stop:
            print(f"| global search stopped after epoch | {m['epoch']} |")
    print(f"| machine | {machine_line()} |")
    for step, (wall, rss) in rows.items():
        print(f"| {step}: wall time, peak RSS | {wall / 60:.1f} min, {rss:.0f} MiB |")


if __name__ == "__main__":
    main()
