"""The paper's methods side by side: semi-amortized (cryoSPIN), amortized, cryoAI and the oracle.

Every method uses the same explicit Hartley-voxel decoder, the same simulated data and the same
seed (``cryospin reconstruct --method ...``); the oracle is ``cryospin backproject`` with the
true poses. Two datasets, simulated once and cached in --workdir:

* ``spike``: ``cryospin simulate bundled:6vyb ...`` (asymmetric);
* ``symmetric``: ``cryospin simulate bundled:6vyb --select A:330-530 --symmetry D7 ...`` (a D7
  assembly of the spike's receptor-binding domain; pose errors modulo D7).

Prints Markdown tables (also written to WORKDIR/results.md):

* Table 1: mean/median rotation error (``cryospin pose-error``, global rotation and hand
  removed) and the FSC = 0.5 resolution of the final map against the ground truth;
* Table 2: seconds per epoch per stage (``metrics.jsonl``), total wall time, peak RSS
  (``os.wait4``) and the number of encoder parameters;

and writes WORKDIR/fig3_resolution_vs_time.png (FSC = 0.5 against the ground truth of the
per-epoch maps ``map.NNN.mrc``, aligned with :func:`cryospin.evaluate.align.align_maps`, vs the
elapsed training time; ``--fig3-epochs`` evenly spaced epochs per run) and
WORKDIR/fig4_rotation_error_vs_epoch.png (median rotation error of the tracked particles,
``RUN_DIR/pose_track.npz``, per epoch; the switch is marked).

Default sizes (48 px at 4.53 Å/px, 5,000 particles, preset ``default``) fit in about an hour on
2 CPU cores; ``--paper`` uses the paper's scale (128 px at 1.7 Å/px, preset paper-synthetic:
20 epochs; add ``--preset paper-real`` for 30) and ``--quick`` a smoke-sized run::

    python benchmarks/bench_methods.py --workdir bench_out/methods
    python benchmarks/bench_methods.py --workdir bench_out/methods_quick --quick
    python benchmarks/bench_methods.py --paper --n-particles 50000 --threads 8
    python benchmarks/bench_methods.py -- --heads 5     # extra flags for every reconstruct
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cryospin_argv, markdown_table, read_jsonl, run  # noqa: E402
from _curves import error_curve, fsc_points  # noqa: E402

METHODS = ("semi-amortized", "amortized", "cryoai")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("bench_out/methods"))
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--pixel-size", type=float, default=4.533)
    p.add_argument("--n-particles", type=int, default=5000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="default")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every step")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--datasets", default="spike,symmetric", help="spike, symmetric or both")
    p.add_argument("--structure", default="bundled:6vyb", help="structure of the spike dataset")
    p.add_argument("--sym-structure", default="bundled:6vyb")
    p.add_argument("--sym-select", default="A:330-530")
    p.add_argument("--sym-symmetry", default="D7")
    p.add_argument("--fig3-epochs", type=int, default=4,
                   help="per-epoch maps evaluated per run for Fig. 3 (evenly spaced, with the "
                        "last)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs found in --workdir (default: rerun them)")
    p.add_argument("--paper", action="store_true",
                   help="paper scale: 128 px at 1.7 Å/px, preset paper-synthetic")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 24 px, 300 particles, 2 epochs, narrow encoder")
    p.add_argument("reconstruct_args", nargs="*", help="extra flags for reconstruct (after --)")
    args = p.parse_args()
    if args.paper:
        args.box, args.pixel_size, args.preset = 128, 1.7, "paper-synthetic"
    if args.quick:
        args.box, args.pixel_size, args.n_particles = 24, 9.067, 300
        args.epochs, args.fig3_epochs = 2, 2
        args.reconstruct_args = ["--width", "0.125", "--search-rotations", "512",
                                 *args.reconstruct_args]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")
    args.datasets = [d for d in args.datasets.split(",") if d]
    if set(args.datasets) - {"spike", "symmetric"}:
        p.error("--datasets takes spike and/or symmetric")
    return args


# --------------------------------------------------------------------------- steps


def _dataset_flags(name: str, args: argparse.Namespace) -> tuple[list[str], str | None]:
    """(structure and selection flags of ``cryospin simulate``, point group or None)."""
    if name == "spike":
        return [args.structure], None
    return ([args.sym_structure, "--select", args.sym_select, "--symmetry", args.sym_symmetry],
            args.sym_symmetry)


def _simulate(name: str, args: argparse.Namespace, log: Path) -> tuple[Path, str | None]:
    flags, symmetry = _dataset_flags(name, args)
    tag = f"{name}_L{args.box}_px{args.pixel_size:g}_N{args.n_particles}_snr{args.snr:g}" \
          f"_seed{args.seed}"
    data = args.workdir / "data" / tag
    if not (data / "particles.star").exists():
        if data.exists():
            shutil.rmtree(data)
        run(cryospin_argv() + [
            "simulate", *flags, "-o", str(data), "--n-particles", str(args.n_particles),
            "--box", str(args.box), "--pixel-size", str(args.pixel_size), "--snr", str(args.snr),
            "--seed", str(args.seed), "--no-progress",
        ], log)
    return data, symmetry


def _step(argv: list[str], out: Path, record: Path, log: Path, reuse: bool) -> dict[str, float]:
    """Run a step writing ``out/map.mrc`` once (or reuse it); its wall time and RSS."""
    if reuse and (out / "map.mrc").exists() and record.exists():
        return json.loads(record.read_text())
    if out.exists():
        shutil.rmtree(out)
    wall, rss = run(argv, log)
    stats = {"wall_s": wall, "peak_rss_mib": rss}
    record.write_text(json.dumps(stats))
    return stats


def _reconstruct(method: str, data: Path, runs: Path, args: argparse.Namespace,
                 log: Path) -> tuple[Path, dict[str, float]]:
    out = runs / method
    argv = cryospin_argv() + [
        "reconstruct", str(data / "particles.star"), "-o", str(out), "--preset", args.preset,
        "--method", method, "--seed", str(args.seed), "--threads", str(args.threads),
        "--no-progress",
    ]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    argv += args.reconstruct_args
    stats = _step(argv, out, runs / f"{method}.step.json", log, args.reuse)
    return out, stats


def _evaluate(run_dir: Path, data: Path, symmetry: str | None, work: Path, log: Path,
              align: bool, pose: bool) -> dict[str, Any]:
    """Pose error (``cryospin pose-error``) and final-map FSC (``cryospin fsc``) as a dict."""
    out: dict[str, Any] = {}
    if pose:
        pe = work / f"{run_dir.name}.pose_error.json"
        run(cryospin_argv() + ["pose-error", str(run_dir / "poses.star"),
                               str(data / "particles.star"), "-o", str(pe),
                               *(["--symmetry", symmetry] if symmetry else [])], log)
        out.update(json.loads(pe.read_text()))
    fj = work / f"{run_dir.name}.fsc.json"
    run(cryospin_argv() + ["fsc", str(data / "gt.mrc"), str(run_dir / "map.mrc"),
                           *(["--align"] if align else []), "-o", str(fj)], log)
    out["fsc_0.5_angstrom"] = json.loads(fj.read_text()).get("resolution_0.5_angstrom")
    return out


def _encoder_parameters(run_dir: Path, box_px: int) -> int:
    """Parameters of the run's encoder (rebuilt from its config.yaml; the baselines' too)."""
    from cryospin.encoder import MultiHeadPoseEncoder
    from cryospin.train.config import load_config

    c = load_config(run_dir / "config.yaml")
    m = c.model
    enc = MultiHeadPoseEncoder(box_px, m.num_heads, width_multiplier=m.width_multiplier,
                               predict_shifts=m.predict_shifts,
                               max_shift_px=m.max_shift_px if m.predict_shifts else 0.0,
                               head_hidden=m.head_hidden)
    return sum(p.numel() for p in enc.parameters())


def _switch_epoch(run_dir: Path) -> int | None:
    """First auto-decoding epoch, or None."""
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        if m["stage"] == "autodecode":
            return int(m["epoch"])
    return None


# --------------------------------------------------------------------------- figures


_COLOURS = {"semi-amortized": "C0", "amortized": "C1", "cryoai": "C2", "oracle": "k"}


def _plot_fig3(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (dataset, res) in zip(axes[0], results.items(), strict=True):
        for method, r in res["methods"].items():
            pts = [p for p in r["fig3"] if p["resolution_angstrom"] is not None
                   and math.isfinite(p["resolution_angstrom"])]
            if pts:
                ax.plot([p["elapsed_s"] / 60 for p in pts],
                        [p["resolution_angstrom"] for p in pts], "o-",
                        color=_COLOURS[method], label=method)
        oracle = res["oracle"]["fsc_0.5_angstrom"]
        if oracle is not None:
            ax.axhline(oracle, color=_COLOURS["oracle"], ls="--", label="oracle (true poses)")
        ax.set_xlabel("training wall time (min)")
        ax.set_ylabel("FSC = 0.5 vs ground truth (Å)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_fig4(results: dict[str, dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not any(r["fig4"] for res in results.values() for r in res["methods"].values()):
        print("note: no pose track in any run; Fig. 4 not written", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (dataset, res) in zip(axes[0], results.items(), strict=True):
        for method, r in res["methods"].items():
            if not r["fig4"]:
                continue
            epochs, err = zip(*r["fig4"], strict=True)
            ax.plot(epochs, err, "o-", color=_COLOURS[method], label=method)
            if r["switch_epoch"] is not None:
                ax.axvline(r["switch_epoch"] - 0.5, color=_COLOURS[method], ls=":",
                           label=f"{method}: switch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("median rotation error (°)")
        ax.set_yscale("log")
        ax.set_title(dataset)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:{spec}}{unit}"


def main() -> None:
    args = _parse()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "bench.log"
    # Phase 1: every measured command, while this process is still small. On Linux a child's
    # ru_maxrss includes its parent's RSS at the fork (the pre-exec high-water mark is kept),
    # so nothing heavy (torch, maps) is loaded here before the last measured command.
    plan: list[dict[str, Any]] = []
    for name in args.datasets:
        data, symmetry = _simulate(name, args, log)
        runs = args.workdir / "runs" / data.name
        runs.mkdir(parents=True, exist_ok=True)
        oracle_dir = runs / "oracle"
        oracle_step = _step(cryospin_argv() + [
            "backproject", str(data / "particles.star"), "-o", str(oracle_dir), "--force"],
            oracle_dir, runs / "oracle.step.json", log, args.reuse)
        steps = {m: _reconstruct(m, data, runs, args, log) for m in args.methods}
        plan.append({"name": name, "data": data, "symmetry": symmetry, "runs": runs,
                     "oracle": (oracle_dir, oracle_step), "steps": steps})

    # Phase 2: evaluation.
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    for item in plan:
        data, symmetry, runs = item["data"], item["symmetry"], item["runs"]
        box = int(json.loads((data / "simulation.json").read_text()).get("box_px", args.box))
        oracle_dir, oracle_step = item["oracle"]
        res: dict[str, Any] = {
            "symmetry": symmetry,
            "oracle": {**oracle_step, **_evaluate(oracle_dir, data, symmetry, runs, log,
                                                  align=False, pose=False)},
            "methods": {},
        }
        for method, (run_dir, step) in item["steps"].items():
            r = {**step, **_evaluate(run_dir, data, symmetry, runs, log, align=True, pose=True)}
            metrics = read_jsonl(run_dir / "metrics.jsonl")
            per_stage: dict[str, list[float]] = {}
            for m in metrics:
                per_stage.setdefault(m["stage"], []).append(m["wall_time_s"])
            r["s_per_epoch"] = {k: sum(v) / len(v) for k, v in per_stage.items()}
            r["epochs"] = len(metrics)
            r["encoder_parameters"] = _encoder_parameters(run_dir, box)
            r["fig3"] = fsc_points(run_dir, data / "gt.mrc", args.fig3_epochs)
            r["fig4"] = error_curve(run_dir, data, box, symmetry)
            r["switch_epoch"] = _switch_epoch(run_dir)
            res["methods"][method] = r
        name = item["name"]
        results[f"{name} ({symmetry})" if symmetry else name] = res

    header = (f"{args.n_particles} particles, {args.box} px at {args.pixel_size:g} Å/px, "
              f"SNR {args.snr:g}, seed {args.seed}, preset `{args.preset}`"
              f"{f', {args.epochs} epochs' if args.epochs else ''}, {args.threads} threads"
              f"{' ' + ' '.join(args.reconstruct_args) if args.reconstruct_args else ''}")
    rows1, rows2 = [], []
    for dataset, res in results.items():
        for method, r in res["methods"].items():
            rows1.append([dataset, method, _fmt(r.get("mean_rotation_error_deg"), ".2f", "°"),
                          _fmt(r.get("median_rotation_error_deg"), ".2f", "°"),
                          _fmt(r["fsc_0.5_angstrom"], ".2f", " Å")])
            rows2.append([dataset, method, _fmt(r["s_per_epoch"].get("autoencode"), ".1f"),
                          _fmt(r["s_per_epoch"].get("autodecode"), ".1f"), str(r["epochs"]),
                          _fmt(r["wall_s"] / 60, ".1f"), _fmt(r["peak_rss_mib"], ".0f"),
                          f"{r['encoder_parameters']:,}"])
        o = res["oracle"]
        rows1.append([dataset, "oracle (true poses)", "0 (true poses)", "0 (true poses)",
                      _fmt(o["fsc_0.5_angstrom"], ".2f", " Å")])
        rows2.append([dataset, "oracle (backproject)", "—", "—", "—", _fmt(o["wall_s"] / 60, ".1f"),
                      _fmt(o["peak_rss_mib"], ".0f"), "0"])
    text = [
        f"### Methods side by side: {header}",
        "",
        "Table 1: rotation error (global rotation and hand removed; modulo the point group for "
        "the symmetric particle) and FSC = 0.5 of the final map against the ground truth.",
        "",
        markdown_table(["dataset", "method", "mean rot. error", "median rot. error",
                        "FSC=0.5 vs GT"], rows1),
        "",
        "Table 2: mean seconds per epoch per stage (metrics.jsonl), wall time of the whole "
        "command (includes preprocessing and the final map), peak RSS, encoder parameters.",
        "",
        markdown_table(["dataset", "method", "s/epoch autoencode", "s/epoch autodecode",
                        "epochs", "wall (min)", "peak RSS (MiB)", "encoder params"], rows2),
        "",
    ]
    fig3 = args.workdir / "fig3_resolution_vs_time.png"
    _plot_fig3(results, fig3)
    text.append(f"Fig. 3: {fig3}")
    fig4 = args.workdir / "fig4_rotation_error_vs_epoch.png"
    if _plot_fig4(results, fig4):
        text.append(f"Fig. 4: {fig4}")
    out = "\n".join(text)
    print("\n" + out)
    (args.workdir / "results.md").write_text(out + "\n")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
