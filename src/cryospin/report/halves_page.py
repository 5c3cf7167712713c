"""The report of a gold-standard (``cryospin reconstruct --halves``) run folder.

A halves run folder (:mod:`cryospin.train.halves`) holds two ordinary run folders, ``half_A/`` and
``half_B/``, and the combined outputs: ``fsc.json`` (the four gold-standard FSC curves, the
alignment of half B onto half A, the half sizes, the sharpening), ``map.mrc`` (FSC-weighted
average), ``map_masked.mrc``, ``mask.mrc``, ``postprocess.mrc`` (sharpened), ``postprocess.star``
(with the Guinier plot) and ``poses.star`` (half B's poses in half A's frame).

:func:`write_halves_report` writes each half's own report (``half_A/report.html``,
``half_B/report.html``, :func:`cryospin.report.write_report`) and a page for the whole run:
the gold-standard FSC curves with the 0.143 line, the Guinier plot with the fitted B-factor's
line (from ``postprocess.star``; none in runs from before it), both halves' loss against wall
time with
their switches, the orientation distribution of the combined poses, central sections and
projections of the combined map and, with a ground truth, the combined map's FSC against it and
the combined poses' rotation error. The figures go to the folder named after the HTML file
(default ``RUN_DIR/report/``), as for a single run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from torch import Tensor

from cryospin.errors import InputError
from cryospin.evaluate.fsc import FSCResult
from cryospin.evaluate.gold_standard import GoldStandardFSC
from cryospin.evaluate.pose_error import PoseErrorResult
from cryospin.evaluate.sharpen import GuinierFit
from cryospin.io.mrc import read_cubic_map
from cryospin.plotting import plot_fsc, plot_guinier, plot_local_resolution
from cryospin.report.analysis import JSONObject, halves_summary, junk_scored, score_summary
from cryospin.report.figures import (
    add_gt_figures,
    plot_halves_training,
    plot_orientations,
    plot_particle_scores,
)
from cryospin.report.ground_truth import compare_map_with_gt, compare_poses_with_gt
from cryospin.report.html import (
    HAND_NOTE,
    MIRROR_NOTE,
    FigureSet,
    ReportResult,
    build_html,
    format_resolution,
    gold_standard_table,
    halves_summary_rows,
    symmetry_section,
    write_page,
)
from cryospin.report.inputs import (
    ground_truth_on_grid,
    read_gt_poses,
    read_poses,
    read_scores,
)
from cryospin.report.map_figure import add_map_views
from cryospin.report.run_page import write_report
from cryospin.report.symmetry_check import (
    DrawnAxes,
    axes_to_draw,
    check_symmetry,
    imposed_symmetry,
    relaxed_symmetry,
    symmetry_summary,
)
from cryospin.rundir import (
    HALF_NAMES,
    MAP,
    POSTPROCESS_MAP,
    SELECTED,
    HalvesFiles,
    RunData,
    StartsFiles,
    load_run,
)
from cryospin.train.halves import is_halves_run
from cryospin.train.scores import EMPTY_SCORE, SCORE_COLUMN, score_alternative
from cryospin.train.starts import is_starts_run, starts_of

__all__ = ["write_halves_report"]


@dataclass(frozen=True)
class _Inputs:
    """Everything the halves page reads, checked before anything is written."""

    files: HalvesFiles
    gold: GoldStandardFSC
    fsc_summary: JSONObject  # fsc.json as written
    marker: JSONObject  # halves.json
    halves: list[RunData]  # the run each half's result comes from (its chosen start)
    half_runs: list[list[RunData]]  # every run of each half (one, or its starts)
    volume: np.ndarray  # (L, L, L) [z, y, x], the combined map
    apix: float  # Å
    gt: np.ndarray | None  # ground-truth map on the run's grid
    rotations: Tensor | None  # (N, 3, 3), the combined poses
    shifts: Tensor | None  # (N, 2) px
    scores: np.ndarray | None  # (N,) nats, each particle's under its own half's map
    gt_R: Tensor | None
    gt_t: Tensor | None
    guinier: pd.DataFrame | None  # postprocess.star's data_guinier (None before sharpening)
    sharpened: np.ndarray | None  # postprocess.mrc when a B-factor was applied, else None
    local: np.ndarray | None  # locres.mrc (Å, 0 outside the mask); None before it existed


def _read_fsc_json(path: Path) -> tuple[GoldStandardFSC, JSONObject]:
    """The gold-standard curves and the raw summary of a halves run's ``fsc.json``."""
    if not path.is_file():
        raise InputError("the halves run has not finished (no fsc.json); each half's own "
                         "report: cryospin report RUN_DIR/half_A", path.parent)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return GoldStandardFSC.from_dict(d), d
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not a gold-standard FSC summary ({exc.__class__.__name__}: {exc})",
                         path) from None


def _read_guinier(path: Path) -> pd.DataFrame | None:
    """``postprocess.star``'s ``data_guinier`` (None when absent: a run from before the
    sharpening, or a file that cannot be read, which the page then goes without)."""
    if not path.is_file():
        return None
    try:
        block = starfile.read(path, always_dict=True).get("guinier")
    except (OSError, ValueError, KeyError, IndexError):
        return None
    if not isinstance(block, pd.DataFrame) or "rlnResolutionSquared" not in block.columns:
        return None
    return block


def _read_inputs(run_dir: str | Path, gt_map: str | Path | None,
                 gt_poses: str | Path | None) -> _Inputs:
    files = HalvesFiles(run_dir)
    if not is_halves_run(files.dir):
        raise InputError("not a --halves run folder (no halves.json)", files.dir)
    gold, fsc_summary = _read_fsc_json(files.fsc_json)
    if not files.map.is_file():
        raise InputError("the halves run has no combined map.mrc (not finished)", files.dir)
    volume, apix = read_cubic_map(files.map)
    box = int(volume.shape[0])
    half_runs = [[load_run(d.resolve()) for d in _runs_of_half(files, w)] for w in (1, 2)]
    chosen = [files.half_run(w).resolve() for w in (1, 2)]
    halves = [next(r for r in runs if r.run_dir == c)  # each half's chosen run, loaded once
              for runs, c in zip(half_runs, chosen, strict=True)]
    try:
        marker = json.loads(files.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError("halves.json is unreadable", files.marker) from None
    gt = None if gt_map is None else ground_truth_on_grid(Path(gt_map), box, apix)
    rotations = shifts = gt_R = gt_t = scores = None
    if files.star.is_file():
        rotations, shifts = read_poses(files.star, box)
        scores = read_scores(files.star, box)
    if gt_poses is not None:
        gt_R, gt_t = read_gt_poses(gt_poses, rotations, box, files.dir)
    sharp = fsc_summary.get("sharpening")
    sharpened = None
    if isinstance(sharp, dict) and sharp.get("bfactor_a2") and files.postprocessed.is_file():
        sharpened = read_cubic_map(files.postprocessed)[0]
    local = (read_cubic_map(files.local_resolution)[0] if files.local_resolution.is_file()
             else None)
    return _Inputs(files, gold, fsc_summary, marker, halves, half_runs, volume, apix, gt,
                   rotations, shifts, scores, gt_R, gt_t, _read_guinier(files.postprocess),
                   sharpened, local)


def _runs_of_half(files: HalvesFiles, which: int) -> list[Path]:
    """Half ``which``'s run folders: the half's folder, or its starts (``--halves
    --starts``)."""
    half = files.half_dir(which)
    if not is_starts_run(half):
        return [half]
    return [StartsFiles(half).start_dir(k) for k in range(1, starts_of(half) + 1)]


def _scores_against(inp: _Inputs) -> str:
    """What the combined star's scores are taken against (both halves run one config;
    :func:`cryospin.report.analysis.junk_scored` of half A)."""
    return score_alternative(junk_scored(inp.halves[0].config, inp.halves[0].metrics))


def _gold_figure(figs: FigureSet, gold: GoldStandardFSC) -> None:
    """The four gold-standard FSC curves with the 0.143 line."""
    if gold.randomise_from_shell > gold.unmasked.box_px // 2:
        randomised = "(none: the unmasked FSC never fell below the threshold)"
    elif gold.randomise_from_shell <= 0:
        randomised = "at every shell"
    else:
        randomised = f"beyond {format_resolution(gold.randomise_from_resolution)}"
    plot_fsc([("unmasked", gold.unmasked), ("masked", gold.masked),
              ("phase-randomised masked", gold.phase_randomised),
              ("corrected", gold.corrected)],
             figs.add("fsc_gold.png", "Gold-standard FSC",
                      "FSC of half A and half B (aligned onto A) without and with the automatic "
                      f"mask, of the masked halves with phases randomised {randomised}, and the "
                      "corrected FSC whose 0.143 crossing is the resolution (the numbers are in "
                      "fsc.json and postprocess.star)."),
             thresholds=(0.143,), title="gold-standard FSC (half A vs aligned half B)")


_GUINIER_CURVES = (("rlnLogAmplitudesOriginal", "average of the halves"),
                   ("rlnLogAmplitudesWeighted", "FSC-weighted (map.mrc)"),
                   ("rlnLogAmplitudesSharpened", f"sharpened ({POSTPROCESS_MAP})"))


def _guinier_figure(figs: FigureSet, inp: _Inputs) -> None:
    """The Guinier plot of the sharpening, when ``postprocess.star`` has one."""
    table = inp.guinier
    if table is None:
        return
    sharp = inp.fsc_summary.get("sharpening")
    fit = sharp.get("guinier_fit") if isinstance(sharp, dict) else None
    why = (f"the dashed line, fitted between {fit['low_angstrom']:g} Å and the resolution, "
           f"gives the B-factor applied to {POSTPROCESS_MAP}"
           if isinstance(fit, dict) else
           f"no B-factor was fitted ({sharp.get('no_fit_reason')}), so {POSTPROCESS_MAP} is "
           f"{MAP} low-passed at the resolution" if isinstance(sharp, dict) else "")
    plot_guinier(table["rlnResolutionSquared"].to_numpy(dtype=np.float64),
                 [(label, table[col].to_numpy(dtype=np.float64))
                  for col, label in _GUINIER_CURVES if col in table.columns],
                 GuinierFit.from_dict(fit) if isinstance(fit, dict) else None,
                 figs.add("guinier.png", "Guinier plot",
                          "Log of each shell's mean amplitude, within the mask, against the "
                          f"squared spatial frequency; {why} (postprocess.star's "
                          "data_guinier)."))


def _figures(figs: FigureSet, inp: _Inputs, gt_map: str | Path | None,
             final_fsc: FSCResult | None, pose_result: PoseErrorResult | None,
             drawn: DrawnAxes | None) -> None:
    """Every figure of the page, in page order."""
    _gold_figure(figs, inp.gold)
    _guinier_figure(figs, inp)
    if inp.local is not None and inp.local.shape == inp.volume.shape:
        plot_local_resolution(inp.volume, inp.local, figs.add(
            "local_resolution.png", "Local resolution",
            "Central sections of map.mrc coloured by the local resolution (locres.mrc: the "
            "FSC of the whitened halves at 0.143 within a small soft window around points "
            "inside the mask; blue the best, red the worst) and the histogram of its values "
            "within the mask. Single windows scatter: read the pattern, not one value."),
            unit="Å" if inp.apix else "px")
    if any(h.metrics for h in inp.halves):
        plot_halves_training([(n.replace("_", " "), h.metrics)
                              for n, h in zip(HALF_NAMES, inp.halves, strict=True)],
                             figs.add("training.png", "Training of the two halves",
                                      "Loss against each half's own wall time (the halves run "
                                      "one after the other, from independent initialisations); "
                                      "dashed lines mark each half's switch to auto-decoding."))
    if inp.rotations is not None:
        plot_orientations(inp.rotations, figs.add(
            "orientations.png", "Orientation distribution",
            "View directions of the combined poses (half B's brought into half A's frame), "
            "binned in equal-area cells on a Mollweide projection."))
    if inp.scores is not None:
        against = _scores_against(inp)
        plot_particle_scores(inp.scores, EMPTY_SCORE, figs.add(
            "particle_scores.png", "Particle scores",
            "Each particle's score under its own half's map (poses.star's "
            f"{SCORE_COLUMN}, nats): how much better the map explains its image than "
            f"{against} would. At or below the line: no better; {SELECTED} lists the "
            f"others, for --ind."), against)
    add_map_views(figs, inp.volume, title="Combined map",
                  what="map.mrc, the FSC-weighted average of the two aligned half maps "
                       "(unmasked, unsharpened)",
                  pixel_size_angstrom=inp.apix, drawn=drawn)
    if inp.sharpened is not None:
        bfactor = inp.fsc_summary["sharpening"]["bfactor_a2"]
        add_map_views(figs, inp.sharpened, title="Sharpened map",
                      what=f"{POSTPROCESS_MAP}, map.mrc sharpened by the B-factor "
                           f"{bfactor:.0f} Å² and low-passed at the resolution (unmasked)",
                      pixel_size_angstrom=inp.apix, drawn=drawn,
                      name="map_views_sharpened.png")
    add_gt_figures(figs, map_path=inp.files.map, gt_map=gt_map, final_fsc=final_fsc,
                   gt_rotations=inp.gt_R, pose_result=pose_result)


def _half_links(figs: FigureSet, half_pages: Sequence[Path], starts: Sequence[int]) -> str:
    """The note linking each half's own report (its chosen start's, with several starts)."""
    several = max(starts) > 1
    links = ", ".join(f'<a href="{figs.link(p)}">{n.replace("_", " ")}'
                      + (f" ({p.parent.name})" if several else "") + "</a>"
                      for n, p in zip(HALF_NAMES, half_pages, strict=True))
    if several:
        return (f"Each half's chosen start's own report (training, head usage, map, "
                f"orientations, and the choice among the half's starts: {starts[0]} in "
                f"half A, {starts[1]} in half B): {links}; every other start's report is in "
                "its own folder.")
    return f"Each half's own report (training, head usage, map, orientations): {links}."


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
    inp = _read_inputs(run_dir, gt_map, gt_poses)  # every input checked before writing
    files = inp.files
    html_path = Path(output) if output is not None else files.report
    # each run's own report (its training, head usage, map, orientations; every start's)
    pages = {r.run_dir: write_report(r.run_dir, gt_map=gt_map,
                                               max_epoch_fsc=max_epoch_fsc,
                                               search_hand=search_hand).html_path
             for runs in inp.half_runs for r in runs}
    half_pages = [pages[h.run_dir] for h in inp.halves]
    summary = halves_summary(str(files.dir), inp.halves, inp.gold, inp.fsc_summary, inp.marker,
                             box_px=int(inp.volume.shape[0]), pixel_size_angstrom=inp.apix,
                             half_runs=inp.half_runs)
    if inp.scores is not None:
        summary["particle_scores"] = score_summary(inp.scores, _scores_against(inp))
    final_fsc = pose_result = None
    notes: list[str] = []
    imposed = imposed_symmetry(inp.halves[0].config, inp.halves[0].metrics)
    modulo = None if imposed == "C1" else imposed
    if inp.gt is not None:
        final_fsc, aligned, fields = compare_map_with_gt(inp.gt, inp.volume, inp.apix,
                                                         search_hand=search_hand)
        summary.update(fields)
        if aligned.flipped:
            notes.append(MIRROR_NOTE)
    if inp.gt_R is not None and inp.rotations is not None:  # gt_R implies rotations (read_gt_poses)
        pose_result, pose_fields = compare_poses_with_gt(inp.rotations, inp.shifts, inp.gt_R,
                                                         inp.gt_t, search_hand=search_hand,
                                                         symmetry=modulo)
        summary.update(pose_fields)
    check = check_symmetry(inp.volume, imposed,
                           relaxed=relaxed_symmetry(inp.halves[0].config,
                                                    inp.halves[0].metrics))
    drawn = axes_to_draw(check)
    summary["symmetry"] = symmetry_summary(
        check, pose_errors_modulo=imposed if pose_result is not None else None)
    figs = FigureSet(html_path)
    figs.create()
    _figures(figs, inp, gt_map, final_fsc, pose_result, drawn)
    notes += [_half_links(figs, half_pages, summary["starts_per_half"]), HAND_NOTE]
    config_text = files.config.read_text(encoding="utf-8") if files.config.is_file() else None
    page = build_html(title=f"cryospin gold-standard report: {files.dir.resolve().name}",
                      summary=halves_summary_rows(files.dir, summary), figures=figs.figures,
                      notes=notes, tables=[gold_standard_table(inp.gold)],
                      config_text=config_text, sections=[symmetry_section(
                          check, drawn, map_name=files.map.name,
                          pose_errors_modulo=imposed if pose_result is not None else None)])
    return write_page(figs, summary, page)
