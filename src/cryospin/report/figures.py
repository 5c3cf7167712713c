"""The report's figures: each ``plot_*`` function writes exactly one PNG (matplotlib, Agg
backend, imported only when a figure is drawn: :func:`cryospin.plotting.pyplot`).

* :func:`plot_training` — loss (and, with a ground truth, resolution; and the stage-2 mean pose
  change) against cumulative wall time, the switch marked;
* :func:`plot_halves_training` — both halves' loss of a ``--halves`` run, each half's switch;
* :func:`plot_head_usage` — fraction of images won by each head, per stage-1 epoch and at the
  switch (stacked bars), and below it, when ``metrics.jsonl`` has them, each head's output
  spread across images per stage-1 epoch
  (:func:`~cryospin.report.analysis.head_spread_table`);
* :func:`plot_orientations` — view directions on the sphere as an equal-area (Mollweide) heat map
  of equal-area bins;
* :func:`plot_map_views` — central sections and projections (sums) along z, y and x, and on
  the sections the symmetry axes (:mod:`~cryospin.report.map_figure`);
* :func:`plot_particle_scores` — histogram of the particles' scores (how much better the map
  explains each image than an empty image), the empty-image line marked;
* :func:`plot_noise_spectrum` — the background noise's power per frequency shell relative to
  its mean (``noise_spectrum.json``, a run that whitened its noise), the training disc marked;
* :func:`plot_rotation_errors` — histogram of the rotation error against ground-truth poses;
* :func:`plot_track_errors` — with ``pose_track.npz`` and ground-truth poses: median and mean
  rotation error of the tracked particles against the epoch, the median view-direction and
  in-plane errors and, in stage 1, the best-of-heads median error, the switch marked;
* :func:`plot_head_errors` — per encoder head, the rotation error of its prediction at the last
  auto-encoding epoch, at each particle's ground-truth view direction (equal-area map);
* the FSC curves (:func:`cryospin.plotting.plot_fsc`, through :func:`add_gt_figures`).

Each is registered with the page through :class:`cryospin.report.html.FigureSet`. Conventions
(``docs/conventions.md``): volumes are `(L, L, L)` indexed ``[z, y, x]``; the view direction of
a rotation ``R`` is its third row ``R[2, :]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from cryospin.evaluate.fsc import FSCResult, write_fsc_json
from cryospin.evaluate.pose_error import PoseErrorResult
from cryospin.plotting import mollweide_lon_lat, plot_fsc, pyplot, save_figure
from cryospin.report.analysis import (
    RANDOM_SPREAD_DEG,
    MetricsLine,
    elapsed_seconds,
    head_spread_table,
    head_usage_bars,
    noise_summary,
    orientation_histogram,
    padded_rows,
    run_events,
    switch_epoch,
    view_directions,
)
from cryospin.report.ground_truth import EpochResolution, TrackErrors, gt_in_run_frame
from cryospin.report.html import FigureSet
from cryospin.report.map_figure import plot_map_views
from cryospin.rundir import FSC_JSON, Stage
from cryospin.train.noise_record import NoiseSpectrumRecord

if TYPE_CHECKING:  # matplotlib is optional: its types only for the annotations
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap

__all__ = [
    "time_axis_unit",
    "plot_training",
    "plot_halves_training",
    "plot_head_usage",
    "plot_orientations",
    "plot_map_views",
    "plot_particle_scores",
    "plot_noise_spectrum",
    "plot_rotation_errors",
    "plot_track_errors",
    "plot_head_errors",
    "add_gt_figures",
]

_HALF_COLOURS = ("tab:blue", "tab:orange")


def time_axis_unit(last_s: float) -> tuple[float, str]:
    """Divisor and axis label for a time axis ending at ``last_s`` seconds."""
    if last_s > 3 * 3600:
        return 3600.0, "wall time (h)"
    if last_s > 600:
        return 60.0, "wall time (min)"
    return 1.0, "wall time (s)"


def _column(metrics: Sequence[MetricsLine], key: str) -> np.ndarray:
    """``key`` of every metrics line as float64, NaN where missing or null."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in metrics])


# ---------------------------------------------------------------------------- training
def plot_training(
    metrics: Sequence[MetricsLine],
    path: str | Path,
    *,
    resolutions: Sequence[EpochResolution] = (),
) -> None:
    """Loss (and resolution, and mean pose change) against cumulative wall time.

    One panel per quantity, sharing the time axis; markers distinguish the stages, a dashed
    line marks the switch (end of the last auto-encoding epoch) and dotted ones the steps
    between stage-2 epochs (:func:`cryospin.report.analysis.run_events`: the search's early
    stop, a group imposed, the volume re-made), labelled in the last panel.
    """
    if not metrics:
        raise ValueError("no metrics to plot")
    plt = pyplot()
    seconds = elapsed_seconds(metrics)
    unit, xlabel = time_axis_unit(float(seconds[-1]))
    t = seconds / unit
    stage2 = np.array([r.get("stage") == Stage.AUTODECODE for r in metrics])
    loss = _column(metrics, "loss")
    pose_change = _column(metrics, "mean_pose_change_deg")
    panels = ["loss"]
    if resolutions:
        panels.append("resolution")
    if np.isfinite(pose_change).any():
        panels.append("pose")
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(7, 1.0 + 2.3 * len(panels)), dpi=110)
    axes = axes[:, 0]
    k = switch_epoch(metrics)
    t_switch = switch_label = None
    if k is not None:
        i = next(j for j, r in enumerate(metrics) if int(r["epoch"]) == k)
        t_switch = float(t[i - 1]) if i > 0 else 0.0
        switch_label = f" switch (after epoch {k - 1})"

    ax = axes[panels.index("loss")]
    ax.plot(t, loss, color="0.6", linewidth=1)
    ax.plot(t[~stage2], loss[~stage2], "o", color="tab:blue", label="stage 1: auto-encoding")
    ax.plot(t[stage2], loss[stage2], "s", color="tab:orange", label="stage 2: auto-decoding")
    ax.set_ylabel("loss (mean NLL / image)")
    ax.legend(fontsize=8, loc="upper right")
    if "resolution" in panels:
        ax = axes[panels.index("resolution")]
        ts = np.array([r.elapsed_s for r in resolutions]) / unit
        for attr, label, style in (("resolution_05_angstrom", "FSC 0.5", "o-"),
                                   ("resolution_0143_angstrom", "FSC 0.143", "^-")):
            vals = np.array([getattr(r, attr) for r in resolutions], dtype=np.float64)
            vals[~np.isfinite(vals)] = np.nan
            ax.plot(ts, vals, style, label=label)
        ax.set_ylabel("resolution vs GT (Å)")
        ax.legend(fontsize=8, loc="upper right")
    if "pose" in panels:
        ax = axes[panels.index("pose")]
        ax.plot(t, pose_change, "s-", color="tab:orange")
        ax.set_ylabel("mean pose change (°)")
    row_of = {int(r["epoch"]): j for j, r in enumerate(metrics)}
    events = [(float(t[row_of[b]]) if b in row_of else 0.0, label)
              for b, label in run_events(metrics) if b in row_of or b < int(metrics[0]["epoch"])]
    for ax in axes:
        ax.grid(alpha=0.3)
        if t_switch is not None:
            ax.axvline(t_switch, color="k", linestyle="--", linewidth=1)
        for x, _ in events:
            ax.axvline(x, color="tab:green", linestyle=":", linewidth=1.2)
    for x, label in events:
        axes[-1].text(x, 0.97, label + " ", transform=axes[-1].get_xaxis_transform(),
                      rotation=90, va="top", ha="right", fontsize=7, color="tab:green")
    if t_switch is not None:
        axes[0].text(t_switch, 1.0, switch_label,
                     transform=axes[0].get_xaxis_transform(), va="bottom", ha="left", fontsize=8)
    axes[-1].set_xlabel(xlabel)
    axes[-1].set_xlim(left=0)
    fig.tight_layout()
    save_figure(fig, path)


def plot_halves_training(
    metrics_by_half: Sequence[tuple[str, Sequence[MetricsLine]]], path: str | Path
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
    items = [(label, m) for label, m in metrics_by_half if m]
    if not items:
        raise ValueError("no metrics to plot")
    plt = pyplot()
    last = max(float(elapsed_seconds(m)[-1]) for _, m in items)
    unit, xlabel = time_axis_unit(last)
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    for (label, metrics), colour in zip(items, _HALF_COLOURS * len(items), strict=False):
        t = elapsed_seconds(metrics) / unit
        loss = _column(metrics, "loss")
        stage2 = np.array([r.get("stage") == Stage.AUTODECODE for r in metrics])
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


# ---------------------------------------------------------------------------- encoder heads
def _draw_usage(ax: Axes, xs: Sequence[int], usage: np.ndarray, cmap: Colormap) -> None:
    """Stacked bars of each head's fraction of images at positions ``xs``."""
    x = np.asarray(xs, dtype=np.float64)
    bottom = np.zeros(len(xs))
    for h in range(usage.shape[1]):
        ax.bar(x, usage[:, h], bottom=bottom, width=0.8, color=cmap(h % cmap.N),
               label=f"head {h + 1}", edgecolor="white", linewidth=0.3)
        bottom += usage[:, h]
    ax.set_ylabel("fraction of images")
    ax.set_ylim(0, 1)
    ax.set_title("winning head per image", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def _draw_spread(ax: Axes, epochs: Sequence[int], spread: np.ndarray, cmap: Colormap, *,
                 legend: bool) -> None:
    """Each head's spread across images (degrees) per epoch, the uniformly random level
    marked."""
    ep = np.asarray(epochs, dtype=np.float64)
    for h in range(spread.shape[1]):
        ax.plot(ep, spread[:, h], "o-", color=cmap(h % cmap.N), markersize=3,
                linewidth=1, label=f"head {h + 1}")
    ax.axhline(RANDOM_SPREAD_DEG, color="0.4", linestyle=":", linewidth=1)
    ax.text(1.0, RANDOM_SPREAD_DEG, f"random ≈ {RANDOM_SPREAD_DEG:.0f}° ",
            transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7,
            color="0.3")
    ax.set_ylim(0, 180)
    ax.set_ylabel("spread across images (°)")
    ax.set_title("spread of each head's rotation across images\n(median angle between "
                 "images; 0 = one rotation for all)", fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def plot_head_usage(metrics: Sequence[MetricsLine], path: str | Path) -> None:
    """The encoder heads in stage 1, against the epoch: stacked bars of the fraction of images
    won by each head, per epoch and at the switch (top panel) and, when the metrics have
    ``head_spread_deg`` (:func:`~cryospin.report.analysis.head_spread_table`), each head's
    output spread across images (bottom panel, degrees, with the uniformly random level
    marked). Either panel alone when the metrics hold only its numbers."""
    labels, xs, rows = head_usage_bars(metrics)
    spread_epochs, spread = head_spread_table(metrics)
    if not labels and not spread_epochs:
        raise ValueError("no head usage or head spread in the metrics")
    usage = padded_rows(rows, 0.0)
    n_heads = max(usage.shape[1], spread.shape[1])
    plt = pyplot()
    n_panels = int(bool(labels)) + int(bool(spread_epochs))
    n_x = len(set(xs) | set(spread_epochs))
    fig, axes = plt.subplots(n_panels, 1, sharex=True, squeeze=False,
                             figsize=(max(6.0, 2.5 + 0.25 * n_x), 1.2 + 2.4 * n_panels),
                             dpi=110)
    axes = list(axes[:, 0])
    cmap = plt.get_cmap("tab10" if n_heads <= 10 else "tab20")
    if labels:
        _draw_usage(axes[0], xs, usage, cmap)
    if spread_epochs:
        _draw_spread(axes[-1], spread_epochs, spread, cmap, legend=not labels)
    ticks = sorted({(x, lab) for x, lab in zip(xs, labels, strict=True)}
                   | {(e, str(e)) for e in spread_epochs if e not in xs})
    step = max(1, len(ticks) // 25)
    shown = [t for i, t in enumerate(ticks) if i % step == 0 or t[1] == "switch"]
    axes[-1].set_xticks([t[0] for t in shown], [t[1] for t in shown], fontsize=8)
    axes[-1].set_xlabel("stage-1 epoch")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------- maps and poses
def plot_orientations(rotations: Tensor | np.ndarray, path: str | Path, *,
                      title: str | None = None) -> None:
    """Heat map of the view directions (third rows of ``R``) on a Mollweide (equal-area) map.

    The bins are equal-area (:func:`~cryospin.report.analysis.orientation_histogram`), their
    number grows with the number of particles; the colour is the density relative to a
    uniform distribution.
    """
    plt = pyplot()
    v = view_directions(rotations)
    n = v.shape[0]
    n_z = int(np.clip(round(math.sqrt(max(n, 1) / 40.0)), 4, 36))  # ~20 per bin if uniform
    counts, lon_edges, _ = orientation_histogram(v, n_lon=2 * n_z, n_z=n_z)
    density = counts / max(n, 1) * counts.size  # (n_z, 2 n_z), 1 = uniform
    # draw each bin as a block of finer cells (equal steps in lon and z, so the block covers
    # the bin exactly) so that the bin boundaries follow the projection's curves
    f = int(math.ceil(36 / n_z))
    fine = np.repeat(np.repeat(density, f, axis=0), f, axis=1)  # (f n_z, 2 f n_z)
    lon_fine = np.linspace(lon_edges[0], lon_edges[-1], fine.shape[1] + 1)
    lat_fine = np.arcsin(np.linspace(-1.0, 1.0, fine.shape[0] + 1))
    fig = plt.figure(figsize=(7.5, 4.2), dpi=110)
    ax = fig.add_subplot(111, projection="mollweide")
    mesh = ax.pcolormesh(lon_fine, lat_fine, fine, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.08,
                 label="density of view directions (1 = uniform)")
    ax.grid(alpha=0.4)
    ax.tick_params(labelsize=7)
    ax.set_title(title or f"view directions R[2, :] of {n} particles "
                 f"(longitude atan2(y, x), latitude asin z; equal-area)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_particle_scores(scores: np.ndarray, empty_score: float, path: str | Path,
                         against: str = "an empty image") -> None:
    """Histogram of the particles' scores `(N,)` (nats, :mod:`cryospin.train.scores`), the
    line ``empty_score`` at or below which the map explains an image no better than
    ``against`` (an empty image; with the junk class, an empty image or junk), and how many
    lie there."""
    plt = pyplot()
    scores = np.asarray(scores, dtype=np.float64)
    low = int((scores <= empty_score).sum())
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    lo, hi = float(np.percentile(scores, 0.1)), float(np.percentile(scores, 99.9))
    lo, hi = min(lo, empty_score - 1.0), max(hi, empty_score + 1.0)
    ax.hist(np.clip(scores, lo, hi), bins=np.linspace(lo, hi, 81), color="tab:blue", alpha=0.8)
    ax.axvline(empty_score, color="tab:red", linestyle="--", linewidth=1.2,
               label=f"no better than {against}: {low:,} of {scores.size:,} "
                     f"({100.0 * low / max(scores.size, 1):.1f} %)")
    ax.set_xlabel(f"score: log-likelihood against {against} (nats; outermost 0.1 % "
                  "drawn at the edges)", fontsize=8)
    ax.set_ylabel("particles")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_noise_spectrum(record: NoiseSpectrumRecord, path: str | Path) -> None:
    """The noise's power per shell relative to its mean (log scale) against spatial frequency
    (1/Å), for the shells ``1 … L//2``; white noise is the line at 1, each frequency's weight
    in the likelihood the inverse; the shells beyond the training disc are shaded."""
    plt = pyplot()
    shells = record.shells[1:]
    freq = record.frequency_per_angstrom[1:]
    power = record.relative_power[1:]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.semilogy(freq, np.maximum(power, 1e-6), marker=".", color="tab:blue",
                label="background noise power / its mean")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="white noise")
    edge = record.loss_radius_cycles_per_box / (record.box_px * record.pixel_size_angstrom)
    if record.loss_radius_cycles_per_box < float(shells[-1]):
        ax.axvspan(edge, float(freq[-1]), color="0.85", zorder=0,
                   label=f"beyond the training disc ({1.0 / edge:.3g} Å)")
    summary = noise_summary(record)
    lo, hi = summary["relative_power_min"], summary["relative_power_max"]
    ax.set_title(f"noise power {lo:.2g}-{hi:.2g}x its mean on the training disc; each "
                 "frequency weighted by the inverse", fontsize=9)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("relative noise power")
    plain = plt.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def plot_rotation_errors(result: PoseErrorResult, path: str | Path) -> None:
    """Histograms of the rotation and view-direction errors of a
    :class:`~cryospin.evaluate.pose_error.PoseErrorResult` (degrees), medians marked."""
    plt = pyplot()
    rot = np.asarray(result.rotation_error_deg, dtype=np.float64)
    view = np.asarray(result.view_direction_error_deg, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    bins = np.linspace(0.0, 180.0, 91)
    ax.hist(rot, bins=bins, color="tab:blue", alpha=0.8, label="rotation error")
    ax.hist(view, bins=bins, histtype="step", color="tab:red", linewidth=1.2,
            label="view-direction error")
    med = float(np.median(rot))
    ax.axvline(med, color="k", linestyle="--", linewidth=1,
               label=f"median rotation error {med:.1f}°")
    ax.set_xlabel("error after global alignment (°)")
    ax.set_ylabel("particles")
    ax.set_xlim(0, 180)
    hand = "mirrored hand" if result.flipped else "same hand"
    ax.set_title(f"final poses vs ground truth ({rot.size} particles, {hand})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------- pose track
def plot_track_errors(errors: TrackErrors, path: str | Path) -> None:
    """Median and mean rotation error of the tracked particles against the epoch (stage 1: the
    winning head), their median view-direction and in-plane errors and, in stage 1, the
    best-of-heads median error; the switch (between the last auto-encoding and the first
    auto-decoding epoch) marked."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator  # optional dependency, present once pyplot() is

    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    ep = errors.epochs
    s1 = errors.stage1
    ax.plot(ep, errors.median_deg, "o-", color="tab:blue",
            label="median (stage 1: winning head)" if s1.any() else "median")
    ax.plot(ep, errors.mean_deg, "s--", color="tab:red", label="mean")
    ax.plot(ep, errors.view_median_deg, "^:", color="tab:green", markersize=4,
            label="median view direction")
    ax.plot(ep, errors.in_plane_median_deg, "v:", color="tab:purple", markersize=4,
            label="median in-plane")
    if s1.any():
        ax.plot(ep[s1], errors.best_head_median_deg[s1], "D-", color="tab:orange",
                markersize=4, label="median best of heads (stage 1)")
    s2 = ~s1
    if s1.any() and s2.any():
        x = 0.5 * (ep[s1].max() + ep[s2].min())
        ax.axvline(x, color="k", linestyle="--", linewidth=1)
        ax.text(x, 0.02, " switch", transform=ax.get_xaxis_transform(), va="bottom",
                ha="left", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("rotation error (°)")
    lines = np.concatenate([errors.mean_deg, errors.median_deg, errors.view_median_deg,
                            errors.in_plane_median_deg, errors.best_head_median_deg[s1]])
    top = float(np.nanmax(lines)) if np.isfinite(lines).any() else 1.0
    ax.set_ylim(0, min(180.0, 1.25 * top + 1.0))
    k = int(errors.results[0].rotation_error_deg.shape[0]) if errors.results else 0
    ax.set_title(f"tracked particles ({k}) vs ground truth, each epoch aligned "
                 "(global rotation and hand)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path)


def plot_head_errors(gt_directions: np.ndarray, errors_deg: np.ndarray, path: str | Path, *,
                     epoch: int | None = None) -> None:
    """Per head, the rotation error of its prediction at the ground-truth view direction of
    each particle, on an equal-area (Mollweide) map (paper Fig. 6).

    Parameters
    ----------
    gt_directions : `(K, 3)`
        Ground-truth view directions (third rows of the ground-truth rotations).
    errors_deg : `(M, K)`
        From :func:`~cryospin.report.ground_truth.head_errors`.
    """
    plt = pyplot()
    errors_deg = np.asarray(errors_deg, dtype=np.float64)
    m = errors_deg.shape[0]
    lon, lat = mollweide_lon_lat(np.asarray(gt_directions))
    cols = min(m, 3)
    rows = -(-m // cols)
    fig = plt.figure(figsize=(3.9 * cols, 2.1 * rows + 1.1), dpi=110, layout="constrained")
    mappable = None
    size = float(np.clip(4000.0 / max(lon.size, 1), 6.0, 40.0))
    for h in range(m):
        ax = fig.add_subplot(rows, cols, h + 1, projection="mollweide")
        mappable = ax.scatter(lon, lat, c=errors_deg[h], s=size, cmap="viridis_r", vmin=0,
                              vmax=180, edgecolors="none")
        ax.set_xticklabels([])
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.4)
        good = float(np.mean(errors_deg[h] < 10.0)) * 100
        ax.set_title(f"head {h + 1}: median {np.median(errors_deg[h]):.0f}°, "
                     f"{good:.0f} % < 10°", fontsize=8)
    if mappable is not None:
        fig.colorbar(mappable, ax=fig.axes, orientation="horizontal", shrink=0.6,
                     aspect=40, label="rotation error of the head's pose (°)")
    fig.suptitle("per-head rotation error at the ground-truth view direction"
                 + (f" (epoch {epoch}, last auto-encoding epoch)" if epoch is not None else ""),
                 fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- ground truth
def add_gt_figures(figs: FigureSet, *, map_path: Path, gt_map: str | Path | None,
                   final_fsc: FSCResult | None, gt_rotations: Tensor | None,
                   pose_result: PoseErrorResult | None) -> None:
    """The ground-truth figures (those whose inputs are not None): FSC of ``map_path`` against
    ``gt_map`` (and its ``fsc.json``), the ground-truth orientations in the run's frame and the
    pose-error histogram."""
    if final_fsc is not None and gt_map is not None:
        plot_fsc([(f"{map_path.name} vs {Path(gt_map).name}", final_fsc)],
                 figs.add("fsc.png", "FSC against the ground truth",
                          f"Fourier shell correlation of {map_path.name}, aligned (rotation, "
                          "shift, hand) to the ground truth, with the 0.5 and 0.143 "
                          "thresholds."),
                 title="map vs ground truth (aligned)")
        write_fsc_json(final_fsc, figs.dir / FSC_JSON, map=str(map_path), gt_map=str(gt_map))
    if pose_result is not None and gt_rotations is not None:
        plot_orientations(gt_in_run_frame(gt_rotations, pose_result),
                          figs.add("orientations_gt.png", "Ground-truth orientation distribution",
                                   "View directions of the ground-truth poses, brought into the "
                                   "run's frame by the global alignment (and hand) of the pose "
                                   "error: compare with the orientation distribution above."),
                          title=f"ground-truth view directions of {gt_rotations.shape[0]} "
                                "particles, in the run's frame (equal-area)")
        plot_rotation_errors(pose_result, figs.add(
            "rotation_error.png", "Pose error",
            "Rotation and view-direction errors of the final poses after the best global "
            "rotation (and hand)."))
