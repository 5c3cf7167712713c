"""Finished runs on a data set with junk (``benchmarks/junk_set.py``), side by side.

For each ``label=RUN`` (a ``cryospin reconstruct`` folder on ``--data`` or on a subset of it
given by ``--ind`` in the run's config): the rotation error of the particles that are not junk
(``DATA/junk.npy``; all of them when the file is absent) after global alignment, also modulo
``--symmetry`` (a pseudo-symmetric particle's copies), the share within 10°, ``map.mrc``'s FSC
0.5 against ``DATA/gt.mrc`` (aligned, both hands), the stage-2 epochs with a global search,
the share of junk and of particles scoring no better than an empty image
(``rlnLogLikeliContribution`` of ``poses.star``) and the training time (``metrics.jsonl``;
compare only runs made one at a time on an idle machine)::

    python benchmarks/bench_junk.py --data SPIKE_64_EMPTY30 --symmetry C3 \\
        "no empty class=runs/a" "empty class=runs/b"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, markdown_table, read_jsonl  # noqa: E402

from cryospin.evaluate.align import align_maps  # noqa: E402
from cryospin.evaluate.fsc import fsc  # noqa: E402
from cryospin.evaluate.pose_error import pose_error  # noqa: E402
from cryospin.io.mrc import read_map  # noqa: E402
from cryospin.io.particles import load_indices, load_particles  # noqa: E402
from cryospin.io.star_tables import numbers, read_star_tables  # noqa: E402
from cryospin.train.config import load_config  # noqa: E402

SCORE_COLUMN = "rlnLogLikeliContribution"


def _row(label: str, run: Path, data: Path, symmetry: str | None) -> list[str]:
    truth = load_particles(data / "particles.star", metadata_only=True, no_ctf=True)
    n_all = len(truth)
    junk = np.zeros(n_all, dtype=bool)
    if (data / "junk.npy").exists():
        junk[np.load(data / "junk.npy")] = True
    config = load_config(run / "config.yaml")
    ind = config.input.ind
    rows = np.arange(n_all) if ind is None else load_indices(ind, n=n_all)
    box = int(truth.box_px)
    pred = load_particles(run / "poses.star", metadata_only=True, no_ctf=True, box_px=box)
    good = ~junk[rows]
    assert pred.rotations is not None and truth.rotations is not None
    gt_rot = truth.rotations[torch.from_numpy(rows)]
    mask = torch.from_numpy(good)
    c1 = pose_error(pred.rotations[mask], gt_rot[mask]).rotation_error_deg
    modulo = (pose_error(pred.rotations[mask], gt_rot[mask], symmetry=symmetry)
              .rotation_error_deg if symmetry else c1)
    gt, apix = read_map(data / "gt.mrc")
    vol, _ = read_map(run / "map.mrc")
    gt_t = torch.from_numpy(gt.copy())
    aligned = align_maps(gt_t, torch.from_numpy(vol.copy())).aligned
    resolution = fsc(gt_t, aligned, pixel_size_angstrom=apix).resolution(0.5)
    metrics = read_jsonl(run / "metrics.jsonl")
    stage2 = [m for m in metrics if m["stage"] == "autodecode"]
    stopped = [m["extra"]["search_stop"]["after_epoch"] for m in metrics
               if "search_stop" in (m.get("extra") or {})]
    switch = min((m["epoch"] for m in stage2), default=0) - 1
    search = (stopped[0] - switch) if stopped else min(len(stage2),
                                                       config.schedule.search_epochs)
    table, _ = read_star_tables(run / "poses.star")
    flagged = "–"
    if SCORE_COLUMN in table.columns:
        low = numbers(table[SCORE_COLUMN]) <= 0
        flagged = (f"{100 * low[~good].mean():.1f} / " if (~good).any() else "– / ") + \
                  f"{100 * low[good].mean():.2f} %"
    return [label, f"{len(rows):,} ({int((~good).sum()):,} junk)", str(search),
            f"{np.median(c1):.2f}°", f"{np.median(modulo):.2f}°",
            f"{100 * np.mean(c1 < 10):.1f} %", f"{resolution:.2f} Å", flagged,
            f"{metrics[-1]['elapsed_s']:.0f} s" if metrics else "–"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--symmetry", default=None, help="pseudo-symmetry for the errors")
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN")
    args = parser.parse_args(argv)
    print(machine_line())
    header = ["run", "images", "search epochs", "median (not junk)",
              f"modulo {args.symmetry or 'C1'}", "within 10°", "FSC 0.5 vs truth",
              "score ≤ 0: junk / particles", "training"]
    rows = []
    for spec in args.runs:
        label, _, run = spec.partition("=")
        rows.append(_row(label, Path(run), args.data, args.symmetry))
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
