"""The map figure of the report pages: central sections and projections of a map, with the
symmetry axes drawn on the sections (:func:`plot_map_views`; matplotlib, Agg backend, imported
only when drawn: :func:`cryospin.plotting.pyplot`).

Conventions (``docs/conventions.md``): volumes are `(L, L, L)` indexed ``[z, y, x]``; images are
drawn with ``origin="lower"``, so that a voxel index is a data coordinate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from cryospin.plotting import pyplot, save_figure
from cryospin.report.html import FigureSet
from cryospin.report.symmetry_check import AxisMark, DrawnAxes, section_marks

if TYPE_CHECKING:  # matplotlib is optional: its types only for the annotations
    from matplotlib.axes import Axes

__all__ = ["plot_map_views"]

_ORDER_COLOURS = {2: "tab:orange", 3: "tab:green", 4: "tab:purple", 5: "tab:red",
                  6: "tab:pink", 7: "tab:cyan"}


def _draw_axis_marks(ax: Axes, marks: Sequence[AxisMark], box_px: int) -> None:
    """Symmetry axes on one section: lines labelled at one end, circles labelled beside them
    (labels of circles at one spot stacked)."""
    placed: list[tuple[float, float]] = []
    for m in marks:
        colour = _ORDER_COLOURS.get(m.order, "yellow")
        if m.kind == "line":
            (u0, v0), (u1, v1) = m.points
            ax.plot([u0, u1], [v0, v1], color=colour, lw=1.0, alpha=0.85)
            lu, lv = u0 + 0.9 * (u1 - u0), v0 + 0.9 * (v1 - v0)
        else:
            (lu, lv), = m.points
            ax.plot([lu], [lv], marker="o", ms=7, mfc="none", mec=colour, mew=1.2)
            stack = sum(np.hypot(lu - a, lv - b) < 0.5 for a, b in placed)
            placed.append((lu, lv))
            lu, lv = lu + 0.04 * box_px, lv + 0.04 * box_px + 0.07 * box_px * stack
        ax.text(lu, lv, str(m.order), color=colour, fontsize=8, fontweight="bold")
    ax.set_xlim(-0.5, box_px - 0.5)
    ax.set_ylim(-0.5, box_px - 0.5)


def plot_map_views(
    volume: Tensor | np.ndarray, path: str | Path, *, pixel_size_angstrom: float | None = None,
    axis_marks: Sequence[AxisMark] = (), axes_title: str = "",
) -> list[AxisMark]:
    """Central sections (top) and projections (sums, bottom) of a map along z, y and x.

    Parameters
    ----------
    volume : `(L, L, L)` indexed ``[z, y, x]``
        Sections are the planes through voxel ``L//2``; images are drawn with the first
        in-plane axis up (``origin="lower"``).
    axis_marks : sequence of AxisMark
        Symmetry axes drawn on the sections
        (:func:`~cryospin.report.symmetry_check.section_marks`): lines and circles
        labelled with their order; ``axes_title`` goes under the title.

    Returns
    -------
    list of AxisMark
        The marks drawn (those of the sections ``z``, ``y``, ``x``).
    """
    vol = np.asarray(volume.detach().cpu() if isinstance(volume, Tensor) else volume,
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
    drawn = [m for m in axis_marks if m.section in ("z", "y", "x")]
    for col, normal in enumerate(("z", "y", "x")):
        if drawn:
            _draw_axis_marks(axes[0, col], [m for m in drawn if m.section == normal],
                             vol.shape[-1])
    size = f"{vol.shape[-1]} px"
    if pixel_size_angstrom:
        size += f" at {pixel_size_angstrom:g} Å/px"
    fig.suptitle(f"map {'×'.join(str(s) for s in vol.shape[::-1])} ({size})"
                 + (f"\n{axes_title}" if axes_title else ""), fontsize=10)
    fig.tight_layout(h_pad=1.5)
    save_figure(fig, path)
    return drawn


def add_map_views(figs: FigureSet, volume: Tensor | np.ndarray, *, title: str, what: str,
                  pixel_size_angstrom: float | None, drawn: DrawnAxes | None,
                  name: str = "map_views.png") -> None:
    """A page's map figure (``name``): :func:`plot_map_views` of ``volume``
    `(L, L, L)`, captioned "Central sections and projections of ``what``", with ``drawn``'s
    symmetry axes on the sections (none when None)."""
    caption = f"Central sections and projections of {what}" + (
        "." if drawn is None else
        f"; on the sections the {drawn.source} {drawn.group} symmetry axes (lines: axes in "
        "the plane, circles: axes piercing it), labelled with their order.")
    plot_map_views(volume, figs.add(name, title, caption),
                   pixel_size_angstrom=pixel_size_angstrom,
                   axis_marks=() if drawn is None else section_marks(
                       drawn, int(volume.shape[-1])),
                   axes_title="" if drawn is None else
                   f"{drawn.source} symmetry {drawn.group}: axes labelled by order")
