"""Median rotation error and FSC against training wall time, for finished runs on one data set.

The issue-14 question (the paper's Fig. 4, answered on our machine): which method reaches a
given accuracy soonest. Give each run folder a label; every run must be on the same simulated
data set (``--data``, with ``gt_poses.pkl`` and ``gt.mrc``) and, for the wall times to compare,
have run one at a time on an otherwise idle machine (``metrics.jsonl``'s ``elapsed_s``; a
resumed run's elapsed time counts only the time it computed). Prints a Markdown table per run
(epoch, stage, elapsed minutes, median error of the tracked particles, FSC = 0.5 of a subset of
the epoch maps) and the first elapsed time at which each run's median is at or below 20°, 3° and
2°; ``--plot`` writes both curves side by side::

    python benchmarks/bench_curves.py --data D7_64 --symmetry D7 \\
        search=runs/d7_default semi-amortized=runs/d7_semi --plot d7_curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, markdown_table, read_jsonl  # noqa: E402
from _curves import error_curve, fsc_points  # noqa: E402

THRESHOLDS_DEG = (20.0, 3.0, 2.0)


def _curve(run_dir: Path, data: Path, symmetry: str | None,
           fsc_epochs: int) -> list[dict[str, object]]:
    metrics = {int(m["epoch"]): m for m in read_jsonl(run_dir / "metrics.jsonl")}
    box = _box_px(data)
    errors = dict(error_curve(run_dir, data, box, symmetry) or [])
    fsc = {int(p["epoch"]): p["resolution_angstrom"]
           for p in fsc_points(run_dir, data / "gt.mrc", fsc_epochs)}
    return [{"epoch": e, "stage": m["stage"], "elapsed_min": m["elapsed_s"] / 60,
             "median_deg": errors.get(e), "fsc_angstrom": fsc.get(e)}
            for e, m in sorted(metrics.items())]


def _box_px(data: Path) -> int:
    """The box of the simulated data set (``simulation.json``)."""
    return int(json.loads((data / "simulation.json").read_text())["box_px"])


def _first_below(curve: list[dict[str, object]], limit: float) -> str:
    for p in curve:
        err = p["median_deg"]
        if isinstance(err, float) and err <= limit:
            return f"{p['elapsed_min']:.1f} min (epoch {p['epoch']})"
    return "not reached"


def _fmt(x: object, spec: str) -> str:
    return "—" if not isinstance(x, float) or not math.isfinite(x) else format(x, spec)


def _plot(curves: dict[str, list[dict[str, object]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_fsc = any(isinstance(p["fsc_angstrom"], float) and math.isfinite(p["fsc_angstrom"])
                   for curve in curves.values() for p in curve)
    fig, axes = plt.subplots(1, 2 if with_fsc else 1, figsize=(10 if with_fsc else 5.5, 4),
                             squeeze=False)
    a = axes[0][0]
    for label, curve in curves.items():
        pts = [(p["elapsed_min"], p["median_deg"]) for p in curve
               if isinstance(p["median_deg"], float)]
        if pts:
            a.plot(*zip(*pts, strict=True), "o-", ms=3, label=label)
        pts = [(p["elapsed_min"], p["fsc_angstrom"]) for p in curve
               if isinstance(p["fsc_angstrom"], float) and math.isfinite(p["fsc_angstrom"])]
        if pts:
            axes[0][1].plot(*zip(*pts, strict=True), "o-", ms=3, label=label)
    for limit in (3.0, 2.0):
        a.axhline(limit, color="grey", ls=":", lw=0.8)
    a.set_yscale("log")
    a.set_ylabel("median rotation error of the tracked particles (°)")
    if with_fsc:  # no FSC panel when no epoch map was scored (--fsc-epochs 0)
        axes[0][1].set_ylabel("FSC = 0.5 vs ground truth (Å)")
    for ax in axes[0]:
        ax.set_xlabel("training wall time (min)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--data", type=Path, required=True, help="simulated data set folder")
    p.add_argument("--symmetry", default=None, help="errors modulo this point group")
    p.add_argument("--fsc-epochs", type=int, default=6, help="epoch maps scored per run")
    p.add_argument("--plot", type=Path, default=None, help="write the curves as a PNG")
    args = p.parse_args()
    curves: dict[str, list[dict[str, object]]] = {}
    for item in args.runs:
        label, sep, run = item.partition("=")
        if not sep:
            p.error(f"{item!r}: expected LABEL=RUN_DIR")
        curves[label] = _curve(Path(run), args.data, args.symmetry, args.fsc_epochs)
    modulo = f" (modulo {args.symmetry})" if args.symmetry else ""
    for label, curve in curves.items():
        print(f"\n### {label}{modulo}\n")
        print(markdown_table(["epoch", "stage", "elapsed (min)", "median error (°)",
                              "FSC 0.5 (Å)"],
                             [[str(c["epoch"]), str(c["stage"]), _fmt(c["elapsed_min"], ".1f"),
                               _fmt(c["median_deg"], ".2f"), _fmt(c["fsc_angstrom"], ".2f")]
                              for c in curve]))
    print(f"\n### First time at or below{modulo}\n")
    print(markdown_table(["run"] + [f"≤ {t:g}°" for t in THRESHOLDS_DEG],
                         [[label] + [_first_below(c, t) for t in THRESHOLDS_DEG]
                          for label, c in curves.items()]))
    print(f"\nmachine (of this evaluation, not of the runs): {machine_line()}")
    if args.plot:
        _plot(curves, args.plot, f"{args.data.name}{modulo}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
