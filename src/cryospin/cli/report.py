"""Write an HTML report with PNG figures for a run folder of cryospin reconstruct.

The page (no network, no JavaScript) shows a summary table, the loss against wall time with the
switch marked, the encoder head usage, the orientation distribution of the final poses, central
sections and projections of the map, the configuration and a note on handedness. With --gt the
map is aligned to a ground-truth map: FSC curve and resolution per epoch; with --gt-poses, the
rotation-error histogram of the final poses. Figures go to the folder named after the HTML file
(default RUN_DIR/report/).

For a --halves run folder the page shows the gold-standard FSC curves, both halves' training,
the combined map and poses (and, with --gt/--gt-poses, their FSC and pose error); each half
gets its own report too (RUN_DIR/half_A/report.html, half_B/report.html).

Example::

    cryospin report run/ --gt data/gt.mrc --gt-poses data/particles.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin report``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder")
    parser.add_argument("--gt", type=Path, default=None, metavar="MAP",
                        help="ground-truth map (.mrc): FSC and resolution per epoch")
    parser.add_argument("--gt-poses", type=Path, default=None, metavar="POSES",
                        help="ground-truth poses (.star, .cs or cryoDRGN .pkl): pose error")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, default=None,
                     metavar="HTML",
                     help="output page (default RUN_DIR/report.html)")
    parser.add_argument("--epoch-fsc", type=int, default=10, metavar="N",
                        help="with --gt, compare at most N epochs' maps with it, the final "
                             "map included (default 10; 0 or 1 = final map only)")
    parser.add_argument("--no-flip", action="store_true",
                        help="with --gt/--gt-poses, do not try the mirrored hand")


def main(args: argparse.Namespace) -> int:
    """Build the report and print where it is."""
    from cryospin.errors import InputError
    from cryospin.report import write_report
    from cryospin.report_halves import write_halves_report
    from cryospin.train.halves import is_halves_run

    if args.epoch_fsc < 0:
        raise InputError(f"--epoch-fsc must be >= 0, got {args.epoch_fsc}")
    writer = write_halves_report if is_halves_run(args.run_dir) else write_report
    result = writer(
        args.run_dir, gt_map=args.gt, gt_poses=args.gt_poses, output=args.output,
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
