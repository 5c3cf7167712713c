"""``cryospin report``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.errors import InputError
from cryospin.report import write_halves_report, write_report
from cryospin.rundir import StartsFiles
from cryospin.train.halves import is_halves_run
from cryospin.train.starts import is_starts_run


def _reported_folder(run_dir: Path) -> Path:
    """The run folder to report: ``run_dir``, or a ``--starts`` run's chosen start."""
    if not is_starts_run(run_dir):
        return run_dir
    chosen = StartsFiles(run_dir).chosen
    if not chosen.is_dir():
        raise InputError("a --starts run without a choice yet (not every start has finished): "
                         f"report one start, e.g. cryospin report {run_dir / 'start_1'}",
                         run_dir)
    print(f"a --starts run: the report of the chosen start, {chosen.resolve().name}")
    return chosen


def main(args: argparse.Namespace) -> int:
    """Build the report and print where it is."""
    if args.epoch_fsc < 0:
        raise InputError(f"--epoch-fsc must be >= 0, got {args.epoch_fsc}")
    run_dir = _reported_folder(Path(args.run_dir))
    writer = write_halves_report if is_halves_run(run_dir) else write_report
    result = writer(
        run_dir, gt_map=args.gt, gt_poses=args.gt_poses, output=args.output,
        max_epoch_fsc=args.epoch_fsc, search_hand=not args.no_flip,
    )
    s = result.summary
    if "resolution_05_angstrom" in s:
        print(f"resolution vs {args.gt.name}: {s['resolution_05_angstrom']:.2f} Å at 0.5, "
              f"{s['resolution_0143_angstrom']:.2f} Å at 0.143"
              + (" (mirrored hand)" if s["hand_flipped_vs_gt"] else ""))
    if "median_rotation_error_deg" in s:
        print(f"median rotation error vs {args.gt_poses.name}: "
              f"{s['median_rotation_error_deg']:.2f}°")
    print(f"wrote {result.html_path} ({len(result.figure_paths)} figures in "
          f"{result.html_path.parent / result.html_path.stem})")
    return 0
