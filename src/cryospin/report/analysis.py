"""The report's numbers from a run's metrics and poses: the switch, wall time, encoder-head
tables, view-direction histograms and the summary written as ``summary.json``.

Pure functions of ``metrics.jsonl`` lines (:mod:`cryospin.train.metrics`) and arrays; nothing
here draws or writes. Comparisons with a ground truth are in
:mod:`cryospin.report.ground_truth`.

Conventions (``docs/conventions.md``): a rotation ``R`` left-multiplies xyz column vectors and
its third row ``R[2, :]`` is the projection direction in the map frame,
``(sin θ cos φ, sin θ sin φ, cos θ)`` with RELION's ``φ = rot``, ``θ = tilt``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
from torch import Tensor

from cryospin.evaluate.gold_standard import GoldStandardFSC
from cryospin.report.summary import (
    HalvesSummary,
    NoiseSummary,
    RunSummary,
    ScoreSummary,
    Stage1Heads,
)
from cryospin.rundir import RunData, Stage, search_stopped_after
from cryospin.train.metrics import SearchStopRecord
from cryospin.train.noise_record import NoiseSpectrumRecord
from cryospin.train.scores import EMPTY_SCORE, junk_takes_effect

__all__ = [
    "score_summary",
    "noise_summary",
    "MetricsLine",
    "JSONObject",
    "RANDOM_SPREAD_DEG",
    "switch_epoch",
    "switch_hypotheses",
    "relaxations",
    "rebackprojection",
    "copy_consensus",
    "search_stop",
    "search_rebackprojections",
    "run_events",
    "elapsed_seconds",
    "pick_epochs",
    "view_directions",
    "orientation_histogram",
    "head_usage_bars",
    "head_usage_table",
    "head_spread_table",
    "padded_rows",
    "stage1_head_rows",
    "run_summary",
    "halves_summary",
    "json_ready",
]

#: One ``metrics.jsonl`` line as :func:`cryospin.rundir.read_metrics` gives it: the fields of
#: :class:`cryospin.rundir.EpochMetrics` by name, as JSON values (older files lack some).
MetricsLine = dict[str, Any]
#: A JSON object as read from a run's file (``fsc.json``, ``halves.json``).
JSONObject = dict[str, Any]

#: Median geodesic distance between two independent uniformly random rotations (degrees): the
#: root of ``(θ − sin θ) / π = 1/2``. A head whose ``head_spread_deg`` reaches it gives
#: practically unrelated rotations to different images; 0 = one rotation for every image.
RANDOM_SPREAD_DEG = 132.346

# ---------------------------------------------------------------------------- epochs and time
def switch_epoch(metrics: Sequence[MetricsLine]) -> int | None:
    """The first auto-decoding (stage 2) epoch, or None if the run never switched."""
    for row in metrics:
        if row.get("stage") == Stage.AUTODECODE:
            return int(row["epoch"])
    return None


def switch_hypotheses(metrics: Sequence[MetricsLine]) -> dict[str, float | None] | None:
    """The switch's multi-hypothesis record (``extra.switch.hypotheses``: ``count``,
    ``steps``, ``radius_px`` (None: the full disc), ``other_than_winner_fraction``,
    ``wall_time_s``) as numbers, or None when the switch kept the winners."""
    for row in metrics:
        switch = (row.get("extra") or {}).get("switch")
        if isinstance(switch, dict) and isinstance(switch.get("hypotheses"), dict):
            return {k: None if v is None else float(v) for k, v in switch["hypotheses"].items()}
    return None


def relaxations(metrics: Sequence[MetricsLine]) -> list[tuple[int, str, float, float]]:
    """The pseudo-symmetry relaxation of each stage-2 epoch that had one (``extra.relax``,
    :mod:`cryospin.train.relax`; not the epochs in which ``auto`` found no group):
    ``(epoch, group, score in its map, fraction of the particles moved to another copy)``, in
    epoch order."""
    rows = []
    for row in metrics:
        relax = (row.get("extra") or {}).get("relax")
        if isinstance(relax, dict) and str(relax["group"]).upper() != "C1":
            rows.append((int(row["epoch"]), str(relax["group"]), float(relax["score"]),
                         float(relax["moved_fraction"])))
    return rows


def _rebackprojects(metrics: Sequence[MetricsLine]) -> list[tuple[int, dict[str, Any]]]:
    """``(epoch, record)`` of the epochs that began with the volume re-made from the poses
    (``extra.rebackproject``, :mod:`cryospin.train.rebackproject`), in order."""
    return [(int(row["epoch"]), record) for row in metrics
            if isinstance(record := (row.get("extra") or {}).get("rebackproject"), dict)]


def rebackprojection(metrics: Sequence[MetricsLine]) -> tuple[int, int, str, float] | None:
    """The epoch that began with the volume re-made from the poses after the global search
    (``extra.rebackproject`` not ``during_search``): ``(epoch, images, group, seconds)``, or
    None when the run had no such step."""
    for epoch, record in _rebackprojects(metrics):
        if not record.get("during_search", False):
            return (epoch, int(record["images"]), str(record["group"]),
                    float(record["seconds"]))
    return None


def search_rebackprojections(
        metrics: Sequence[MetricsLine]) -> list[tuple[int, float, int | None]]:
    """The search epochs that began with the volume re-made from the poses
    (``extra.rebackproject`` with ``during_search``, ``optim.rebackproject_during_search``):
    ``(epoch, seconds, radius_px)`` each, in order (empty: none); ``radius_px`` the last shell
    re-made (cycles per box), None for every frequency (and in runs that did not record it)."""
    return [(epoch, float(record["seconds"]),
             None if record.get("radius_px") is None else int(record["radius_px"]))
            for epoch, record in _rebackprojects(metrics) if record.get("during_search", False)]


def search_stop(metrics: Sequence[MetricsLine]) -> SearchStopRecord | None:
    """The global search's early stop (``extra.search_stop``,
    :func:`cryospin.train.metrics.search_stop_record`), or None when the search ran to its
    last epoch (or the run had none)."""
    for row in metrics:
        record = (row.get("extra") or {}).get("search_stop")
        if isinstance(record, dict):
            return cast(SearchStopRecord, record)
    return None


def copy_consensus(metrics: Sequence[MetricsLine]) -> tuple[int, dict[str, Any]] | None:
    """The epoch that began with the copy consensus (``extra.consensus``,
    :mod:`cryospin.train.consensus`) and its record, or None when the run had none."""
    for row in metrics:
        record = (row.get("extra") or {}).get("consensus")
        if isinstance(record, dict):
            return int(row["epoch"]), record
    return None


def run_events(metrics: Sequence[MetricsLine]) -> list[tuple[int, str]]:
    """The steps between epochs that change what stage 2 trains against, as ``(boundary,
    label)``, ``boundary`` the epoch they follow (0: before the first), in epoch order, labels
    of one boundary joined by ``"; "``: the global search's early stop (``extra.search_stop``:
    "search done"), a point group imposed (``extra.symmetry``, a group other than C1: "D7
    imposed"), the volume re-made from the poses after the search (``extra.rebackproject``:
    "volume re-made") and the copy consensus's new poses (``extra.consensus`` kept: "copies
    settled"). The switch and the volumes re-made during the search
    (:func:`search_rebackprojections`, part of every search epoch) are not among them."""
    found: dict[int, list[str]] = {}
    for row in metrics:
        epoch, extra = int(row["epoch"]), row.get("extra") or {}
        symmetry = extra.get("symmetry")
        if isinstance(symmetry, dict) and str(symmetry.get("group", "C1")).upper() != "C1":
            found.setdefault(epoch - 1, []).append(f"{symmetry['group']} imposed")
        if isinstance(extra.get("search_stop"), dict):
            found.setdefault(int(extra["search_stop"].get("after_epoch", epoch)),
                             []).append("search done")
        remade = extra.get("rebackproject")
        if isinstance(remade, dict) and not remade.get("during_search", False):
            found.setdefault(epoch - 1, []).append("volume re-made")
        settled = extra.get("consensus")
        if isinstance(settled, dict) and settled.get("kept"):
            found.setdefault(epoch - 1, []).append("copies settled")
    return [(b, "; ".join(found[b])) for b in sorted(found)]


def elapsed_seconds(metrics: Sequence[MetricsLine]) -> np.ndarray:
    """Cumulative wall time at the end of each epoch, `(E,)` seconds.

    ``elapsed_s`` when every line has it (includes the switch pass and resumed parts), else the
    running sum of ``wall_time_s``.
    """
    if metrics and all(r.get("elapsed_s") is not None for r in metrics):
        return np.array([float(r["elapsed_s"]) for r in metrics], dtype=np.float64)
    wall = [float(r.get("wall_time_s") or 0.0) for r in metrics]
    return np.cumsum(np.array(wall, dtype=np.float64))


def pick_epochs(epochs: Sequence[int], max_count: int, *, keep: Sequence[int] = ()) -> list[int]:
    """At most ``max_count`` of ``epochs``, evenly spread, always with the last and ``keep``.

    Returns a sorted list (empty when ``max_count <= 0``).
    """
    epochs = sorted(set(int(e) for e in epochs))
    if max_count <= 0 or not epochs:
        return []
    if len(epochs) <= max_count:
        return epochs
    must = {epochs[-1]} | {int(k) for k in keep if int(k) in epochs}
    rest = [e for e in epochs if e not in must]
    spare = min(max(max_count - len(must), 0), len(rest))
    spread = (np.linspace(0, len(rest) - 1, spare).round().astype(int) if spare
              else np.zeros(0, dtype=int))
    return sorted(must | {rest[i] for i in spread})


# ---------------------------------------------------------------------------- orientations
def view_directions(rotations: Tensor | np.ndarray) -> np.ndarray:
    """Projection directions in the map frame, `(N, 3)` float64: the third rows ``R[:, 2, :]``.

    Parameters
    ----------
    rotations : `(N, 3, 3)` array or tensor
        cryospin rotations (``docs/conventions.md``).
    """
    R = np.asarray(rotations.detach().cpu() if isinstance(rotations, Tensor) else rotations,
                   dtype=np.float64)
    if R.ndim != 3 or R.shape[1:] != (3, 3):
        raise ValueError(f"expected (N, 3, 3) rotations, got shape {R.shape}")
    return R[:, 2, :].copy()


def orientation_histogram(
    directions: np.ndarray, *, n_lon: int = 72, n_z: int = 36
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram of unit vectors over equal-area bins of the sphere.

    Bins are equal steps in longitude ``φ = atan2(y, x) ∈ [−π, π]`` and in ``z = sin(latitude)
    ∈ [−1, 1]``; by Archimedes' hat-box theorem every bin has the same area ``4π/(n_lon·n_z)``.

    Parameters
    ----------
    directions : `(N, 3)`
        Vectors ``(x, y, z)`` (normalised here; zero vectors are dropped).
    n_lon, n_z : int
        Bins in longitude and in ``z``.

    Returns
    -------
    counts : `(n_z, n_lon)` int64
        Row ``i`` is the latitude band ``lat_edges_rad[i] .. lat_edges_rad[i + 1]``.
    lon_edges_rad : `(n_lon + 1,)` float64
    lat_edges_rad : `(n_z + 1,)` float64
        ``arcsin`` of equally spaced ``z`` edges.
    """
    v = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    norm = np.linalg.norm(v, axis=1)
    v = v[norm > 0] / norm[norm > 0, None]
    lon = np.arctan2(v[:, 1], v[:, 0])
    z = np.clip(v[:, 2], -1.0, 1.0)
    lon_edges = np.linspace(-math.pi, math.pi, n_lon + 1)
    z_edges = np.linspace(-1.0, 1.0, n_z + 1)
    counts, _, _ = np.histogram2d(z, lon, bins=(z_edges, lon_edges))
    return counts.astype(np.int64), lon_edges, np.arcsin(z_edges)


# ---------------------------------------------------------------------------- encoder heads
def head_usage_bars(
    metrics: Sequence[MetricsLine],
) -> tuple[list[str], list[int], list[list[float]]]:
    """Labels, x positions (the epoch of the line; the switch pass sits at the first
    auto-decoding epoch, whose line records it) and per-head usage of each bar."""
    labels: list[str] = []
    xs: list[int] = []
    rows: list[list[float]] = []
    for r in metrics:
        if r.get("stage") == Stage.AUTOENCODE and r.get("head_usage"):
            labels.append(str(int(r["epoch"])))
            xs.append(int(r["epoch"]))
            rows.append([float(u) for u in r["head_usage"]])
        switch = (r.get("extra") or {}).get("switch")
        if isinstance(switch, dict) and switch.get("head_usage"):
            labels.append("switch")
            xs.append(int(r["epoch"]))
            rows.append([float(u) for u in switch["head_usage"]])
    return labels, xs, rows


def padded_rows(rows: Sequence[Sequence[float]], fill: float) -> np.ndarray:
    """Ragged rows as a `(len(rows), longest)` float64 array, missing cells ``fill``."""
    if not rows:
        return np.zeros((0, 0))
    table = np.full((len(rows), max(len(u) for u in rows)), fill, dtype=np.float64)
    for i, u in enumerate(rows):
        table[i, : len(u)] = u
    return table


def head_usage_table(metrics: Sequence[MetricsLine]) -> tuple[list[str], np.ndarray]:
    """Bar labels and head-usage fractions `(bars, M)`: stage-1 epochs, then the switch pass."""
    labels, _, rows = head_usage_bars(metrics)
    return labels, padded_rows(rows, 0.0)


def head_spread_table(metrics: Sequence[MetricsLine]) -> tuple[list[int], np.ndarray]:
    """Stage-1 epochs whose metrics line has ``head_spread_deg`` and the spreads `(E, M)`.

    A head's spread is the median geodesic distance (degrees) between the rotations it gives
    different images (:func:`cryospin.losses.head_spread_deg`): 0 = one rotation for every
    image, :data:`RANDOM_SPREAD_DEG` (≈ 132°) = uniformly random. Missing or null values
    (older files, a batch of one image) are NaN; a run without any gives ``([], (0, 0))``.
    """
    epochs: list[int] = []
    rows: list[list[float]] = []
    for r in metrics:
        spread = r.get("head_spread_deg")
        if r.get("stage") == Stage.AUTOENCODE and spread:
            epochs.append(int(r["epoch"]))
            rows.append([math.nan if v is None else float(v) for v in spread])
    return epochs, padded_rows(rows, math.nan)


def stage1_head_rows(metrics: Sequence[MetricsLine]) -> list[Stage1Heads]:
    """Summary rows of the stage-1 epochs: ``epoch``, ``head_usage``, ``head_spread_deg`` (each
    a per-head list, or None when the metrics line lacks it)."""
    rows: list[Stage1Heads] = []
    for r in metrics:
        if r.get("stage") == Stage.AUTOENCODE and (r.get("head_usage") or r.get("head_spread_deg")):
            spread = r.get("head_spread_deg")
            rows.append({
                "epoch": int(r["epoch"]),
                "head_usage": [float(u) for u in r["head_usage"]] if r.get("head_usage")
                else None,
                "head_spread_deg": None if not spread else
                [None if v is None else float(v) for v in spread],
            })
    return rows


# ---------------------------------------------------------------------------- summaries
def run_summary(run: RunData, *, num_poses: int | None, box_px: int | None,
                pixel_size_angstrom: float | None) -> RunSummary:
    """The summary of one run without a ground truth: ``run_dir``, ``finished``, from the
    metrics ``particles``, ``epochs_completed``, ``search_stopped_after``, ``switch_epoch``,
    ``final_loss``, ``final_stage``, ``wall_time_s`` (seconds) and ``stage1_heads``, then
    ``box_px`` and ``pixel_size_angstrom`` (Å). ``num_poses`` (the final poses' count) gives
    ``particles`` when the metrics do not."""
    metrics = run.metrics
    summary: RunSummary = {"run_dir": str(run.run_dir), "finished": run.finished}
    if metrics:  # in this order in summary.json
        summary["particles"] = int(metrics[0].get("num_images") or 0) or None
        summary["epochs_completed"] = int(metrics[-1]["epoch"])
        summary["search_stopped_after"] = search_stopped_after(metrics)
        summary["switch_epoch"] = switch_epoch(metrics)
        summary["final_loss"] = metrics[-1].get("loss")
        summary["final_stage"] = metrics[-1].get("stage")
        summary["wall_time_s"] = float(elapsed_seconds(metrics)[-1])
        stage1_heads = stage1_head_rows(metrics)
        if stage1_heads:
            summary["stage1_heads"] = stage1_heads
    if num_poses is not None and not summary.get("particles"):
        summary["particles"] = int(num_poses)
    summary["box_px"] = box_px
    summary["pixel_size_angstrom"] = pixel_size_angstrom
    return summary


def halves_summary(run_dir: str, halves: Sequence[RunData], gold: GoldStandardFSC,
                   fsc_summary: JSONObject, marker: JSONObject, *, box_px: int,
                   pixel_size_angstrom: float,
                   half_runs: Sequence[Sequence[RunData]] | None = None) -> HalvesSummary:
    """The summary of a ``--halves`` run: particles and half sizes, the split, each half's
    epochs, starts (at first, ``halves.json``'s, and now, with those a half got for fitting
    its images clearly worse) and wall time (seconds; of every run in ``half_runs``, each
    half's starts, when given), the alignment of half B onto half A and the gold-standard
    resolutions (Å) and the sharpening from ``fsc.json`` (``fsc_summary``, parsed as ``gold``) and
    ``halves.json`` (``marker``). ``halves``: the run folder each half's result comes from
    (its chosen start, with several starts per half)."""
    sizes = fsc_summary.get("half_sizes") or marker.get("half_sizes") or [None, None]
    runs = half_runs if half_runs is not None else [[h] for h in halves]
    walls = [sum(float(elapsed_seconds(r.metrics)[-1]) for r in rs if r.metrics)
             for rs in runs]
    starts = [len(rs) for rs in runs]
    several = max(starts) > 1
    align = fsc_summary.get("alignment") or {}
    fit = fsc_summary.get("half_fit")  # absent in runs from before it
    sharp = fsc_summary.get("sharpening")  # likewise
    sharp = sharp if isinstance(sharp, dict) else {}
    return {
        "run_dir": run_dir,
        "particles": int(sum(s for s in sizes if s is not None)) or None,
        "half_sizes": sizes,
        "split_source": marker.get("split_source"),
        "box_px": box_px,
        "pixel_size_angstrom": pixel_size_angstrom,
        "epochs_completed": [int(h.metrics[-1]["epoch"]) if h.metrics else 0 for h in halves],
        "wall_time_s": walls,
        "starts_per_half": starts,
        "starts_at_first": int(marker.get("starts", 1)),
        # each half a --starts folder (absent in runs from before: more than one start each)
        "starts_folders": bool(marker.get("starts_folders", int(marker.get("starts", 1)) > 1)),
        "half_fit_scores_nats": fit.get("mean_score_nats") if isinstance(fit, dict) else None,
        "half_fit_gap": fit.get("relative_gap") if isinstance(fit, dict) else None,
        "half_fit_threshold": fit.get("threshold") if isinstance(fit, dict) else None,
        "half_fit_agree": fit.get("agree") if isinstance(fit, dict) else None,
        "chosen_starts": [h.run_dir.resolve().name if several else None for h in halves],
        "half_b_mirrored": align.get("flipped"),
        "half_alignment_correlation": align.get("correlation"),
        "resolution_0143_corrected": gold.final_resolution,
        "resolution_0143_unmasked": gold.unmasked.resolution(0.143),
        "resolution_0143_masked": gold.masked.resolution(0.143),
        "randomise_from": gold.randomise_from_resolution,
        "sharpening_bfactor_a2": sharp.get("bfactor_a2"),
        "sharpening_guinier_fit": sharp.get("guinier_fit"),
        "sharpening_no_fit_reason": sharp.get("no_fit_reason"),
        "sharpening_lowpass_resolution": sharp.get("lowpass_resolution"),
        "local_resolution": (fsc_summary.get("local_resolution")
                             if isinstance(fsc_summary.get("local_resolution"), dict) else None),
    }


def json_ready(x: object) -> object:
    """``x`` (nested dicts and lists) with non-finite floats replaced by None, for JSON."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_ready(v) for v in x]
    return x if not isinstance(x, float) or math.isfinite(x) else None


def junk_scored(config: Mapping[str, object], metrics: Sequence[Mapping[str, object]]) -> bool:
    """Whether a run's scores are taken against junk too: its ``config.yaml`` (as read) turned
    the junk class on (``model.junk_class``; absent in runs from before it existed) and it
    took effect (:func:`cryospin.train.scores.junk_takes_effect` of the last
    ``junk_fraction`` in ``metrics.jsonl``)."""
    model = config.get("model")
    if not (isinstance(model, Mapping) and model.get("junk_class", False)):
        return False
    fractions = [r.get("junk_fraction") for r in metrics if r.get("junk_fraction") is not None]
    last = fractions[-1] if fractions else None
    return junk_takes_effect(float(last) if isinstance(last, (int, float)) else None)


def noise_summary(record: NoiseSpectrumRecord) -> NoiseSummary:
    """The :class:`NoiseSummary` of a run's noise spectrum (its shells 1 … the training
    disc's radius)."""
    used = np.flatnonzero(record.used_shells())
    if used.size == 0:  # a disc under one shell: shell 1 stands for it
        used = np.array([1])
    power = record.relative_power[used]
    edge = int(used[-1])
    return NoiseSummary(
        relative_power_min=float(power.min()), relative_power_max=float(power.max()),
        relative_power_shell_1=float(record.relative_power[1]),
        relative_power_disc_edge=float(record.relative_power[edge]),
        disc_edge_angstrom=float(record.box_px * record.pixel_size_angstrom / edge))


def score_summary(scores: np.ndarray, against: str = "an empty image") -> ScoreSummary:
    """The :class:`ScoreSummary` of the particles' scores `(N,)` (nats), taken against
    ``against`` (:func:`cryospin.train.scores.score_alternative`)."""
    scores = np.asarray(scores, dtype=np.float64)
    others = scores[scores > EMPTY_SCORE]
    low = int(scores.size - others.size)
    return ScoreSummary(
        against=against, scored=int(scores.size), empty_score=EMPTY_SCORE, no_better_than_empty=low,
        fraction_no_better_than_empty=low / scores.size if scores.size else 0.0,
        median_score_of_others=float(np.median(others)) if others.size else None)
