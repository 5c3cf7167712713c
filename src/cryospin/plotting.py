"""Small matplotlib figures (FSC curves). matplotlib is optional (``pip install cryospin[report]``)
and imported only when a function here is called, with the non-interactive Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryospin.atomic import atomic_path
from cryospin.errors import CryospinError
from cryospin.evaluate.fsc import FSCResult

__all__ = ["plot_fsc"]


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CryospinError(
            "plotting needs matplotlib: pip install 'cryospin[report]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
