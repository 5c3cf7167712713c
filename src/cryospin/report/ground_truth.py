"""The report's comparisons with a ground truth: the map's FSC and resolution (final and per
epoch, after alignment), the final poses' error and the tracked particles' errors per epoch and
per encoder head.

Numbers only (nothing is drawn or written). Every comparison aligns first: maps by rotation,
shift and (optionally) hand (:func:`cryospin.evaluate.align.align_maps`), poses by a global
rotation and hand (:func:`cryospin.evaluate.pose_error.pose_error`), each epoch on its own.

Conventions (``docs/conventions.md``): maps `(L, L, L)` ``[z, y, x]``; rotations `(N, 3, 3)`
left-multiply xyz column vectors; angles in degrees, resolutions in Å (``inf`` = never crossed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin.evaluate.align import AlignResult, align_maps
from cryospin.evaluate.fsc import FSCResult, fsc
from cryospin.evaluate.pose_error import PoseErrorResult, flip_hand, pose_error
from cryospin.io.mrc import read_cubic_map
from cryospin.report.analysis import pick_epochs, switch_epoch
from cryospin.report.summary import MapVsGT, PosesVsGT, TrackedEpoch
from cryospin.rotations import geodesic_distance_deg
from cryospin.rundir import RunData, Stage
from cryospin.symmetry import point_group_rotations
from cryospin.train.track import PoseTrack

__all__ = [
    "EpochResolution",
    "compare_map_with_gt",
    "epoch_resolutions",
    "compare_poses_with_gt",
    "gt_in_run_frame",
    "TrackErrors",
    "track_errors",
    "track_error_rows",
    "head_errors",
]

# ---------------------------------------------------------------------------- maps
@dataclass(frozen=True)
class EpochResolution:
    """Resolution of one epoch's map against the ground truth (after alignment).

    Attributes
    ----------
    epoch : int
    elapsed_s : float
        Cumulative wall time at the end of the epoch.
    resolution_05_angstrom, resolution_0143_angstrom : float
        FSC = 0.5 and 0.143 crossings (Å; ``inf`` if the FSC starts below the threshold).
    flipped : bool
        The map matched the ground truth's mirror image.
    correlation : float
        Real-space correlation after alignment.
    """

    epoch: int
    elapsed_s: float
    resolution_05_angstrom: float
    resolution_0143_angstrom: float
    flipped: bool
    correlation: float


def _align_resolution(gt: np.ndarray, volume: np.ndarray, apix: float | None, *,
                      search_hand: bool, n_rotations: int) -> tuple[FSCResult, AlignResult]:
    """``volume`` aligned to ``gt`` (both `(L, L, L)`, voxel ``apix`` Å): (FSCResult,
    AlignResult)."""
    g = torch.from_numpy(gt)
    aligned = align_maps(g, torch.from_numpy(volume), search_hand=search_hand,
                         n_rotations=n_rotations)
    return fsc(g, aligned.aligned, pixel_size_angstrom=apix), aligned


def compare_map_with_gt(gt: np.ndarray, volume: np.ndarray, apix: float | None, *,
                        search_hand: bool) -> tuple[FSCResult, AlignResult, MapVsGT]:
    """The map aligned to the ground truth with the full search: (FSCResult, AlignResult,
    summary fields ``resolution_05_angstrom``, ``resolution_0143_angstrom``,
    ``gt_correlation``, ``hand_flipped_vs_gt``)."""
    final_fsc, aligned = _align_resolution(gt, volume, apix or None, search_hand=search_hand,
                                           n_rotations=5000)
    return final_fsc, aligned, {
        "resolution_05_angstrom": final_fsc.resolution(0.5),
        "resolution_0143_angstrom": final_fsc.resolution(0.143),
        "gt_correlation": aligned.correlation,
        "hand_flipped_vs_gt": bool(aligned.flipped),
    }


def epoch_resolutions(
    run: RunData, gt: np.ndarray, final_fsc: FSCResult, final_alignment: AlignResult,
    elapsed: np.ndarray, *, max_epoch_fsc: int, search_hand: bool,
) -> list[EpochResolution]:
    """Resolution against ``gt`` of at most ``max_epoch_fsc`` epochs (the final map counts).

    The epoch maps are evenly spread and include the last stage-1 epoch; each is aligned with
    a coarser search than the final map's (``final_fsc``, ``final_alignment``). ``elapsed`` is
    :func:`~cryospin.report.analysis.elapsed_seconds` of the run's metrics.
    """
    metrics = run.metrics
    k_switch = switch_epoch(metrics)
    resolutions: list[EpochResolution] = []
    by_epoch = {int(r["epoch"]): float(t) for r, t in zip(metrics, elapsed, strict=True)}
    last = int(metrics[-1]["epoch"]) if metrics else None
    # the last epoch of a finished run is map.mrc, already compared (full search)
    final_is_last = run.finished and last is not None
    usable = [e for e in run.epoch_maps if e in by_epoch and not (final_is_last and e == last)]
    keep = [] if k_switch is None else [k_switch - 1]
    budget = max_epoch_fsc - 1 if final_is_last else max_epoch_fsc
    apix = final_fsc.pixel_size_angstrom
    for e in pick_epochs(usable, budget, keep=keep):
        volume, _ = read_cubic_map(run.epoch_maps[e])
        if volume.shape != gt.shape:
            continue
        res, al = _align_resolution(gt, volume, apix, search_hand=search_hand, n_rotations=1000)
        resolutions.append(EpochResolution(
            epoch=e, elapsed_s=by_epoch[e], resolution_05_angstrom=res.resolution(0.5),
            resolution_0143_angstrom=res.resolution(0.143), flipped=bool(al.flipped),
            correlation=al.correlation,
        ))
    if final_is_last and last is not None:
        resolutions.append(EpochResolution(
            epoch=last, elapsed_s=float(elapsed[-1]),
            resolution_05_angstrom=final_fsc.resolution(0.5),
            resolution_0143_angstrom=final_fsc.resolution(0.143),
            flipped=bool(final_alignment.flipped), correlation=final_alignment.correlation,
        ))
    return resolutions


# ---------------------------------------------------------------------------- final poses
def compare_poses_with_gt(rotations: Tensor, shifts: Tensor | None, gt_R: Tensor,
                          gt_t: Tensor | None, *, search_hand: bool,
                          symmetry: str | None = None) -> tuple[PoseErrorResult, PosesVsGT]:
    """Pose error of the run's poses against the ground truth: (PoseErrorResult, summary
    fields ``median_rotation_error_deg``, ``mean_rotation_error_deg``,
    ``fraction_rotation_error_below_10_deg``, ``poses_flipped_vs_gt``); modulo the point
    group ``symmetry`` (each particle against its nearest equivalent pose) unless None."""
    result = pose_error(rotations, gt_R, shifts, gt_t, allow_flip=search_hand,
                        symmetry=symmetry)
    err = result.rotation_error_deg
    return result, {
        "median_rotation_error_deg": float(np.median(err)),
        "mean_rotation_error_deg": float(np.mean(err)),
        "fraction_rotation_error_below_10_deg": float(np.mean(err < 10)),
        "poses_flipped_vs_gt": bool(result.flipped),
    }


def _as_float64(rotations: Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(rotations.detach().cpu() if isinstance(rotations, Tensor) else rotations,
                      dtype=np.float64)


def gt_in_run_frame(gt_rotations: Tensor | np.ndarray, result: PoseErrorResult) -> Tensor:
    """Ground-truth rotations expressed in the run's frame, `(N, 3, 3)` float64 tensor.

    :func:`~cryospin.evaluate.pose_error.pose_error` finds ``R_pred ≈ H(R_gt) · A`` (``H`` the
    hand flip ``D·D`` when ``result.flipped``, ``A = result.alignment``); this returns
    ``H(R_gt) · A``, directly comparable with the run's poses.
    """
    gt = torch.as_tensor(np.asarray(gt_rotations.detach().cpu()
                                    if isinstance(gt_rotations, Tensor) else gt_rotations),
                         dtype=torch.float64)
    if result.flipped:
        gt = flip_hand(gt)
    return gt @ torch.as_tensor(np.asarray(result.alignment), dtype=torch.float64)


# ---------------------------------------------------------------------------- pose track
@dataclass(frozen=True)
class TrackErrors:
    """Rotation errors of the tracked particles (``pose_track.npz``) against the ground truth.

    Every epoch is aligned on its own (global rotation and hand, as
    :func:`~cryospin.evaluate.pose_error.pose_error` does for the final poses): the map's frame
    drifts during training, so one alignment for all epochs would mix frame drift into the
    error.

    Attributes
    ----------
    epochs : `(E,)` int64
    median_deg, mean_deg : `(E,)` float64
        Median and mean rotation error over the tracked particles after alignment (stage 1:
        the winning head's pose, the head of lowest loss).
    results : list of PoseErrorResult
        One per epoch (``alignment``, ``flipped``, per-particle errors).
    stage1 : `(E,)` bool
        Epochs with head predictions (auto-encoding).
    view_median_deg, in_plane_median_deg : `(E,)` float64
        Median view-direction error (angle between the projection directions) and median
        in-plane error (the rotation about the view axis) of the same poses.
    best_head_median_deg : `(E,)` float64
        Stage 1: median over the particles of the best-of-heads error, the smallest geodesic
        angle between any head's rotation and the ground truth brought into the run's frame
        by that epoch's alignment (:func:`gt_in_run_frame`); a lower bound of the winner's
        error under that alignment. NaN in stage-2 epochs.
    """

    epochs: np.ndarray
    median_deg: np.ndarray
    mean_deg: np.ndarray
    results: list[PoseErrorResult]
    stage1: np.ndarray
    view_median_deg: np.ndarray
    in_plane_median_deg: np.ndarray
    best_head_median_deg: np.ndarray
    symmetry: str | None = None


def _head_errors_at(track: PoseTrack, row: int, gt: np.ndarray,
                    result: PoseErrorResult, symmetry: str | None) -> np.ndarray:
    """`(K, M)` geodesic angles (degrees) between every head's rotation in track row ``row``
    and the tracked particles' ground truth ``gt`` `(K, 3, 3)` in the run's frame of
    ``result`` (that epoch's PoseErrorResult); with a point group ``symmetry``, to the
    nearest equivalent ``H(R_gt) g A`` (``g`` in the group of that hand's map)."""
    ref = gt_in_run_frame(gt, result)  # (K, 3, 3): H(R_gt) A
    heads = torch.as_tensor(track.head_rotations[row], dtype=torch.float64)  # (K, M, 3, 3)
    if symmetry is None:
        return geodesic_distance_deg(heads, ref[:, None]).numpy().copy()
    G = point_group_rotations(symmetry)
    G = flip_hand(G) if result.flipped else G
    A = torch.as_tensor(np.asarray(result.alignment), dtype=torch.float64)
    equiv = ref[:, None] @ (A.T @ G @ A)[None]  # (K, G, 3, 3): H(R_gt) g A
    err = geodesic_distance_deg(heads[:, :, None], equiv[:, None])  # (K, M, G)
    return err.amin(-1).numpy().copy()


def track_errors(
    track: PoseTrack, gt_rotations: Tensor | np.ndarray, *, allow_flip: bool = True,
    max_epochs: int = 60, symmetry: str | None = None,
) -> TrackErrors:
    """Per-epoch rotation errors of a :class:`~cryospin.train.track.PoseTrack` against the
    ground-truth rotations of all `(N, 3, 3)` particles (rows ``track.indices`` are used).

    At most ``max_epochs`` epochs are evaluated (evenly spread, always with the last one and
    the last auto-encoding epoch; :func:`~cryospin.report.analysis.pick_epochs`): each
    alignment costs up to ~0.3 s. With a point group ``symmetry``, every error is to the
    nearest symmetry-equivalent pose (:func:`~cryospin.evaluate.pose_error.pose_error`).
    """
    gt = _as_float64(gt_rotations)[track.indices]  # (K, 3, 3)
    stage1 = track.stage1_mask()
    epochs = np.asarray(track.epochs, dtype=np.int64)
    keep = [int(epochs[stage1][-1])] if stage1.any() else []
    chosen = set(pick_epochs(epochs.tolist(), max_epochs, keep=keep))
    rows = [e for e in range(epochs.shape[0]) if int(epochs[e]) in chosen]
    results = [pose_error(track.rotations[e].astype(np.float64), gt, allow_flip=allow_flip,
                          symmetry=symmetry) for e in rows]
    best = np.full(len(rows), math.nan)
    for i, (row, result) in enumerate(zip(rows, results, strict=True)):
        if stage1[row]:  # min over heads, ignoring a NaN head
            heads = _head_errors_at(track, row, gt, result, symmetry)  # (K, M)
            best[i] = np.median(np.fmin.reduce(heads, axis=1))
    return TrackErrors(
        epochs=epochs[rows],
        median_deg=np.array([np.median(r.rotation_error_deg) for r in results]),
        mean_deg=np.array([np.mean(r.rotation_error_deg) for r in results]),
        results=results,
        stage1=stage1[rows],
        view_median_deg=np.array([np.median(r.view_direction_error_deg) for r in results]),
        in_plane_median_deg=np.array([np.median(r.in_plane_error_deg) for r in results]),
        best_head_median_deg=best,
        symmetry=symmetry,
    )


def track_error_rows(errors: TrackErrors) -> list[TrackedEpoch]:
    """The per-epoch rows of the summary's ``tracked_rotation_error``: ``epoch``,
    ``median_deg``, ``mean_deg`` (as before), ``view_median_deg``, ``in_plane_median_deg``,
    ``stage`` and ``best_head_median_deg`` (None outside stage 1)."""
    return [
        {"epoch": int(e), "median_deg": float(md), "mean_deg": float(mn),
         "view_median_deg": float(v), "in_plane_median_deg": float(ip),
         "stage": (Stage.AUTOENCODE if s1 else Stage.AUTODECODE).value,
         "best_head_median_deg": float(b) if s1 and math.isfinite(b) else None}
        for e, md, mn, v, ip, s1, b in zip(
            errors.epochs, errors.median_deg, errors.mean_deg, errors.view_median_deg,
            errors.in_plane_median_deg, errors.stage1, errors.best_head_median_deg,
            strict=True)
    ]


def head_errors(track: PoseTrack, gt_rotations: Tensor | np.ndarray,
                errors: TrackErrors) -> tuple[int, np.ndarray]:
    """Rotation error of every head's prediction at the last stage-1 epoch of the track.

    The heads are compared with the ground truth brought into the run's frame by that epoch's
    alignment (of the best-head poses; :func:`gt_in_run_frame`).

    Returns
    -------
    epoch : int
    errors_deg : `(M, K)` float64
        Geodesic angle between head ``m``'s rotation and the aligned ground truth of tracked
        particle ``k``.

    Raises
    ------
    ValueError
        When the track holds no stage-1 epoch.
    """
    if not errors.stage1.any():
        raise ValueError("the pose track holds no auto-encoding epoch")
    e = int(np.flatnonzero(errors.stage1)[-1])
    gt = _as_float64(gt_rotations)[track.indices]
    epoch = int(errors.epochs[e])
    row = int(np.flatnonzero(track.epochs == epoch)[0])
    return epoch, _head_errors_at(track, row, gt, errors.results[e], errors.symmetry).T.copy()
