"""Run report of a gold-standard (``cryospin reconstruct --halves``) run folder.

A halves run folder (:mod:`cryospin.train.halves`) holds two ordinary run folders, ``half_A/`` and
``half_B/``, and the combined outputs: ``fsc.json`` (the four gold-standard FSC curves, the
alignment of half B onto half A, the half sizes), ``map.mrc`` (FSC-weighted average),
``map_masked.mrc``, ``mask.mrc`` and ``poses.star`` (half B's poses in half A's frame).

:func:`write_halves_report` writes each half's own report (``half_A/report.html``,
``half_B/report.html``, :func:`cryospin.report.write_report`) and a page for the whole run:
the gold-standard FSC curves with the 0.143 line, both halves' loss against wall time with
their switches, the orientation distribution of the combined poses, central sections and
projections of the combined map and, with a ground truth, the combined map's FSC against it and
the combined poses' rotation error. The figures go to the folder named after the HTML file
(default ``RUN_DIR/report/``), as for a single run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.report import (
    HAND_NOTE,
    MIRROR_NOTE,
    FigureSet,
    ReportResult,
    add_gt_figures,
    build_html,
    compare_map_with_gt,
    compare_poses_with_gt,
    elapsed_seconds,
    format_duration,
    format_resolution,
    ground_truth_on_grid,
    gt_summary_rows,
    json_ready,
    load_run,
    plot_map_views,
    plot_orientations,
    read_gt_poses,
    read_poses,
    read_volume,
    save_figure,
    switch_epoch,
    time_axis_unit,
    write_report,
)
from cryospin.train.halves import HALF_NAMES, HalvesFiles, is_halves_run

__all__ = ["plot_halves_training", "write_halves_report"]

_STAGE2 = "autodecode"
_COLOURS = ("tab:blue", "tab:orange")


def plot_halves_training(
    metrics_by_half: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | Path
) -> None:
    """Both halves' loss against each half's own wall time, one PNG.

    Circles are auto-encoding epochs, squares auto-decoding ones; a dashed line in the half's
    colour marks its switch (end of its last auto-encoding epoch).

    Parameters
    ----------
    metrics_by_half : sequence of (label, metrics)
        ``metrics.jsonl`` lines of each half, in epoch order; halves without lines are skipped.
    path : PNG to write.
    """
    from cryospin.plotting import pyplot

    items = [(label, m) for label, m in metrics_by_half if m]
    if not items:
        raise ValueError("no metrics to plot")
    plt = pyplot()
    last = max(float(elapsed_seconds(m)[-1]) for _, m in items)
    unit, xlabel = time_axis_unit(last)
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    for (label, metrics), colour in zip(items, _COLOURS * len(items), strict=False):
        t = elapsed_seconds(metrics) / unit
        loss = np.array([np.nan if r.get("loss") is None else float(r["loss"])
                         for r in metrics])
        stage2 = np.array([r.get("stage") == _STAGE2 for r in metrics])
        ax.plot(t, loss, color=colour, linewidth=1, alpha=0.6)
        ax.plot(t[~stage2], loss[~stage2], "o", color=colour, label=f"{label}: auto-encoding")
        ax.plot(t[stage2], loss[stage2], "s", color=colour, mfc="none",
                label=f"{label}: auto-decoding")
        k = switch_epoch(metrics)
        if k is not None:
            i = next(j for j, r in enumerate(metrics) if int(r["epoch"]) == k)
            ax.axvline(float(t[i - 1]) if i > 0 else 0.0, color=colour, linestyle="--",
                       linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (mean NLL / image)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("the two halves (dashed: each half's switch)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _read_fsc_json(path: Path) -> tuple[Any, dict[str, Any]]:
    """The gold-standard curves and the raw summary of a halves run's ``fsc.json``."""
    from cryospin.evaluate.gold_standard import GoldStandardFSC

    if not path.is_file():
        raise InputError("the halves run has not finished (no fsc.json); each half's own "
                         "report: cryospin report RUN_DIR/half_A", path.parent)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return GoldStandardFSC.from_dict(d), d
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not a gold-standard FSC summary ({exc.__class__.__name__}: {exc})",
                         path) from None


def write_halves_report(
    run_dir: str | Path,
    *,
    gt_map: str | Path | None = None,
    gt_poses: str | Path | None = None,
    output: str | Path | None = None,
    max_epoch_fsc: int = 10,
    search_hand: bool = True,
) -> ReportResult:
    """Write both halves' reports and ``report.html`` for a ``--halves`` run folder.

    Parameters
    ----------
    run_dir : halves run folder (``halves.json`` marker).
    gt_map : ground-truth map (``.mrc``): the combined map's FSC against it (aligned, both
        hands) on this page; each half's report also compares its epoch maps with it (at most
        ``max_epoch_fsc``, as :func:`cryospin.report.write_report`).
    gt_poses : ground-truth poses of all particles (``.star``/``.cs``/``.pkl``, the order of
        the particles given to ``reconstruct``): rotation error of the combined poses.
    output : the HTML file (default ``RUN_DIR/report.html``); figures go to the folder named
        after its stem.
    max_epoch_fsc, search_hand : as :func:`cryospin.report.write_report`.

    Returns
    -------
    ReportResult
        The page's figures and summary (also ``<figures>/summary.json``).

    Raises
    ------
    InputError
        Not a halves run, not finished, or a ground truth that does not fit.
    """
    files = HalvesFiles(run_dir)
    if not is_halves_run(files.dir):
        raise InputError("not a --halves run folder (no halves.json)", files.dir)
    # 1. read and check every input before writing anything
    gold, fsc_summary = _read_fsc_json(files.fsc_json)
    if not files.map.is_file():
        raise InputError("the halves run has no combined map.mrc (not finished)", files.dir)
    volume, apix = read_volume(files.map)
    box = int(volume.shape[0])
    halves = [load_run(files.half_dir(w)) for w in (1, 2)]
    try:
        marker = json.loads(files.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError("halves.json is unreadable", files.marker) from None
    gt = None if gt_map is None else ground_truth_on_grid(Path(gt_map), box, apix)
    rotations = shifts = gt_R = gt_t = None
    if files.star.is_file():
        rotations, shifts = read_poses(files.star, box)
    if gt_poses is not None:
        gt_R, gt_t = read_gt_poses(gt_poses, rotations, box, files.dir)
    html_path = Path(output) if output is not None else files.dir / "report.html"

    # 2. each half's own report (its training, head usage, map, orientations)
    half_pages = [write_report(h.run_dir, gt_map=gt_map, max_epoch_fsc=max_epoch_fsc,
                               search_hand=search_hand).html_path for h in halves]

    # 3. numbers
    sizes = fsc_summary.get("half_sizes") or marker.get("half_sizes") or [None, None]
    walls = [float(elapsed_seconds(h.metrics)[-1]) if h.metrics else 0.0 for h in halves]
    align = fsc_summary.get("alignment") or {}
    summary: dict[str, Any] = {
        "run_dir": str(files.dir),
        "particles": int(sum(s for s in sizes if s is not None)) or None,
        "half_sizes": sizes,
        "split_source": marker.get("split_source"),
        "box_px": box,
        "pixel_size_angstrom": apix,
        "epochs_completed": [int(h.metrics[-1]["epoch"]) if h.metrics else 0 for h in halves],
        "wall_time_s": walls,
        "half_b_mirrored": align.get("flipped"),
        "half_alignment_correlation": align.get("correlation"),
        "resolution_0143_corrected": gold.final_resolution,
        "resolution_0143_unmasked": gold.unmasked.resolution(0.143),
        "resolution_0143_masked": gold.masked.resolution(0.143),
        "randomise_from": gold.randomise_from_resolution,
    }
    final_fsc = pose_result = None
    notes: list[str] = []
    if gt is not None:
        final_fsc, aligned, fields = compare_map_with_gt(gt, volume, apix,
                                                         search_hand=search_hand)
        summary.update(fields)
        if aligned.flipped:
            notes.append(MIRROR_NOTE)
    if gt_R is not None:
        pose_result, fields = compare_poses_with_gt(rotations, shifts, gt_R, gt_t,
                                                    search_hand=search_hand)
        summary.update(fields)

    # 4. figures, then the page
    figs = FigureSet(html_path)
    figs.create()
    add = figs.add

    from cryospin.plotting import plot_fsc

    if gold.randomise_from_shell > gold.unmasked.box_px // 2:
        randomised = "(none: the unmasked FSC never fell below the threshold)"
    elif gold.randomise_from_shell <= 0:
        randomised = "at every shell"
    else:
        randomised = f"beyond {format_resolution(gold.randomise_from_resolution)}"
    plot_fsc([("unmasked", gold.unmasked), ("masked", gold.masked),
              ("phase-randomised masked", gold.phase_randomised),
              ("corrected", gold.corrected)],
             add("fsc_gold.png", "Gold-standard FSC",
                 "FSC of half A and half B (aligned onto A) without and with the automatic "
                 f"mask, of the masked halves with phases randomised {randomised}, and the "
                 "corrected FSC whose 0.143 crossing is the resolution (the numbers are in "
                 "fsc.json and postprocess.star)."),
             thresholds=(0.143,), title="gold-standard FSC (half A vs aligned half B)")
    if any(h.metrics for h in halves):
        plot_halves_training([(n.replace("_", " "), h.metrics)
                              for n, h in zip(HALF_NAMES, halves, strict=True)],
                             add("training.png", "Training of the two halves",
                                 "Loss against each half's own wall time (the halves run one "
                                 "after the other, from independent initialisations); dashed "
                                 "lines mark each half's switch to auto-decoding."))
    if rotations is not None:
        plot_orientations(rotations, add("orientations.png", "Orientation distribution",
                                         "View directions of the combined poses (half B's "
                                         "brought into half A's frame), binned in equal-area "
                                         "cells on a Mollweide projection."))
    plot_map_views(volume, add("map_views.png", "Combined map",
                               "Central sections and projections of map.mrc, the FSC-weighted "
                               "average of the two aligned half maps (unmasked, unsharpened)."),
                   pixel_size_angstrom=apix)
    add_gt_figures(figs, map_path=files.map, gt_map=gt_map, final_fsc=final_fsc,
                   gt_rotations=gt_R, pose_result=pose_result)
    links = ", ".join(f'<a href="{figs.link(p)}">{n.replace("_", " ")}</a>'
                      for n, p in zip(HALF_NAMES, half_pages, strict=True))
    notes.append(f"Each half's own report (training, head usage, map, orientations): {links}.")
    notes.append(HAND_NOTE)
    config_path = files.config
    page = _page(files, summary, figs.figures, notes, gold,
                 config_path.read_text(encoding="utf-8") if config_path.is_file() else None)
    atomic_write_text(figs.dir / "summary.json",
                      json.dumps(json_ready(summary), indent=2) + "\n")
    atomic_write_text(html_path, page)
    return ReportResult(html_path=html_path, figure_paths=figs.paths, summary=summary)


def _page(files: HalvesFiles, s: dict[str, Any], figures: list[tuple[str, str, str]],
          notes: list[str], gold: Any, config_text: str | None) -> str:
    a, b = s["half_sizes"]
    rows: list[tuple[str, str]] = [("run folder", str(files.dir))]
    if s["particles"]:
        rows.append(("particles", f"{s['particles']:,} (half A {a:,}, half B {b:,}; split by "
                                  f"{s['split_source']})"))
    rows.append(("box", f"{s['box_px']} px"))
    if s["pixel_size_angstrom"]:
        rows.append(("pixel size", f"{s['pixel_size_angstrom']:.4g} Å"))
    ea, eb = s["epochs_completed"]
    wa, wb = s["wall_time_s"]
    rows.append(("epochs", f"half A {ea}, half B {eb}"))
    rows.append(("wall time", f"{format_duration(wa + wb)} (half A {format_duration(wa)}, half B "
                              f"{format_duration(wb)})"))
    if s["half_alignment_correlation"] is not None:
        rows.append(("half B onto half A", ("mirrored, " if s["half_b_mirrored"] else "")
                     + f"correlation {s['half_alignment_correlation']:.3f}"))
    rows.append(("resolution (gold standard)",
                 f"{format_resolution(s['resolution_0143_corrected'])} (corrected FSC 0.143; "
                 f"unmasked "
                 f"{format_resolution(s['resolution_0143_unmasked'])}, masked "
                 f"{format_resolution(s['resolution_0143_masked'])})"))
    rows += gt_summary_rows(s)
    curves = (("unmasked", gold.unmasked), ("masked", gold.masked),
              ("phase-randomised masked", gold.phase_randomised), ("corrected", gold.corrected))
    table = ("Gold-standard FSC resolutions", ["curve", "FSC 0.5", "FSC 0.143"],
             [[name, format_resolution(c.resolution(0.5)), format_resolution(c.resolution(0.143))]
              for name, c in curves])
    return build_html(title=f"cryospin gold-standard report: {files.dir.resolve().name}",
                      summary=rows, figures=figures, notes=notes, tables=[table],
                      config_text=config_text)
