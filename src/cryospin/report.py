"""Run report: figures (one PNG each) and a self-contained HTML page from a run folder.

A run folder is what ``cryospin reconstruct -o RUN_DIR`` writes (:mod:`cryospin.train.fit`):
``config.yaml``, ``metrics.jsonl`` (one JSON object per epoch, :mod:`cryospin.train.metrics`),
``map.NNN.mrc`` per epoch, ``map.mrc`` and ``poses.star`` at the end. The page needs no network
and no JavaScript; figures are PNGs next to it, referenced by relative paths.

Figures (each function writes exactly one PNG; matplotlib is imported lazily, Agg backend):

* :func:`plot_training` — loss (and, with a ground truth, resolution; and the stage-2 mean pose
  change) against cumulative wall time, the switch marked;
* :func:`plot_head_usage` — fraction of images won by each head, per stage-1 epoch and at the
  switch (stacked bars), and below it, when ``metrics.jsonl`` has them, each head's output
  spread across images per stage-1 epoch (:func:`head_spread_table`);
* :func:`plot_orientations` — view directions on the sphere as an equal-area (Mollweide) heat map
  of equal-area bins;
* :func:`plot_map_views` — central sections and projections (sums) along z, y and x;
* :func:`plot_rotation_errors` — histogram of the rotation error against ground-truth poses;
* :func:`plot_track_errors` — with ``pose_track.npz`` (:mod:`cryospin.train.track`) and
  ground-truth poses: median and mean rotation error of the tracked particles against the
  epoch, the median view-direction and in-plane errors and, in stage 1, the best-of-heads
  median error, the switch marked;
* :func:`plot_head_errors` — per encoder head, the rotation error of its prediction at the last
  auto-encoding epoch, at each particle's ground-truth view direction (equal-area map);
* :func:`plot_pose_posterior` — one particle's view posterior (``cryospin posterior``);
* the FSC curve against a ground-truth map (:func:`cryospin.plotting.plot_fsc`).

Conventions (``docs/conventions.md``): volumes are `(L, L, L)` indexed ``[z, y, x]``; a rotation
``R`` left-multiplies xyz column vectors and its third row ``R[2, :]`` is the projection
direction in the map frame, ``(sin θ cos φ, sin θ sin φ, cos θ)`` with RELION's ``φ = rot``,
``θ = tilt``.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryospin.atomic import atomic_path, atomic_write_text
from cryospin.errors import InputError, OutputError
from cryospin.plotting import pyplot

__all__ = [
    "RunData",
    "EpochResolution",
    "ReportResult",
    "HAND_NOTE",
    "load_run",
    "switch_epoch",
    "elapsed_seconds",
    "view_directions",
    "orientation_histogram",
    "pick_epochs",
    "head_usage_table",
    "head_spread_table",
    "RANDOM_SPREAD_DEG",
    "gt_in_run_frame",
    "plot_training",
    "plot_head_usage",
    "plot_orientations",
    "plot_map_views",
    "plot_rotation_errors",
    "TrackErrors",
    "track_errors",
    "head_errors",
    "track_error_rows",
    "plot_track_errors",
    "plot_head_errors",
    "plot_pose_posterior",
    "build_html",
    "write_report",
    "read_volume",
    "read_poses",
    "ground_truth_on_grid",
    "format_resolution",
    "format_duration",
    "json_ready",
    "save_figure",
    "time_axis_unit",
    "FigureSet",
    "MIRROR_NOTE",
    "read_gt_poses",
    "compare_map_with_gt",
    "compare_poses_with_gt",
    "add_gt_figures",
    "gt_summary_rows",
]

#: The handedness paragraph of every report.
HAND_NOTE = (
    "Ab initio reconstruction cannot distinguish a map from its mirror image: the mirrored map "
    "with mirrored poses explains the images equally well. If the hand is wrong (e.g. "
    "left-handed α-helices), run <code>cryospin flip-hand map.mrc -o map_flipped.mrc</code> "
    "(add <code>--poses poses.star --out-poses poses_flipped.star</code> to convert the poses)."
)

#: Median geodesic distance between two independent uniformly random rotations (degrees): the
#: root of ``(θ − sin θ) / π = 1/2``. A head whose ``head_spread_deg`` reaches it gives
#: practically unrelated rotations to different images; 0 = one rotation for every image.
RANDOM_SPREAD_DEG = 132.346

_EPOCH_MAP = re.compile(r"^map\.(\d+)\.mrc$")
_STAGE1, _STAGE2 = "autoencode", "autodecode"


# ---------------------------------------------------------------------------- run folder
@dataclass(frozen=True)
class RunData:
    """What a report reads from a run folder (maps and poses are read on demand).

    Attributes
    ----------
    run_dir : Path
    metrics : list of dict
        Lines of ``metrics.jsonl`` in epoch order (see :mod:`cryospin.train.metrics`).
    config : dict
        ``config.yaml`` parsed (empty when absent).
    config_text : str or None
        ``config.yaml`` verbatim.
    map_path : Path or None
        ``map.mrc``, else the last epoch's map (unfinished run), else None.
    epoch_maps : dict[int, Path]
        ``map.NNN.mrc`` by epoch.
    poses_path : Path or None
        ``poses.star`` when the run finished.
    finished : bool
        ``map.mrc`` exists.
    """

    run_dir: Path
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    config_text: str | None
    map_path: Path | None
    epoch_maps: dict[int, Path]
    poses_path: Path | None
    finished: bool


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder's metrics and config and find its maps and poses.

    Raises
    ------
    InputError
        The folder does not exist or holds neither ``metrics.jsonl`` nor a map.
    """
    import yaml

    from cryospin.train.metrics import read_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("run folder not found" if not run_dir.exists() else "not a folder",
                         run_dir)
    metrics = sorted(read_metrics(run_dir / "metrics.jsonl"), key=lambda r: int(r.get("epoch", 0)))
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    config: dict[str, Any] = {}
    if config_text:
        try:
            loaded = yaml.safe_load(config_text)
        except yaml.YAMLError as exc:
            raise InputError(f"cannot parse YAML ({exc.__class__.__name__})", config_path) from None
        config = loaded if isinstance(loaded, dict) else {}
    epoch_maps = {}
    for p in run_dir.iterdir():
        m = _EPOCH_MAP.match(p.name)
        if m and p.is_file():
            epoch_maps[int(m.group(1))] = p
    epoch_maps = dict(sorted(epoch_maps.items()))
    final = run_dir / "map.mrc"
    finished = final.is_file()
    map_path = final if finished else (epoch_maps[max(epoch_maps)] if epoch_maps else None)
    if not metrics and map_path is None:
        raise InputError("no metrics.jsonl and no map: not a cryospin run folder", run_dir)
    poses = run_dir / "poses.star"
    return RunData(
        run_dir=run_dir,
        metrics=metrics,
        config=config,
        config_text=config_text,
        map_path=map_path,
        epoch_maps=epoch_maps,
        poses_path=poses if poses.is_file() else None,
        finished=finished,
    )


def switch_epoch(metrics: Sequence[dict[str, Any]]) -> int | None:
    """The first auto-decoding (stage 2) epoch, or None if the run never switched."""
    for row in metrics:
        if row.get("stage") == _STAGE2:
            return int(row["epoch"])
    return None


def elapsed_seconds(metrics: Sequence[dict[str, Any]]) -> np.ndarray:
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
    spread = np.linspace(0, len(rest) - 1, spare).round().astype(int) if spare else []
    return sorted(must | {rest[i] for i in spread})


# ---------------------------------------------------------------------------- orientations
def view_directions(rotations: Any) -> np.ndarray:
    """Projection directions in the map frame, `(N, 3)` float64: the third rows ``R[:, 2, :]``.

    Parameters
    ----------
    rotations : `(N, 3, 3)` array or tensor
        cryospin rotations (``docs/conventions.md``).
    """
    R = np.asarray(rotations.detach().cpu() if hasattr(rotations, "detach") else rotations,
                   dtype=np.float64)
    if R.ndim != 3 or R.shape[1:] != (3, 3):
        raise ValueError(f"expected (N, 3, 3) rotations, got shape {R.shape}")
    return R[:, 2, :].copy()


def orientation_histogram(
    directions: Any, *, n_lon: int = 72, n_z: int = 36
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


# ---------------------------------------------------------------------------- figures
def save_figure(fig: Any, path: str | Path) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically, then close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def time_axis_unit(last_s: float) -> tuple[float, str]:
    """Divisor and axis label for a time axis ending at ``last_s`` seconds."""
    if last_s > 3 * 3600:
        return 3600.0, "wall time (h)"
    if last_s > 600:
        return 60.0, "wall time (min)"
    return 1.0, "wall time (s)"


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


def plot_training(
    metrics: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    resolutions: Sequence[EpochResolution] = (),
) -> None:
    """Loss (and resolution, and mean pose change) against cumulative wall time.

    One panel per quantity, sharing the time axis; markers distinguish the stages and a dashed
    line marks the switch (end of the last auto-encoding epoch).
    """
    if not metrics:
        raise ValueError("no metrics to plot")
    plt = pyplot()
    seconds = elapsed_seconds(metrics)
    unit, xlabel = time_axis_unit(float(seconds[-1]))
    t = seconds / unit
    stage2 = np.array([r.get("stage") == _STAGE2 for r in metrics])
    loss = np.array([np.nan if r.get("loss") is None else float(r["loss"]) for r in metrics])
    pose_change = np.array([np.nan if r.get("mean_pose_change_deg") is None
                            else float(r["mean_pose_change_deg"]) for r in metrics])
    panels = ["loss"]
    if resolutions:
        panels.append("resolution")
    if np.isfinite(pose_change).any():
        panels.append("pose")
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(7, 1.0 + 2.3 * len(panels)), dpi=110)
    axes = axes[:, 0]
    k = switch_epoch(metrics)
    t_switch = None
    if k is not None:
        i = next(j for j, r in enumerate(metrics) if int(r["epoch"]) == k)
        t_switch = float(t[i - 1]) if i > 0 else 0.0

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
    for ax in axes:
        ax.grid(alpha=0.3)
        if t_switch is not None:
            ax.axvline(t_switch, color="k", linestyle="--", linewidth=1)
    if t_switch is not None:
        axes[0].text(t_switch, 1.0, f" switch (after epoch {k - 1})",
                     transform=axes[0].get_xaxis_transform(), va="bottom", ha="left", fontsize=8)
    axes[-1].set_xlabel(xlabel)
    axes[-1].set_xlim(left=0)
    fig.tight_layout()
    save_figure(fig, path)


def _head_usage_rows(
    metrics: Sequence[dict[str, Any]],
) -> tuple[list[str], list[int], list[list[float]]]:
    """Labels, x positions (the epoch of the line; the switch pass sits at the first
    auto-decoding epoch, whose line records it) and per-head usage of each bar."""
    labels: list[str] = []
    xs: list[int] = []
    rows: list[list[float]] = []
    for r in metrics:
        if r.get("stage") == _STAGE1 and r.get("head_usage"):
            labels.append(str(int(r["epoch"])))
            xs.append(int(r["epoch"]))
            rows.append([float(u) for u in r["head_usage"]])
        switch = (r.get("extra") or {}).get("switch")
        if isinstance(switch, dict) and switch.get("head_usage"):
            labels.append("switch")
            xs.append(int(r["epoch"]))
            rows.append([float(u) for u in switch["head_usage"]])
    return labels, xs, rows


def _padded(rows: Sequence[Sequence[float]], fill: float) -> np.ndarray:
    """Ragged rows as a `(len(rows), longest)` float64 array, missing cells ``fill``."""
    if not rows:
        return np.zeros((0, 0))
    table = np.full((len(rows), max(len(u) for u in rows)), fill, dtype=np.float64)
    for i, u in enumerate(rows):
        table[i, : len(u)] = u
    return table


def head_usage_table(metrics: Sequence[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """Bar labels and head-usage fractions `(bars, M)`: stage-1 epochs, then the switch pass."""
    labels, _, rows = _head_usage_rows(metrics)
    return labels, _padded(rows, 0.0)


def head_spread_table(metrics: Sequence[dict[str, Any]]) -> tuple[list[int], np.ndarray]:
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
        if r.get("stage") == _STAGE1 and spread:
            epochs.append(int(r["epoch"]))
            rows.append([math.nan if v is None else float(v) for v in spread])
    return epochs, _padded(rows, math.nan)


def plot_head_usage(metrics: Sequence[dict[str, Any]], path: str | Path) -> None:
    """The encoder heads in stage 1, against the epoch: stacked bars of the fraction of images
    won by each head, per epoch and at the switch (top panel) and, when the metrics have
    ``head_spread_deg`` (:func:`head_spread_table`), each head's output spread across images
    (bottom panel, degrees, with the uniformly random level marked). Either panel alone when
    the metrics hold only its numbers."""
    labels, xs, rows = _head_usage_rows(metrics)
    spread_epochs, spread = head_spread_table(metrics)
    if not labels and not spread_epochs:
        raise ValueError("no head usage or head spread in the metrics")
    usage = _padded(rows, 0.0)
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
        ax = axes[0]
        x = np.asarray(xs, dtype=np.float64)
        bottom = np.zeros(len(labels))
        for h in range(usage.shape[1]):
            ax.bar(x, usage[:, h], bottom=bottom, width=0.8, color=cmap(h % cmap.N),
                   label=f"head {h + 1}", edgecolor="white", linewidth=0.3)
            bottom += usage[:, h]
        ax.set_ylabel("fraction of images")
        ax.set_ylim(0, 1)
        ax.set_title("winning head per image", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if spread_epochs:
        ax = axes[-1]
        ep = np.asarray(spread_epochs, dtype=np.float64)
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
        if not labels:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ticks = sorted({(x, lab) for x, lab in zip(xs, labels, strict=True)}
                   | {(e, str(e)) for e in spread_epochs if e not in xs})
    step = max(1, len(ticks) // 25)
    shown = [t for i, t in enumerate(ticks) if i % step == 0 or t[1] == "switch"]
    axes[-1].set_xticks([t[0] for t in shown], [t[1] for t in shown], fontsize=8)
    axes[-1].set_xlabel("stage-1 epoch")
    fig.tight_layout()
    save_figure(fig, path)


def plot_orientations(rotations: Any, path: str | Path, *, title: str | None = None) -> None:
    """Heat map of the view directions (third rows of ``R``) on a Mollweide (equal-area) map.

    The bins are equal-area (:func:`orientation_histogram`), their number grows with the
    number of particles; the colour is the density relative to a uniform distribution.
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


def plot_map_views(
    volume: Any, path: str | Path, *, pixel_size_angstrom: float | None = None
) -> None:
    """Central sections (top) and projections (sums, bottom) of a map along z, y and x.

    Parameters
    ----------
    volume : `(L, L, L)` indexed ``[z, y, x]``
        Sections are the planes through voxel ``L//2``; images are drawn with the first
        in-plane axis up (``origin="lower"``).
    """
    vol = np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume,
                     dtype=np.float64)
    if vol.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) map, got shape {vol.shape}")
    plt = pyplot()
    cz, cy, cx = (s // 2 for s in vol.shape)
    # (image indexed [row, col], row axis name, column axis name)
    sections = [(vol[cz], "y", "x"), (vol[:, cy, :], "z", "x"), (vol[:, :, cx], "z", "y")]
    projections = [(vol.sum(0), "y", "x"), (vol.sum(1), "z", "x"), (vol.sum(2), "z", "y")]
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.6), dpi=110)
    for col, normal in enumerate(("z", "y", "x")):
        for row, (images, kind) in enumerate(((sections, "section"), (projections, "projection"))):
            img, vert, horiz = images[col]
            ax = axes[row, col]
            ax.imshow(img, origin="lower", cmap="gray", interpolation="nearest")
            ax.set_title(f"{kind} along {normal}" + (f" ({normal} = 0)" if row == 0 else ""),
                         fontsize=9)
            ax.set_xlabel(f"{horiz} →", fontsize=8)
            ax.set_ylabel(f"{vert} →", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    size = f"{vol.shape[-1]} px"
    if pixel_size_angstrom:
        size += f" at {pixel_size_angstrom:g} Å/px"
    fig.suptitle(f"map {'×'.join(str(s) for s in vol.shape[::-1])} ({size})", fontsize=10)
    fig.tight_layout(h_pad=1.5)
    save_figure(fig, path)


def plot_rotation_errors(result: Any, path: str | Path) -> None:
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
    results: list[Any]
    stage1: np.ndarray
    view_median_deg: np.ndarray
    in_plane_median_deg: np.ndarray
    best_head_median_deg: np.ndarray


def _as_float64(rotations: Any) -> np.ndarray:
    return np.asarray(rotations.detach().cpu() if hasattr(rotations, "detach") else rotations,
                      dtype=np.float64)


def _head_errors_at(track: Any, row: int, gt: np.ndarray, result: Any) -> np.ndarray:
    """`(K, M)` geodesic angles (degrees) between every head's rotation in track row ``row``
    and the tracked particles' ground truth ``gt`` `(K, 3, 3)` in the run's frame of
    ``result`` (that epoch's PoseErrorResult)."""
    import torch

    from cryospin.rotations import geodesic_distance_deg

    ref = gt_in_run_frame(gt, result)  # (K, 3, 3)
    heads = torch.as_tensor(track.head_rotations[row], dtype=torch.float64)  # (K, M, 3, 3)
    return geodesic_distance_deg(heads, ref[:, None]).numpy().copy()


def track_errors(
    track: Any, gt_rotations: Any, *, allow_flip: bool = True, max_epochs: int = 60
) -> TrackErrors:
    """Per-epoch rotation errors of a :class:`~cryospin.train.track.PoseTrack` against the
    ground-truth rotations of all `(N, 3, 3)` particles (rows ``track.indices`` are used).

    At most ``max_epochs`` epochs are evaluated (evenly spread, always with the last one and
    the last auto-encoding epoch; :func:`pick_epochs`): each alignment costs up to ~0.3 s.
    """
    from cryospin.evaluate.pose_error import pose_error

    gt = _as_float64(gt_rotations)[track.indices]  # (K, 3, 3)
    stage1 = track.stage1_mask()
    epochs = np.asarray(track.epochs, dtype=np.int64)
    keep = [int(epochs[stage1][-1])] if stage1.any() else []
    chosen = set(pick_epochs(epochs.tolist(), max_epochs, keep=keep))
    rows = [e for e in range(epochs.shape[0]) if int(epochs[e]) in chosen]
    results = [pose_error(track.rotations[e].astype(np.float64), gt, allow_flip=allow_flip)
               for e in rows]
    best = np.full(len(rows), math.nan)
    for i, (row, result) in enumerate(zip(rows, results, strict=True)):
        if stage1[row]:  # min over heads, ignoring a NaN head
            best[i] = np.median(np.fmin.reduce(_head_errors_at(track, row, gt, result), axis=1))
    return TrackErrors(
        epochs=epochs[rows],
        median_deg=np.array([np.median(r.rotation_error_deg) for r in results]),
        mean_deg=np.array([np.mean(r.rotation_error_deg) for r in results]),
        results=results,
        stage1=stage1[rows],
        view_median_deg=np.array([np.median(r.view_direction_error_deg) for r in results]),
        in_plane_median_deg=np.array([np.median(r.in_plane_error_deg) for r in results]),
        best_head_median_deg=best,
    )


def track_error_rows(errors: TrackErrors) -> list[dict[str, Any]]:
    """The per-epoch rows of the summary's ``tracked_rotation_error``: ``epoch``,
    ``median_deg``, ``mean_deg`` (as before), ``view_median_deg``, ``in_plane_median_deg``,
    ``stage`` and ``best_head_median_deg`` (None outside stage 1)."""
    return [
        {"epoch": int(e), "median_deg": float(md), "mean_deg": float(mn),
         "view_median_deg": float(v), "in_plane_median_deg": float(ip),
         "stage": _STAGE1 if s1 else _STAGE2,
         "best_head_median_deg": float(b) if s1 and math.isfinite(b) else None}
        for e, md, mn, v, ip, s1, b in zip(
            errors.epochs, errors.median_deg, errors.mean_deg, errors.view_median_deg,
            errors.in_plane_median_deg, errors.stage1, errors.best_head_median_deg,
            strict=True)
    ]


def head_errors(track: Any, gt_rotations: Any, errors: TrackErrors) -> tuple[int, np.ndarray]:
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
    return epoch, _head_errors_at(track, row, gt, errors.results[e]).T.copy()


def plot_track_errors(errors: TrackErrors, path: str | Path) -> None:
    """Median and mean rotation error of the tracked particles against the epoch (stage 1: the
    winning head), their median view-direction and in-plane errors and, in stage 1, the
    best-of-heads median error; the switch (between the last auto-encoding and the first
    auto-decoding epoch) marked."""
    plt = pyplot()
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
    from matplotlib.ticker import MaxNLocator

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


def _mollweide_xy(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude ``atan2(y, x)`` and latitude ``asin z`` (radians) of unit vectors `(n, 3)`."""
    v = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return np.arctan2(v[:, 1], v[:, 0]), np.arcsin(np.clip(v[:, 2], -1.0, 1.0))


def plot_head_errors(gt_directions: Any, errors_deg: np.ndarray, path: str | Path, *,
                     epoch: int | None = None) -> None:
    """Per head, the rotation error of its prediction at the ground-truth view direction of
    each particle, on an equal-area (Mollweide) map (paper Fig. 6).

    Parameters
    ----------
    gt_directions : `(K, 3)`
        Ground-truth view directions (third rows of the ground-truth rotations).
    errors_deg : `(M, K)`
        From :func:`head_errors`.
    """
    plt = pyplot()
    errors_deg = np.asarray(errors_deg, dtype=np.float64)
    m = errors_deg.shape[0]
    lon, lat = _mollweide_xy(np.asarray(gt_directions))
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


def _break_wraps(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert NaNs where a path crosses the ±180° meridian (no line across the map)."""
    if lon.size < 2:
        return lon, lat
    jumps = np.flatnonzero(np.abs(np.diff(lon)) > math.pi) + 1
    return np.insert(lon, jumps, np.nan), np.insert(lat, jumps, np.nan)


def plot_pose_posterior(
    result: Any, nside: int, path: str | Path, *, range_nats: float = 30.0
) -> None:
    """A particle's view posterior (:class:`~cryospin.evaluate.posterior.ParticlePosterior`)
    on an equal-area (Mollweide) map, HEALPix pixels drawn exactly.

    Colour: ``log p − max log p`` (nats), clipped at ``−range_nats``. Overlays: each head's
    candidate at the last auto-encoding epoch (numbered; the best head, by loss, ringed), the
    particle's path through the auto-decoding epochs, and its final pose (star).
    """
    from cryospin.evaluate.posterior import healpix_ang2pix

    plt = pyplot()
    logp = np.asarray(result.log_posterior, dtype=np.float64)
    rel = np.maximum(logp - logp.max(), -float(range_nats))
    lon_edges = np.linspace(-math.pi, math.pi, 481)  # 0.75° cells: HEALPix shapes drawn
    lat_edges = np.linspace(-math.pi / 2, math.pi / 2, 241)
    lon_c = 0.5 * (lon_edges[1:] + lon_edges[:-1])
    lat_c = 0.5 * (lat_edges[1:] + lat_edges[:-1])
    pix = healpix_ang2pix(nside, (math.pi / 2 - lat_c)[:, None], lon_c[None, :])  # (240, 480)
    fig = plt.figure(figsize=(8.0, 4.8), dpi=110)
    ax = fig.add_subplot(111, projection="mollweide")
    mesh = ax.pcolormesh(lon_edges, lat_edges, rel[pix], cmap="magma", shading="flat",
                         vmin=-float(range_nats), vmax=0.0, rasterized=True)
    fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.08,
                 label="log posterior − max (nats), in-plane angle marginalised")
    if result.head_rotations is not None:
        lon, lat = _mollweide_xy(np.asarray(result.head_rotations)[:, 2, :])
        best = int(np.nanargmin(result.head_losses)) if result.head_losses is not None else -1
        ax.scatter(lon, lat, s=40, marker="o", facecolors="none", edgecolors="cyan",
                   linewidths=1.5, label=f"heads (epoch {result.head_epoch})", zorder=3)
        for h, (x, y) in enumerate(zip(lon, lat, strict=True)):
            ax.annotate(str(h + 1), (x, y), xytext=(5, 3), textcoords="offset points",
                        color="cyan", fontsize=9, fontweight="bold")
        if best >= 0:
            ax.scatter(lon[best], lat[best], s=110, marker="o", facecolors="none",
                       edgecolors="cyan", linewidths=1.6, label="best head", zorder=3)
    if result.path_rotations is not None and len(result.path_rotations):
        lon, lat = _mollweide_xy(np.asarray(result.path_rotations)[:, 2, :])
        px, py = _break_wraps(lon, lat)
        ax.plot(px, py, "-", color="lime", linewidth=1.6, zorder=3)
        epochs = result.path_epochs
        label = "auto-decoding path" + (f" (epochs {int(epochs[0])}–{int(epochs[-1])})"
                                        if epochs is not None and len(epochs) else "")
        ax.scatter(lon, lat, s=16, color="lime", edgecolors="black", linewidths=0.4,
                   zorder=3, label=label)
    if result.final_rotation is not None:
        lon, lat = _mollweide_xy(np.asarray(result.final_rotation)[2, :][None])
        ax.scatter(lon, lat, s=160, marker="*", color="white", edgecolors="black",
                   linewidths=0.8, zorder=4, label="final pose")
    ax.grid(alpha=0.3, color="0.7")
    ax.tick_params(labelsize=7, colors="0.3")
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.05, -0.05), framealpha=0.8)
    ax.set_title(f"particle {result.particle}: posterior over view directions R[2, :] "
                 f"(HEALPix nside {nside}, {logp.size} pixels)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1000px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 0.25em 0.8em; text-align: left;
        border-bottom: 1px solid #eee; vertical-align: top; }
th { font-weight: 600; color: #444; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6em 1em; }
"""


def build_html(
    *,
    title: str,
    summary: Sequence[tuple[str, str]],
    figures: Sequence[tuple[str, str, str]],
    notes: Sequence[str] = (),
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]]]] = (),
    config_text: str | None = None,
) -> str:
    """A self-contained HTML page (inline CSS, no scripts, no network).

    Parameters
    ----------
    title : str
        Plain text (escaped).
    summary : sequence of (name, value)
        Rows of the summary table; plain text (escaped).
    figures : sequence of (title, src, caption)
        ``src`` is a relative URL of a PNG (already URL-quoted); title and caption plain text.
    notes : sequence of str
        Paragraphs of trusted HTML (e.g. :data:`HAND_NOTE`).
    tables : sequence of (title, header, rows)
        Further tables after the figures; plain text cells (escaped).
    config_text : str, optional
        ``config.yaml`` shown verbatim.
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Summary</h2>",
        "<table>",
    ]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary]
    parts.append("</table>")
    for note in notes:
        parts.append(f'<p class="note">{note}</p>')
    for fig_title, src, caption in figures:
        parts += [
            f"<h2>{esc(fig_title)}</h2>",
            "<figure>",
            f'<img src="{esc(src, quote=True)}" alt="{esc(fig_title, quote=True)}">',
            f"<figcaption>{esc(caption)}</figcaption>",
            "</figure>",
        ]
    for table_title, header, rows in tables:
        parts += [f"<h2>{esc(table_title)}</h2>", "<table>",
                  "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    if config_text is not None:
        parts += ["<h2>Configuration (config.yaml)</h2>", f"<pre>{esc(config_text)}</pre>"]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- orchestration
@dataclass(frozen=True)
class ReportResult:
    """Outcome of :func:`write_report`.

    Attributes
    ----------
    html_path : Path
    figure_paths : list of Path
        PNGs written (in page order).
    summary : dict
        Numbers of the summary table (JSON-ready), also written as ``<figures>/summary.json``.
    """

    html_path: Path
    figure_paths: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


def read_volume(path: Path) -> tuple[np.ndarray, float]:
    """A cubic map `(L, L, L)` float64 ``[z, y, x]`` and its voxel size (Å; 0 if unknown)."""
    from cryospin.io.mrc import read_map

    vol, apix = read_map(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"expected a cubic map, got shape {vol.shape}", path)
    return np.array(vol, dtype=np.float64), float(apix)


def ground_truth_on_grid(gt_path: Path, box_px: int, pixel_size_angstrom: float) -> np.ndarray:
    """The ground-truth map on the run's grid: same box, or Fourier-resampled when only the
    sampling differs (same physical box size within 1 %)."""
    import torch

    from cryospin.forward.resample import fourier_crop_3d, fourier_pad_3d

    gt, apix = read_volume(gt_path)
    L_gt = gt.shape[0]
    if L_gt == box_px:
        if apix > 0 and pixel_size_angstrom > 0 and abs(apix - pixel_size_angstrom) > (
                0.01 * pixel_size_angstrom):
            raise InputError(f"voxel size {apix:g} Å differs from the run's "
                             f"{pixel_size_angstrom:g} Å", gt_path)
        return gt
    if apix > 0 and pixel_size_angstrom > 0 and abs(L_gt * apix - box_px * pixel_size_angstrom) <= (
            0.01 * box_px * pixel_size_angstrom):
        t = torch.from_numpy(gt)
        t = fourier_crop_3d(t, box_px) if L_gt > box_px else fourier_pad_3d(t, box_px)
        return t.numpy()
    raise InputError(f"box {L_gt} px at {apix:g} Å/px does not match the run's {box_px} px at "
                     f"{pixel_size_angstrom:g} Å/px", gt_path)


def read_poses(path: Path, box_px: int) -> tuple[Any, Any]:
    """Rotations `(N, 3, 3)` and shifts `(N, 2)` from a .star/.cs (metadata only) or a pose.pkl."""
    if path.suffix.lower() == ".pkl":
        from cryospin.io.pkl import read_cryodrgn_poses

        return read_cryodrgn_poses(path, box_px)
    from cryospin.io.particles import load_particles

    ps = load_particles(path, metadata_only=True, no_ctf=True, check_finite=False,
                        box_px=box_px)
    if ps.rotations is None:
        raise InputError("no poses (rlnAngleRot/Tilt/Psi) in the file", path)
    return ps.rotations, ps.shifts_px


def _read_track(run_dir: Path, num_particles: int) -> Any:
    """The run's pose track when it exists, holds an epoch and fits ``num_particles``."""
    from cryospin.train.track import TRACK_FILE, load_pose_track

    if not (run_dir / TRACK_FILE).is_file():
        return None
    track = load_pose_track(run_dir)
    if not track.epochs.size or not track.indices.size:
        return None
    if int(track.indices.max()) >= num_particles:
        raise InputError(f"tracks particle {int(track.indices.max())} but the ground truth "
                         f"has {num_particles} poses", run_dir / TRACK_FILE)
    return track


def gt_in_run_frame(gt_rotations: Any, result: Any) -> Any:
    """Ground-truth rotations expressed in the run's frame, `(N, 3, 3)` float64 tensor.

    :func:`~cryospin.evaluate.pose_error.pose_error` finds ``R_pred ≈ H(R_gt) · A`` (``H`` the
    hand flip ``D·D`` when ``result.flipped``, ``A = result.alignment``); this returns
    ``H(R_gt) · A``, directly comparable with the run's poses.
    """
    import torch

    from cryospin.evaluate.pose_error import flip_hand

    gt = torch.as_tensor(np.asarray(gt_rotations.detach().cpu() if hasattr(gt_rotations, "detach")
                                    else gt_rotations), dtype=torch.float64)
    if result.flipped:
        gt = flip_hand(gt)
    return gt @ torch.as_tensor(np.asarray(result.alignment), dtype=torch.float64)


def format_resolution(r: float) -> str:
    """``"12.34 Å"``, or ``"–"`` for an infinite (never crossed) resolution."""
    return f"{r:.2f} Å" if math.isfinite(r) else "–"


def format_duration(s: float) -> str:
    """Seconds as ``"12.3 s"``, ``"4.5 min"`` or ``"1.25 h"``."""
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _align_resolution(gt: np.ndarray, volume: np.ndarray, apix: float | None, *,
                      search_hand: bool, n_rotations: int) -> tuple[Any, Any]:
    """``volume`` aligned to ``gt`` (both `(L, L, L)`, voxel ``apix`` Å): (FSCResult,
    AlignResult)."""
    import torch

    from cryospin.evaluate.align import align_maps
    from cryospin.evaluate.fsc import fsc

    g = torch.from_numpy(gt)
    aligned = align_maps(g, torch.from_numpy(volume), search_hand=search_hand,
                         n_rotations=n_rotations)
    return fsc(g, aligned.aligned, pixel_size_angstrom=apix), aligned


def _epoch_resolutions(
    run: RunData, gt: np.ndarray, final_fsc: Any, final_alignment: Any, elapsed: np.ndarray, *,
    max_epoch_fsc: int, search_hand: bool,
) -> list[EpochResolution]:
    """Resolution against ``gt`` of at most ``max_epoch_fsc`` epochs (the final map counts)."""
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
        volume, _ = read_volume(run.epoch_maps[e])
        if volume.shape != gt.shape:
            continue
        res, al = _align_resolution(gt, volume, apix, search_hand=search_hand, n_rotations=1000)
        resolutions.append(EpochResolution(
            epoch=e, elapsed_s=by_epoch[e], resolution_05_angstrom=res.resolution(0.5),
            resolution_0143_angstrom=res.resolution(0.143), flipped=bool(al.flipped),
            correlation=al.correlation,
        ))
    if final_is_last:
        resolutions.append(EpochResolution(
            epoch=last, elapsed_s=float(elapsed[-1]),
            resolution_05_angstrom=final_fsc.resolution(0.5),
            resolution_0143_angstrom=final_fsc.resolution(0.143),
            flipped=bool(final_alignment.flipped), correlation=final_alignment.correlation,
        ))
    return resolutions


class FigureSet:
    """The figures of one page: PNGs in the folder named after the HTML file, in page order.

    Attributes
    ----------
    dir : Path
        ``<html folder>/<html stem>/``.
    figures : list of (title, src, caption)
        For :func:`build_html`; ``src`` relative to the page, URL-quoted.
    paths : list of Path
        The PNGs, in page order.
    """

    def __init__(self, html_path: Path) -> None:
        self.html_path = html_path
        self.dir = html_path.parent / html_path.stem
        self.figures: list[tuple[str, str, str]] = []
        self.paths: list[Path] = []

    def create(self) -> None:
        """Create :attr:`dir` (OutputError naming it when that fails)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create folder ({exc.strerror})", self.dir) from None

    def link(self, target: Path) -> str:
        """URL-quoted path of ``target`` relative to the page."""
        return urllib.parse.quote(
            Path(os.path.relpath(target, self.html_path.parent)).as_posix())

    def add(self, name: str, title: str, caption: str) -> Path:
        """Register figure ``name`` (a file in :attr:`dir`); returns the path to write."""
        p = self.dir / name
        self.paths.append(p)
        self.figures.append((title, self.link(p), caption))
        return p


#: Note on a page whose map matched the ground truth's mirror image.
MIRROR_NOTE = ("The map matches the <b>mirror image</b> of the ground truth: the hand is "
               "inverted. Use <code>cryospin flip-hand</code> as described below.")


def read_gt_poses(gt_poses: str | Path, rotations: Any, box_px: int | None,
                  run_dir: Path) -> tuple[Any, Any]:
    """Ground-truth rotations `(N, 3, 3)` and shifts `(N, 2)`, checked against the run's
    ``rotations`` (None: the run has no final poses, an InputError naming ``run_dir``)."""
    if rotations is None or box_px is None:
        raise InputError("the run has no final poses (poses.star) to compare", run_dir)
    gt_R, gt_t = read_poses(Path(gt_poses), box_px)
    if gt_R.shape[0] != rotations.shape[0]:
        raise InputError(f"{gt_R.shape[0]} poses but the run has {rotations.shape[0]} "
                         "particles", gt_poses)
    return gt_R, gt_t


def compare_map_with_gt(gt: np.ndarray, volume: np.ndarray, apix: float | None, *,
                        search_hand: bool) -> tuple[Any, Any, dict[str, Any]]:
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


def compare_poses_with_gt(rotations: Any, shifts: Any, gt_R: Any, gt_t: Any, *,
                          search_hand: bool) -> tuple[Any, dict[str, Any]]:
    """Pose error of the run's poses against the ground truth: (PoseErrorResult, summary
    fields ``median_rotation_error_deg``, ``mean_rotation_error_deg``,
    ``fraction_rotation_error_below_10_deg``, ``poses_flipped_vs_gt``)."""
    from cryospin.evaluate.pose_error import pose_error

    result = pose_error(rotations, gt_R, shifts, gt_t, allow_flip=search_hand)
    err = result.rotation_error_deg
    return result, {
        "median_rotation_error_deg": float(np.median(err)),
        "mean_rotation_error_deg": float(np.mean(err)),
        "fraction_rotation_error_below_10_deg": float(np.mean(err < 10)),
        "poses_flipped_vs_gt": bool(result.flipped),
    }


def add_gt_figures(figs: FigureSet, *, map_path: Path, gt_map: str | Path | None,
                   final_fsc: Any, gt_rotations: Any, pose_result: Any) -> None:
    """The ground-truth figures (those whose inputs are not None): FSC of ``map_path`` against
    ``gt_map`` (and its ``fsc.json``), the ground-truth orientations in the run's frame and the
    pose-error histogram."""
    if final_fsc is not None:
        from cryospin.evaluate.fsc import write_fsc_json
        from cryospin.plotting import plot_fsc

        plot_fsc([(f"{map_path.name} vs {Path(gt_map).name}", final_fsc)],
                 figs.add("fsc.png", "FSC against the ground truth",
                          f"Fourier shell correlation of {map_path.name}, aligned (rotation, "
                          "shift, hand) to the ground truth, with the 0.5 and 0.143 "
                          "thresholds."),
                 title="map vs ground truth (aligned)")
        write_fsc_json(final_fsc, figs.dir / "fsc.json", map=str(map_path), gt_map=str(gt_map))
    if pose_result is not None:
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


def gt_summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary-table rows of the ground-truth comparisons present in ``s``."""
    rows: list[tuple[str, str]] = []
    if "resolution_05_angstrom" in s:
        rows.append(("resolution vs ground truth",
                     f"{format_resolution(s['resolution_05_angstrom'])} (FSC 0.5), "
                     f"{format_resolution(s['resolution_0143_angstrom'])} (FSC 0.143)"))
        rows.append(("hand vs ground truth",
                     "mirrored" if s["hand_flipped_vs_gt"] else "same"))
    if "median_rotation_error_deg" in s:
        rows.append(("rotation error vs ground truth",
                     f"median {s['median_rotation_error_deg']:.2f}°, mean "
                     f"{s['mean_rotation_error_deg']:.2f}°, "
                     f"{100 * s['fraction_rotation_error_below_10_deg']:.1f} % below 10°"))
    return rows


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
    # 1. read and check every input before writing anything
    run = load_run(run_dir)
    html_path = Path(output) if output is not None else run.run_dir / "report.html"
    metrics = run.metrics
    volume = apix = None
    if run.map_path is not None:
        volume, apix = read_volume(run.map_path)
    box = None if volume is None else int(volume.shape[0])
    gt = None
    if gt_map is not None:
        if volume is None:
            raise InputError("the run has no map to compare with the ground truth", run.run_dir)
        gt = ground_truth_on_grid(Path(gt_map), box, apix or 0.0)
    rotations = shifts = None
    if run.poses_path is not None and box is not None:
        rotations, shifts = read_poses(run.poses_path, box)
    gt_R = gt_t = None
    if gt_poses is not None:
        gt_R, gt_t = read_gt_poses(gt_poses, rotations, box, run.run_dir)

    # 2. numbers
    k_switch = switch_epoch(metrics)
    elapsed = elapsed_seconds(metrics) if metrics else np.zeros(0)
    summary: dict[str, Any] = {"run_dir": str(run.run_dir), "finished": run.finished}
    if metrics:
        from cryospin.train.metrics import search_stopped_after

        summary.update(
            particles=int(metrics[0].get("num_images") or 0) or None,
            epochs_completed=int(metrics[-1]["epoch"]),
            search_stopped_after=search_stopped_after(metrics),
            switch_epoch=k_switch,
            final_loss=metrics[-1].get("loss"),
            final_stage=metrics[-1].get("stage"),
            wall_time_s=float(elapsed[-1]),
        )
        stage1_heads = _stage1_head_rows(metrics)
        if stage1_heads:
            summary["stage1_heads"] = stage1_heads
    if rotations is not None and not summary.get("particles"):
        summary["particles"] = int(rotations.shape[0])
    summary.update(box_px=box, pixel_size_angstrom=apix)
    notes: list[str] = []
    resolutions: list[EpochResolution] = []
    final_fsc = None
    if gt is not None:  # FSC of the final map (full search), then of a few epoch maps
        final_fsc, aligned, fields = compare_map_with_gt(gt, volume, apix,
                                                         search_hand=search_hand)
        summary.update(fields)
        resolutions = _epoch_resolutions(run, gt, final_fsc, aligned, elapsed,
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
    if gt_R is not None:
        track = _read_track(run.run_dir, gt_R.shape[0])
    if track is not None:
        track_err = track_errors(track, gt_R, allow_flip=search_hand)
        summary["tracked_rotation_error"] = track_error_rows(track_err)
        if track_err.stage1.any():
            track_heads = head_errors(track, gt_R, track_err)
    if gt_R is not None:
        pose_result, fields = compare_poses_with_gt(rotations, shifts, gt_R, gt_t,
                                                    search_hand=search_hand)
        summary.update(fields)

    # 3. figures, then the page
    figs = FigureSet(html_path)
    figs.create()
    add = figs.add

    if metrics:
        plot_training(metrics, add("training.png", "Training",
                                   "Loss against cumulative wall time"
                                   + (", resolution against the ground truth (each epoch map "
                                      "aligned to it)" if resolutions else "")
                                   + "; the dashed line marks the switch from auto-encoding "
                                     "to auto-decoding."),
                      resolutions=resolutions)
        has_spread = bool(head_spread_table(metrics)[0])
        if head_usage_table(metrics)[0] or has_spread:
            plot_head_usage(metrics, add(
                "head_usage.png", "Encoder heads (stage 1)",
                "Fraction of images whose best pose came from each head, per stage-1 epoch "
                "and at the switch"
                + ("; below, each head's output spread across images: the median angle "
                   "between the rotations the head gives different images (0° = the head "
                   "gives one rotation for every image, ≈ 132° = rotations as different as "
                   "uniformly random ones)." if has_spread else ".")))
    if rotations is not None:
        plot_orientations(rotations, add("orientations.png", "Orientation distribution",
                                         "View directions (third row of each R, the projection "
                                         "direction in the map frame) of the final poses, "
                                         "binned in equal-area cells on a Mollweide "
                                         "projection."))
    if volume is not None:
        plot_map_views(volume, add("map_views.png", "Map",
                                   f"Central sections and projections of {run.map_path.name}."),
                       pixel_size_angstrom=apix)
    if run.map_path is not None:
        add_gt_figures(figs, map_path=run.map_path, gt_map=gt_map, final_fsc=final_fsc,
                       gt_rotations=gt_R, pose_result=pose_result)
    if track_err is not None:
        plot_track_errors(track_err, add(
            "rotation_error_epochs.png", "Rotation error against epoch",
            f"Median and mean rotation error of the {track.indices.size} tracked particles "
            "(pose_track.npz) at the end of each epoch (stage 1: the winning head, lowest "
            "loss; stage 2: pose table), each epoch aligned to the ground truth on its own "
            "(global rotation and hand); the medians of the view-direction error (angle "
            "between projection directions) and of the in-plane error (rotation about the "
            "view axis); in stage 1 the median best-of-heads error (per particle the head "
            "closest to the ground truth, under the same alignment: what a perfect choice "
            "of head would give). The dashed line marks the switch."))
    if track_heads is not None:
        head_epoch, head_err = track_heads
        gt_dirs = view_directions(np.asarray(gt_R.detach().cpu() if hasattr(gt_R, "detach")
                                             else gt_R)[track.indices])
        plot_head_errors(gt_dirs, head_err, add(
            "head_errors.png", "Per-head rotation error over the sphere",
            f"For the last auto-encoding epoch ({head_epoch}), each head's rotation error "
            "(after that epoch's alignment) plotted at the ground-truth view direction of "
            "each tracked particle, on equal-area (Mollweide) maps."), epoch=head_epoch)
    notes.append(HAND_NOTE)
    if not run.finished:
        notes.insert(0, "This run has not finished: the report shows the last completed epoch.")
    title = f"cryospin run report: {run.run_dir.resolve().name}"
    page = build_html(title=title, summary=_summary_rows(summary, run), figures=figs.figures,
                      notes=notes, tables=[_epoch_table(metrics, elapsed, resolutions)],
                      config_text=run.config_text)
    atomic_write_text(figs.dir / "summary.json",
                      json.dumps(json_ready(summary), indent=2) + "\n")
    atomic_write_text(html_path, page)
    return ReportResult(html_path=html_path, figure_paths=figs.paths, summary=summary)


def _epoch_table(
    metrics: Sequence[dict[str, Any]], elapsed: np.ndarray,
    resolutions: Sequence[EpochResolution],
) -> tuple[str, list[str], list[list[str]]]:
    """The per-epoch table: epoch, stage, loss, times, throughput, pose change, resolution."""
    res = {r.epoch: r for r in resolutions}

    def num(x: Any, fmt: str) -> str:
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt % x

    header = ["epoch", "stage", "loss", "epoch time", "elapsed", "images/s",
              "mean pose change", "resolution vs GT (0.5 / 0.143)"]
    rows = []
    for r, t in zip(metrics, elapsed, strict=True):
        e = int(r["epoch"])
        rr = res.get(e)
        rows.append([
            str(e), str(r.get("stage", "")), num(r.get("loss"), "%.6g"),
            format_duration(float(r.get("wall_time_s") or 0.0)), format_duration(float(t)),
            num(r.get("images_per_s"), "%.1f"), num(r.get("mean_pose_change_deg"), "%.2f°"),
            "–" if rr is None else f"{format_resolution(rr.resolution_05_angstrom)} / "
                                   f"{format_resolution(rr.resolution_0143_angstrom)}",
        ])
    return "Epochs", header, rows


def _stage1_head_rows(metrics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows of the stage-1 epochs: ``epoch``, ``head_usage``, ``head_spread_deg`` (each
    a per-head list, or None when the metrics line lacks it)."""
    rows = []
    for r in metrics:
        if r.get("stage") == _STAGE1 and (r.get("head_usage") or r.get("head_spread_deg")):
            spread = r.get("head_spread_deg")
            rows.append({
                "epoch": int(r["epoch"]),
                "head_usage": [float(u) for u in r["head_usage"]] if r.get("head_usage")
                else None,
                "head_spread_deg": None if not spread else
                [None if v is None else float(v) for v in spread],
            })
    return rows


def _finite_or_none(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def json_ready(x: Any) -> Any:
    """``x`` (nested dicts and lists) with non-finite floats replaced by None, for JSON."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_ready(v) for v in x]
    return _finite_or_none(x)


def _summary_rows(s: dict[str, Any], run: RunData) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("run folder", str(run.run_dir))]
    version = run.config.get("cryospin_version")
    if version:
        rows.append(("cryospin version", str(version)))
    if s.get("particles"):
        rows.append(("particles", f"{s['particles']:,}"))
    if s.get("box_px"):
        rows.append(("box", f"{s['box_px']} px"))
    if s.get("pixel_size_angstrom"):
        rows.append(("pixel size", f"{s['pixel_size_angstrom']:.4g} Å"))
    if "epochs_completed" in s:
        planned = (run.config.get("schedule") or {}).get("epochs")
        stopped = s.get("search_stopped_after")
        if stopped is not None:  # a shorter run by design, not an unfinished one
            rows.append(("epochs", f"{s['epochs_completed']} (of up to {planned}: the global "
                                   f"search stopped early after epoch {stopped})"))
        else:
            rows.append(("epochs", f"{s['epochs_completed']}" + (
                f" of {planned}" if planned and planned != s["epochs_completed"] else "")))
        k = s.get("switch_epoch")
        rows.append(("switch", "never (auto-encoding only)" if k is None else
                     f"after epoch {k - 1}; first auto-decoding epoch {k}"))
        loss = s.get("final_loss")
        rows.append(("final loss", "–" if loss is None else f"{loss:.6g} ({s.get('final_stage')})"))
        rows.append(("wall time", format_duration(s["wall_time_s"])))
    rows += _stage1_summary_rows(s)
    rows += gt_summary_rows(s)
    rows += _tracked_summary_rows(s)
    if not run.finished:
        rows.append(("status", "unfinished"))
    return rows


def _stage1_summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The head spread of the last stage-1 epoch that has one."""
    with_spread = [r for r in s.get("stage1_heads") or () if r.get("head_spread_deg")]
    if not with_spread:
        return []
    last = with_spread[-1]
    values = ", ".join("–" if v is None or not math.isfinite(v) else
                       f"{v:.1f}°" if v < 9.95 else f"{v:.0f}°"
                       for v in last["head_spread_deg"])
    return [(f"head spread across images (epoch {last['epoch']})",
             f"{values} (0° = one rotation for every image, ≈ {RANDOM_SPREAD_DEG:.0f}° = "
             "random)")]


def _tracked_summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The tracked particles' errors at the last stage-1 epoch (the switch's poses)."""
    stage1 = [r for r in s.get("tracked_rotation_error") or ()
              if r.get("stage") == _STAGE1]
    if not stage1:
        return []
    r = stage1[-1]
    best = r.get("best_head_median_deg")
    return [(f"tracked particles, last auto-encoding epoch ({r['epoch']})",
             f"median error: winning head {r['median_deg']:.1f}°, best of heads "
             + ("–" if best is None else f"{best:.1f}°")
             + f"; view direction {r['view_median_deg']:.1f}°, in-plane "
               f"{r['in_plane_median_deg']:.1f}°")]
