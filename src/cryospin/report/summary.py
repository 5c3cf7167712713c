"""The schema of a report's summary (``summary.json`` and :attr:`ReportResult.summary`).

Typed dicts: at run time plain dicts, written as JSON in insertion order (non-finite numbers as
null). Units are in the key names: seconds (``_s``), Å (``_angstrom``), degrees (``_deg``),
pixels (``_px``).
"""

from __future__ import annotations

from typing import TypedDict

__all__ = [
    "Stage1Heads",
    "EpochResolutionRow",
    "TrackedEpoch",
    "MapVsGT",
    "PosesVsGT",
    "GroupScore",
    "SymmetrySummary",
    "ScoreSummary",
    "NoiseSummary",
    "RunSummary",
    "HalvesSummary",
]


class Stage1Heads(TypedDict):
    """One stage-1 epoch's encoder heads: each head's share of images and output spread."""

    epoch: int
    head_usage: list[float] | None
    head_spread_deg: list[float | None] | None


class EpochResolutionRow(TypedDict):
    """One epoch map's resolution against the ground truth (FSC 0.5 and 0.143)."""

    epoch: int
    elapsed_s: float
    resolution_05_angstrom: float
    resolution_0143_angstrom: float


class TrackedEpoch(TypedDict):
    """The tracked particles' rotation errors at one epoch (``pose_track.npz``)."""

    epoch: int
    median_deg: float
    mean_deg: float
    view_median_deg: float
    in_plane_median_deg: float
    stage: str
    best_head_median_deg: float | None


class MapVsGT(TypedDict):
    """The final map against the ground-truth map (aligned, full search)."""

    resolution_05_angstrom: float
    resolution_0143_angstrom: float
    gt_correlation: float
    hand_flipped_vs_gt: bool


class PosesVsGT(TypedDict):
    """The final poses against the ground-truth poses (global rotation and hand aligned)."""

    median_rotation_error_deg: float
    mean_rotation_error_deg: float
    fraction_rotation_error_below_10_deg: float
    poses_flipped_vs_gt: bool


class GroupScore(TypedDict):
    """One candidate group of the symmetry detection and its score."""

    group: str
    order: int
    score: float


class SymmetrySummary(TypedDict):
    """The imposed group, the detected ranking of the final map (best first; empty when the
    detection failed or was skipped, ``problem`` then says why), its wall time, and the group
    the pose errors against a ground truth were taken modulo (None: no pose comparison)."""

    imposed: str
    detected: str | None
    scores: list[GroupScore]
    detection_s: float
    problem: str | None
    pose_errors_modulo: str | None


class ScoreSummary(TypedDict):
    """The particles' scores in ``poses.star`` (:mod:`cryospin.train.scores`, nats): how many
    fit the map no better than the alternative ``against`` (an empty image; with the junk
    class, an empty image or junk) (score <= ``empty_score``; the keys keep their names),
    and the median score of the others (None when there are none)."""

    against: str
    scored: int
    empty_score: float
    no_better_than_empty: int
    fraction_no_better_than_empty: float
    median_score_of_others: float | None


class NoiseSummary(TypedDict):
    """The noise spectrum a run whitened with (``noise_spectrum.json``), on the training
    disc's shells 1 … its radius: the background's power relative to its mean at the least
    and the most, at shell 1 and at the disc's last shell."""

    relative_power_min: float
    relative_power_max: float
    relative_power_shell_1: float
    relative_power_disc_edge: float
    disc_edge_angstrom: float


class _GroundTruthFields(TypedDict, total=False):
    """:class:`MapVsGT` and :class:`PosesVsGT`, present when a ground truth was given."""

    resolution_05_angstrom: float
    resolution_0143_angstrom: float
    gt_correlation: float
    hand_flipped_vs_gt: bool
    median_rotation_error_deg: float
    mean_rotation_error_deg: float
    fraction_rotation_error_below_10_deg: float
    poses_flipped_vs_gt: bool


class _ScoreFields(TypedDict, total=False):
    """The :class:`ScoreSummary` of the page's ``poses.star`` (when it has scores)."""

    particle_scores: ScoreSummary


class _SymmetryFields(TypedDict, total=False):
    """The :class:`SymmetrySummary` of the page's map (pages with a map)."""

    symmetry: SymmetrySummary


class _RunRequired(TypedDict):
    run_dir: str
    finished: bool


class RunSummary(_RunRequired, _GroundTruthFields, _SymmetryFields, _ScoreFields, total=False):
    """The summary of one run; the metrics' fields only when ``metrics.jsonl`` has lines."""

    particles: int | None
    epochs_completed: int
    search_stopped_after: int | None
    switch_epoch: int | None
    final_loss: float | None
    final_stage: str | None
    wall_time_s: float
    stage1_heads: list[Stage1Heads]
    box_px: int | None
    pixel_size_angstrom: float | None
    epoch_resolutions: list[EpochResolutionRow]
    tracked_rotation_error: list[TrackedEpoch]
    noise: NoiseSummary


class _HalvesRequired(TypedDict):
    run_dir: str
    particles: int | None
    half_sizes: list[int | None]
    split_source: str | None
    box_px: int
    pixel_size_angstrom: float
    epochs_completed: list[int]
    wall_time_s: list[float]
    starts_per_half: list[int]
    starts_at_first: int
    starts_folders: bool
    chosen_starts: list[str | None]
    half_fit_scores_nats: list[float] | None
    half_fit_gap: float | None
    half_fit_threshold: float | None
    half_fit_agree: bool | None
    half_b_mirrored: bool | None
    half_alignment_correlation: float | None
    resolution_0143_corrected: float
    resolution_0143_unmasked: float
    resolution_0143_masked: float
    randomise_from: float
    sharpening_bfactor_a2: float | None
    sharpening_guinier_fit: dict | None
    sharpening_no_fit_reason: str | None
    sharpening_lowpass_resolution: float | None
    local_resolution: dict | None


class HalvesSummary(_HalvesRequired, _GroundTruthFields, _SymmetryFields, _ScoreFields):
    """The summary of a ``--halves`` run: per-half lists of epochs and wall times (each half's
    starts together), the starts per half and each half's chosen start (None: one run per
    half), the alignment of half B onto half A, the gold-standard resolutions and the
    sharpening (``sharpening_*``: all None in runs from before it) and the local resolution
    (``fsc.json``'s; None in runs from before it)."""
