"""The report of one run folder (``cryospin reconstruct -o RUN_DIR``): ``report.html`` and its
figures, a composition of :mod:`~cryospin.report.inputs` (read and check everything first),
:mod:`~cryospin.report.analysis` and :mod:`~cryospin.report.ground_truth` (the numbers),
:mod:`~cryospin.report.figures` (one PNG each) and :mod:`~cryospin.report.html` (the page).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from cryospin.errors import InputError
from cryospin.evaluate.fsc import FSCResult
from cryospin.evaluate.pose_error import PoseErrorResult
from cryospin.io.mrc import read_cubic_map
from cryospin.report.analysis import (
    MetricsLine,
    elapsed_seconds,
    head_spread_table,
    head_usage_table,
    junk_scored,
    noise_summary,
    run_summary,
    score_summary,
    view_directions,
)
from cryospin.report.figures import (
    add_gt_figures,
    plot_head_errors,
    plot_head_usage,
    plot_noise_spectrum,
    plot_orientations,
    plot_particle_scores,
    plot_track_errors,
    plot_training,
)
from cryospin.report.ground_truth import (
    EpochResolution,
    TrackErrors,
    compare_map_with_gt,
    compare_poses_with_gt,
    epoch_resolutions,
    head_errors,
    track_error_rows,
    track_errors,
)
from cryospin.report.html import (
    HAND_NOTE,
    MIRROR_NOTE,
    FigureSet,
    ReportResult,
    Section,
    build_html,
    epoch_table,
    run_summary_rows,
    symmetry_section,
    write_page,
)
from cryospin.report.inputs import (
    ground_truth_on_grid,
    read_gt_poses,
    read_noise,
    read_poses,
    read_scores,
    read_track,
)
from cryospin.report.map_figure import add_map_views
from cryospin.report.starts_section import (
    StartsContext,
    plot_starts_losses,
    read_starts_context,
    starts_section,
)
from cryospin.report.summary import RunSummary
from cryospin.report.symmetry_check import (
    DrawnAxes,
    SymmetryCheck,
    axes_to_draw,
    check_symmetry,
    imposed_symmetry,
    relaxed_symmetry,
    symmetry_summary,
)
from cryospin.rundir import NOISE_SPECTRUM, SELECTED, RunData, load_run
from cryospin.train.noise_record import NoiseSpectrumRecord
from cryospin.train.scores import EMPTY_SCORE, SCORE_COLUMN, score_alternative
from cryospin.train.track import PoseTrack

__all__ = ["write_report"]


@dataclass(frozen=True)
class _Inputs:
    """Everything a run's page reads, checked before anything is written."""

    run: RunData
    volume: np.ndarray | None  # (L, L, L) [z, y, x]
    apix: float | None  # Å
    gt: np.ndarray | None  # ground-truth map on the run's grid
    rotations: Tensor | None  # (N, 3, 3)
    shifts: Tensor | None  # (N, 2) px
    scores: np.ndarray | None  # (N,) nats, poses.star's particle scores
    gt_R: Tensor | None
    gt_t: Tensor | None
    symmetry: str  # the imposed point group, "C1" = none
    noise: NoiseSpectrumRecord | None  # the spectrum the run whitened with
    starts: StartsContext | None  # a start of a --starts run: the choice among the starts


@dataclass(frozen=True)
class _Numbers:
    """The page's numbers: the summary and what the figures and tables draw."""

    summary: RunSummary
    elapsed: np.ndarray  # (E,) s
    notes: list[str]
    resolutions: list[EpochResolution]
    final_fsc: FSCResult | None
    pose_result: PoseErrorResult | None
    track: PoseTrack | None
    track_err: TrackErrors | None
    track_heads: tuple[int, np.ndarray] | None
    symmetry: SymmetryCheck | None  # of the final map
    drawn: DrawnAxes | None  # the axes drawn on its sections


def _read_inputs(run_dir: str | Path, gt_map: str | Path | None,
                 gt_poses: str | Path | None) -> _Inputs:
    run = load_run(run_dir)
    volume = apix = None
    if run.map_path is not None:
        volume, apix = read_cubic_map(run.map_path)
    box = None if volume is None else int(volume.shape[0])
    gt = None
    if gt_map is not None:
        if volume is None:
            raise InputError("the run has no map to compare with the ground truth", run.run_dir)
        gt = ground_truth_on_grid(Path(gt_map), int(volume.shape[0]), apix or 0.0)
    rotations = shifts = scores = None
    if run.poses_path is not None and box is not None:
        rotations, shifts = read_poses(run.poses_path, box)
        scores = read_scores(run.poses_path, box)
    gt_R = gt_t = None
    if gt_poses is not None:
        gt_R, gt_t = read_gt_poses(gt_poses, rotations, box, run.run_dir)
    return _Inputs(run, volume, apix, gt, rotations, shifts, scores, gt_R, gt_t,
                   imposed_symmetry(run.config, run.metrics), read_noise(run.run_dir),
                   read_starts_context(run.run_dir))


def _analyse(inp: _Inputs, *, max_epoch_fsc: int, search_hand: bool) -> _Numbers:
    run = inp.run
    elapsed = elapsed_seconds(run.metrics) if run.metrics else np.zeros(0)
    summary = run_summary(
        run, num_poses=None if inp.rotations is None else int(inp.rotations.shape[0]),
        box_px=None if inp.volume is None else int(inp.volume.shape[0]),
        pixel_size_angstrom=inp.apix)
    if inp.scores is not None:
        summary["particle_scores"] = score_summary(
            inp.scores, score_alternative(junk_scored(run.config, run.metrics)))
    if inp.noise is not None:
        summary["noise"] = noise_summary(inp.noise)
    notes: list[str] = []
    resolutions: list[EpochResolution] = []
    final_fsc = None
    # FSC of the final map (full search), then of a few epoch maps (gt implies volume)
    if inp.gt is not None and inp.volume is not None:
        final_fsc, aligned, fields = compare_map_with_gt(inp.gt, inp.volume, inp.apix,
                                                         search_hand=search_hand)
        summary.update(fields)
        resolutions = epoch_resolutions(run, inp.gt, final_fsc, aligned, elapsed,
                                        max_epoch_fsc=max_epoch_fsc, search_hand=search_hand)
        summary["epoch_resolutions"] = [
            {"epoch": r.epoch, "elapsed_s": r.elapsed_s,
             "resolution_05_angstrom": r.resolution_05_angstrom,
             "resolution_0143_angstrom": r.resolution_0143_angstrom}
            for r in resolutions
        ]
        if aligned.flipped:
            notes.append(MIRROR_NOTE)
    pose_result = track_err = track_heads = track = None
    modulo = None if inp.symmetry == "C1" else inp.symmetry  # pose errors modulo the group
    if inp.gt_R is not None and inp.rotations is not None:  # gt_R implies rotations (read_gt_poses)
        track = read_track(run.run_dir, inp.gt_R.shape[0])
        if track is not None:
            track_err = track_errors(track, inp.gt_R, allow_flip=search_hand, symmetry=modulo)
            summary["tracked_rotation_error"] = track_error_rows(track_err)
            if track_err.stage1.any():
                track_heads = head_errors(track, inp.gt_R, track_err)
        pose_result, pose_fields = compare_poses_with_gt(inp.rotations, inp.shifts, inp.gt_R,
                                                         inp.gt_t, search_hand=search_hand,
                                                         symmetry=modulo)
        summary.update(pose_fields)
    check = drawn = None
    if inp.volume is not None:
        check = check_symmetry(inp.volume, inp.symmetry,
                               relaxed=relaxed_symmetry(inp.run.config, inp.run.metrics))
        drawn = axes_to_draw(check)
        summary["symmetry"] = symmetry_summary(
            check, pose_errors_modulo=inp.symmetry if pose_result is not None else None)
    return _Numbers(summary, elapsed, notes, resolutions, final_fsc, pose_result, track,
                    track_err, track_heads, check, drawn)


def _training_figures(figs: FigureSet, metrics: list[MetricsLine], num: _Numbers) -> None:
    """Loss (and resolution) against time; the encoder heads' usage and spread."""
    plot_training(metrics, figs.add("training.png", "Training",
                                    "Loss against cumulative wall time"
                                    + (", resolution against the ground truth (each epoch map "
                                       "aligned to it)" if num.resolutions else "")
                                    + "; the dashed line marks the switch from auto-encoding "
                                      "to auto-decoding."),
                  resolutions=num.resolutions)
    has_spread = bool(head_spread_table(metrics)[0])
    if head_usage_table(metrics)[0] or has_spread:
        plot_head_usage(metrics, figs.add(
            "head_usage.png", "Encoder heads (stage 1)",
            "Fraction of images whose best pose came from each head, per stage-1 epoch "
            "and at the switch"
            + ("; below, each head's output spread across images: the median angle "
               "between the rotations the head gives different images (0° = the head "
               "gives one rotation for every image, ≈ 132° = rotations as different as "
               "uniformly random ones)." if has_spread else ".")))


def _track_figures(figs: FigureSet, inp: _Inputs, num: _Numbers) -> None:
    """The tracked particles' error per epoch and, at the last stage-1 epoch, per head."""
    if num.track is None or inp.gt_R is None:
        return
    if num.track_err is not None:
        plot_track_errors(num.track_err, figs.add(
            "rotation_error_epochs.png", "Rotation error against epoch",
            f"Median and mean rotation error of the {num.track.indices.size} tracked particles "
            "(pose_track.npz) at the end of each epoch (stage 1: the winning head, lowest "
            "loss; stage 2: pose table), each epoch aligned to the ground truth on its own "
            "(global rotation and hand); the medians of the view-direction error (angle "
            "between projection directions) and of the in-plane error (rotation about the "
            "view axis); in stage 1 the median best-of-heads error (per particle the head "
            "closest to the ground truth, under the same alignment: what a perfect choice "
            "of head would give). The dashed line marks the switch."))
    if num.track_heads is not None:
        head_epoch, head_err = num.track_heads
        gt_dirs = view_directions(np.asarray(inp.gt_R.detach().cpu())[num.track.indices])
        plot_head_errors(gt_dirs, head_err, figs.add(
            "head_errors.png", "Per-head rotation error over the sphere",
            f"For the last auto-encoding epoch ({head_epoch}), each head's rotation error "
            "(after that epoch's alignment) plotted at the ground-truth view direction of "
            "each tracked particle, on equal-area (Mollweide) maps."), epoch=head_epoch)


def _figures(figs: FigureSet, inp: _Inputs, num: _Numbers, gt_map: str | Path | None) -> None:
    """Every figure of the page, in page order."""
    run = inp.run
    if run.metrics:
        _training_figures(figs, run.metrics, num)
    if inp.starts is not None:
        plot_starts_losses(inp.starts, figs.add(
            "starts_loss.png", "Several starts",
            "Each start's mean loss (nats per image) against epoch, from its metrics.jsonl: "
            "the chosen start (bold) ends lowest; this run is marked with circles."))
    if inp.rotations is not None:
        plot_orientations(inp.rotations, figs.add(
            "orientations.png", "Orientation distribution",
            "View directions (third row of each R, the projection direction in the map "
            "frame) of the final poses, binned in equal-area cells on a Mollweide "
            "projection."))
    if inp.scores is not None:
        junk = junk_scored(run.config, run.metrics)
        against = score_alternative(junk)
        plot_particle_scores(inp.scores, EMPTY_SCORE, figs.add(
            "particle_scores.png", "Particle scores",
            f"How much better the map explains each image than {against} would: the "
            f"log-likelihood ratio (nats) of the image under the trained map at the particle's "
            f"final pose, with its CTF and shift, against "
            + ("the likelier of no particle at all and junk (a signal of the map's power "
               "spectrum with random phases)" if junk else "no particle at all")
            + f", under the training's noise model ({SCORE_COLUMN} in poses.star). Images at "
            f"or below the line fit no better than {against}; {SELECTED} lists the others, "
            f"for --ind."
            + ("" if junk else " Contamination with structure of its own can score above it.")),
            against)
    if inp.noise is not None:
        plot_noise_spectrum(inp.noise, figs.add(
            "noise_spectrum.png", "Noise spectrum",
            "The noise's power per frequency shell relative to its mean, measured on the "
            "images' background (outside the inscribed circle) and saved in "
            f"{NOISE_SPECTRUM}. The training whitened it: each frequency's weight in the "
            "likelihood is the inverse, so frequencies with strong noise (often the lowest: "
            "ice, drift, carbon) count for less. White noise is the line at 1."))
    if inp.volume is not None and run.map_path is not None:
        drawn = num.drawn
        add_map_views(figs, inp.volume, title="Map", what=run.map_path.name,
                      pixel_size_angstrom=inp.apix, drawn=drawn)
    if run.map_path is not None:
        add_gt_figures(figs, map_path=run.map_path, gt_map=gt_map, final_fsc=num.final_fsc,
                       gt_rotations=inp.gt_R, pose_result=num.pose_result)
    _track_figures(figs, inp, num)


def write_report(
    run_dir: str | Path,
    *,
    gt_map: str | Path | None = None,
    gt_poses: str | Path | None = None,
    output: str | Path | None = None,
    max_epoch_fsc: int = 10,
    search_hand: bool = True,
) -> ReportResult:
    """Write ``report.html`` and its figures for a run folder.

    Parameters
    ----------
    run_dir : run folder of ``cryospin reconstruct``.
    gt_map : ground-truth map (``.mrc``); adds the FSC curve, the resolution per epoch (for at
        most ``max_epoch_fsc`` epoch maps, each aligned to it with a coarser search) and the
        resolution in the summary.
    gt_poses : ground-truth poses (``.star``/``.cs``, or cryoDRGN ``.pkl``); adds the
        rotation-error histogram of the final poses and, when the run has a
        ``pose_track.npz``, the error of the tracked particles per epoch and per head.
    output : the HTML file (default ``RUN_DIR/report.html``); figures go to the folder named
        after its stem next to it (default ``RUN_DIR/report/``).
    max_epoch_fsc : int
        Epochs whose maps are compared with ``gt_map``, counting the final map (always
        compared, with the full search); the others are evenly spread and include the last
        stage-1 epoch. 0 or 1 = final map only.
    search_hand : bool
        Let the alignments to the ground truth (map and poses) try the mirrored hand.

    Returns
    -------
    ReportResult
    """
    inp = _read_inputs(run_dir, gt_map, gt_poses)  # every input checked before writing
    run = inp.run
    html_path = Path(output) if output is not None else run.files.report
    num = _analyse(inp, max_epoch_fsc=max_epoch_fsc, search_hand=search_hand)
    figs = FigureSet(html_path)
    figs.create()
    _figures(figs, inp, num, gt_map)
    notes = [*num.notes, HAND_NOTE]
    sections: list[Section] = []
    if inp.starts is not None:
        sections.append(starts_section(inp.starts))
    if num.symmetry is not None and run.map_path is not None:
        sections.append(symmetry_section(
            num.symmetry, num.drawn, map_name=run.map_path.name,
            pose_errors_modulo=inp.symmetry if num.pose_result is not None else None))
    if not run.finished:
        notes.insert(0, "This run has not finished: the report shows the last completed epoch.")
    page = build_html(title=f"cryospin run report: {run.run_dir.resolve().name}",
                      summary=run_summary_rows(num.summary, run), figures=figs.figures,
                      notes=notes, tables=[epoch_table(run.metrics, num.elapsed, num.resolutions)],
                      config_text=run.config_text, sections=sections)
    return write_page(figs, num.summary, page)
