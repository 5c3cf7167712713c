"""Shared matplotlib figures and helpers: FSC curves and a particle's view posterior.

These plots are drawn by the layers below the report (the ``--halves`` workflow's gold-standard
FSC, ``cryospin fsc``, ``cryospin posterior``), so they live here rather than in
:mod:`cryospin.report.figures`, which holds the run report's own figures and imports these
helpers. This module sits below the workflows: it imports the FSC result and the HEALPix grid
only, and takes the posterior it draws through the :class:`ViewPosterior` protocol.

matplotlib is optional (``pip install cryospin[report]``) and imported only when a figure is
drawn (:func:`pyplot`), with the non-interactive Agg backend; every figure is written as one
PNG, atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cryospin.atomic import atomic_path
from cryospin.errors import CryospinError
from cryospin.evaluate.fsc import FSCResult
from cryospin.evaluate.sharpen import GuinierFit
from cryospin.healpix import healpix_ang2pix

if TYPE_CHECKING:  # matplotlib is optional: its types only for the annotations
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "pyplot",
    "save_figure",
    "mollweide_lon_lat",
    "plot_fsc",
    "ViewPosterior",
    "plot_pose_posterior",
]


class ViewPosterior(Protocol):
    """What :func:`plot_pose_posterior` draws (met by
    :class:`cryospin.posterior.ParticlePosterior`, which documents the fields)."""

    @property
    def particle(self) -> int: ...
    @property
    def log_posterior(self) -> np.ndarray: ...  # (12 nside²,) HEALPix RING order
    @property
    def final_rotation(self) -> np.ndarray | None: ...  # (3, 3)
    @property
    def head_rotations(self) -> np.ndarray | None: ...  # (M, 3, 3)
    @property
    def head_losses(self) -> np.ndarray | None: ...  # (M,)
    @property
    def head_epoch(self) -> int | None: ...
    @property
    def path_rotations(self) -> np.ndarray | None: ...  # (E2, 3, 3)
    @property
    def path_epochs(self) -> np.ndarray | None: ...  # (E2,)


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` with the Agg backend (CryospinError when matplotlib is missing)."""
    try:
        import matplotlib  # optional dependency: imported only when a figure is drawn
    except ImportError:
        raise CryospinError(
            "plotting needs matplotlib: pip install 'cryospin[report]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # optional dependency, as above

    return plt


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically, then close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def mollweide_lon_lat(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude ``atan2(y, x)`` and latitude ``asin z`` (radians) of unit vectors `(n, 3)`."""
    v = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return np.arctan2(v[:, 1], v[:, 0]), np.arcsin(np.clip(v[:, 2], -1.0, 1.0))


def plot_fsc(
    curves: FSCResult | Sequence[tuple[str, FSCResult]],
    path: str | Path,
    *,
    thresholds: Sequence[float] = (0.5, 0.143),
    title: str | None = None,
) -> None:
    """Write a PNG of one or more FSC curves with horizontal threshold lines.

    The x axis is spatial frequency in Å⁻¹ (cycles per pixel without a pixel size); each
    curve's legend gives its resolution at every threshold.
    """
    plt = pyplot()
    items = [("FSC", curves)] if isinstance(curves, FSCResult) else list(curves)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    unit = "Å"
    for label, res in items:
        freq = res.frequency_per_angstrom
        if freq is None:
            freq, unit = res.frequency_per_px, "px"
        parts = []
        for t in thresholds:
            r = res.resolution(t)
            parts.append(f"{t:g}: {r:.2f} {unit}" if r != float("inf") else f"{t:g}: –")
        ax.plot(freq, res.fsc, marker=".", label=f"{label} ({', '.join(parts)})")
    for t in thresholds:
        ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.text(ax.get_xlim()[0], t, f" {t:g}", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("spatial frequency (1/Å)" if unit == "Å" else "spatial frequency (1/px)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_guinier(q2_per_a2: np.ndarray, curves: Sequence[tuple[str, np.ndarray]],
                 fit: GuinierFit | None, path: str | Path) -> None:
    """Write a PNG of a Guinier plot: each curve's ``ln`` amplitude `(S,)` against ``q²`` `(S,)`
    (Å⁻²; values that are not finite or ≤ −99, RELION's ``ln 0``, left out), and the fitted
    line over its range, with the range's ends marked (``fit``; None: no line)."""
    plt = pyplot()
    q2 = np.asarray(q2_per_a2, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    for label, values in curves:
        y = np.asarray(values, dtype=np.float64)
        keep = np.isfinite(y) & (y > -99.0)
        ax.plot(q2[keep], y[keep], marker=".", markersize=4, label=label)
    if fit is not None:
        x = np.array([1.0 / fit.low_angstrom**2, 1.0 / fit.high_angstrom**2])
        ax.plot(x, fit.intercept + fit.slope_a2 * x, color="black", linestyle="--",
                linewidth=1.2, label=f"fit: B-factor {fit.bfactor_a2:.0f} Å² "
                                     f"({fit.low_angstrom:g}–{fit.high_angstrom:.2f} Å)")
        for edge in x:
            ax.axvline(edge, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("q² (1/Å²)")
    ax.set_ylabel("ln (mean amplitude of the shell)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_local_resolution(volume: np.ndarray, local_angstrom: np.ndarray, path: str | Path, *,
                          unit: str = "Å") -> None:
    """Write a PNG of a local-resolution map: the central sections of ``volume`` `(L, L, L)`
    (``[z, y, x]``, grey) with ``local_angstrom`` `(L, L, L)` (0: not estimated) coloured over
    them, blue the best and red the worst (colour range: its 2nd to 98th percentiles), and a
    histogram of its values."""
    plt = pyplot()
    vol = np.asarray(volume, dtype=np.float64)
    loc = np.asarray(local_angstrom, dtype=np.float64)
    inside = loc[loc > 0]
    lo, hi = ((float(np.percentile(inside, 2)), float(np.percentile(inside, 98)))
              if inside.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0
    cz, cy, cx = (s // 2 for s in vol.shape)
    cuts = [(vol[cz], loc[cz], "z", "y", "x"), (vol[:, cy, :], loc[:, cy, :], "y", "z", "x"),
            (vol[:, :, cx], loc[:, :, cx], "x", "z", "y")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), dpi=110,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
    image = None
    for ax, (grey, colour, normal, vert, horiz) in zip(axes[:3], cuts, strict=True):
        ax.imshow(grey, origin="lower", cmap="gray", interpolation="nearest")
        image = ax.imshow(np.ma.masked_where(colour <= 0, colour), origin="lower",
                          cmap="RdYlBu_r", vmin=lo, vmax=hi, alpha=0.75, interpolation="nearest")
        ax.set_title(f"section along {normal} ({normal} = 0)", fontsize=9)
        ax.set_xlabel(f"{horiz} →", fontsize=8)
        ax.set_ylabel(f"{vert} →", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=list(axes[:3]), shrink=0.8, label=f"local resolution ({unit})")
    hist = axes[3]
    if inside.size:
        hist.hist(inside, bins=40, color="tab:blue", alpha=0.8)
        hist.axvline(float(np.median(inside)), color="black", linestyle="--", linewidth=1,
                     label=f"median {float(np.median(inside)):.2f} {unit}")
        hist.legend(fontsize=8)
    hist.set_xlabel(f"local resolution ({unit})", fontsize=8)
    hist.set_ylabel("voxels within the mask", fontsize=8)
    hist.grid(alpha=0.3)
    save_figure(fig, path)


def _break_wraps(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert NaNs where a path crosses the ±180° meridian (no line across the map)."""
    if lon.size < 2:
        return lon, lat
    jumps = np.flatnonzero(np.abs(np.diff(lon)) > math.pi) + 1
    return np.insert(lon, jumps, np.nan), np.insert(lat, jumps, np.nan)


def _overlay_heads(ax: Axes, result: ViewPosterior) -> None:
    """Each head's candidate view (numbered) and the best head by loss (ringed)."""
    lon, lat = mollweide_lon_lat(np.asarray(result.head_rotations)[:, 2, :])
    best = int(np.nanargmin(result.head_losses)) if result.head_losses is not None else -1
    ax.scatter(lon, lat, s=40, marker="o", facecolors="none", edgecolors="cyan",
               linewidths=1.5, label=f"heads (epoch {result.head_epoch})", zorder=3)
    for h, (x, y) in enumerate(zip(lon, lat, strict=True)):
        ax.annotate(str(h + 1), (x, y), xytext=(5, 3), textcoords="offset points",
                    color="cyan", fontsize=9, fontweight="bold")
    if best >= 0:
        ax.scatter(lon[best], lat[best], s=110, marker="o", facecolors="none",
                   edgecolors="cyan", linewidths=1.6, label="best head", zorder=3)


def _overlay_path(ax: Axes, result: ViewPosterior) -> None:
    """The particle's view through the auto-decoding epochs, as a line with markers."""
    lon, lat = mollweide_lon_lat(np.asarray(result.path_rotations)[:, 2, :])
    px, py = _break_wraps(lon, lat)
    ax.plot(px, py, "-", color="lime", linewidth=1.6, zorder=3)
    epochs = result.path_epochs
    label = "auto-decoding path" + (f" (epochs {int(epochs[0])}–{int(epochs[-1])})"
                                    if epochs is not None and len(epochs) else "")
    ax.scatter(lon, lat, s=16, color="lime", edgecolors="black", linewidths=0.4,
               zorder=3, label=label)


def plot_pose_posterior(
    result: ViewPosterior, nside: int, path: str | Path, *, range_nats: float = 30.0
) -> None:
    """A particle's view posterior (:class:`~cryospin.posterior.ParticlePosterior`)
    on an equal-area (Mollweide) map, HEALPix pixels drawn exactly.

    Colour: ``log p − max log p`` (nats), clipped at ``−range_nats``. Overlays: each head's
    candidate at the last auto-encoding epoch (numbered; the best head, by loss, ringed), the
    particle's path through the auto-decoding epochs, and its final pose (star).
    """
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
        _overlay_heads(ax, result)
    if result.path_rotations is not None and len(result.path_rotations):
        _overlay_path(ax, result)
    if result.final_rotation is not None:
        lon, lat = mollweide_lon_lat(np.asarray(result.final_rotation)[2, :][None])
        ax.scatter(lon, lat, s=160, marker="*", color="white", edgecolors="black",
                   linewidths=0.8, zorder=4, label="final pose")
    ax.grid(alpha=0.3, color="0.7")
    ax.tick_params(labelsize=7, colors="0.3")
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.05, -0.05), framealpha=0.8)
    ax.set_title(f"particle {result.particle}: posterior over view directions R[2, :] "
                 f"(HEALPix nside {nside}, {logp.size} pixels)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
