"""The report's symmetry numbers: the point group a run imposed (``config.model.symmetry``),
the groups detected on its map (ranked and scored by
:func:`cryospin.symmetry_search.detect_symmetry`), the advice when they differ, and
where the symmetry axes meet the map's central sections.

Numbers only (nothing is drawn or written). Detection never stops a report: a failure, or a
box above ``max_box_px``, is kept as :attr:`SymmetryCheck.problem` for the page to state.

Conventions (``docs/conventions.md``, "Symmetry" and "Symmetry detection"): volumes
`(L, L, L)` indexed ``[z, y, x]``, voxel ``[z, y, x]`` at ``r = (x, y, z) − L//2`` pixels; an
imposed group is in RELION's orientation about the box centre (:mod:`cryospin.symmetry`); a
detected group ``G`` sits in the frame ``M`` about the centre ``c`` (the map is symmetric
under ``M g Mᵀ`` about ``c``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin.point_group import parse_point_group
from cryospin.report.summary import SymmetrySummary
from cryospin.symmetry import point_group_rotations, symmetry_axes
from cryospin.symmetry_search import SymmetrySearch, detect_symmetry

__all__ = [
    "DEFAULT_MAX_BOX_PX",
    "SECTIONS",
    "AxisMark",
    "DrawnAxes",
    "SymmetryCheck",
    "imposed_symmetry",
    "relaxed_symmetry",
    "check_symmetry",
    "symmetry_advice",
    "symmetry_summary",
    "axes_to_draw",
    "section_marks",
]

#: Largest box (px) detection runs on; larger maps are skipped (the page says so). Detection
#: Fourier-crops the whole map to 32 px (one FFT of the map), then searches there: on one CPU
#: thread 2–3 s for a 64 or 128 px map of blobs, ~10 s for 64 px of noise, ~13 s for 256 px.
DEFAULT_MAX_BOX_PX = 512

#: The central sections of :func:`cryospin.report.figures.plot_map_views`, by normal: (normal,
#: xyz index of the normal, xyz index of the image's column axis, of its row axis).
SECTIONS: tuple[tuple[str, int, int, int], ...] = (("z", 2, 0, 1), ("y", 1, 0, 2),
                                                   ("x", 0, 1, 2))


@dataclass(frozen=True)
class SymmetryCheck:
    """The imposed group and the detected ranking of one map.

    Attributes
    ----------
    imposed : str
        The run's group, canonical (``"C1"``: none imposed).
    search : SymmetrySearch or None
        The ranking (best first), None when detection did not run or failed.
    seconds : float
        Wall time of the detection (0 when it did not run).
    problem : str or None
        Why there is no ranking (a sentence for the page).
    relaxed : str
        The pseudo-symmetry the run relaxed (``config.model.relax_symmetry``, canonical;
        ``"C1"``: none).
    """

    imposed: str
    search: SymmetrySearch | None
    seconds: float
    problem: str | None
    relaxed: str = "C1"

    @property
    def detected(self) -> str | None:
        """The chosen group's symbol, or None without a ranking."""
        return None if self.search is None else self.search.chosen.group


@dataclass(frozen=True)
class DrawnAxes:
    """The axes drawn on the map: which group, whether imposed or detected, where.

    Attributes
    ----------
    group : str
    source : str
        ``"imposed"`` or ``"detected"``.
    axes : `(K, 3)` float64
        Unit xyz directions in the map's frame.
    orders : `(K,)` int64
    centre_px : `(3,)` float64
        The point the axes pass through, xyz pixels from ``L//2``.
    """

    group: str
    source: str
    axes: Tensor
    orders: Tensor
    centre_px: Tensor


@dataclass(frozen=True)
class AxisMark:
    """One axis on one central section: a line (the axis lies within the tolerance of the
    section's plane) or a point (where it pierces the plane).

    Attributes
    ----------
    section : str
        The section's normal, ``"z"``, ``"y"`` or ``"x"`` (:data:`SECTIONS`).
    kind : str
        ``"line"`` or ``"point"``.
    order : int
    points : tuple of (column, row)
        Image coordinates (voxel indices, ``origin="lower"``): two ends of a line, one point.
    """

    section: str
    kind: str
    order: int
    points: tuple[tuple[float, float], ...]


def imposed_symmetry(config: Mapping[str, object],
                     metrics: Sequence[Mapping[str, object]] = ()) -> str:
    """The canonical symbol of the group the run imposed: the last impose-symmetry step's
    (``extra["symmetry"]`` of ``metrics.jsonl``, :mod:`cryospin.train.impose`), else
    ``config.model.symmetry`` (``"C1"`` when absent, as in runs from before the field existed,
    and for ``auto`` before its step)."""
    for row in reversed(metrics):
        extra = row.get("extra")
        step = extra.get("symmetry") if isinstance(extra, Mapping) else None
        if isinstance(step, Mapping):
            return parse_point_group(str(step.get("group", "C1"))).symbol
    model = config.get("model")
    symbol = str((model.get("symmetry") if isinstance(model, Mapping) else None) or "C1")
    return "C1" if symbol.lower() == "auto" else parse_point_group(symbol).symbol


def relaxed_symmetry(config: Mapping[str, object],
                     metrics: Sequence[Mapping[str, object]] = ()) -> str:
    """The canonical symbol of the pseudo-symmetry the run relaxed: the last stage-2 epoch's
    that relaxed one (``extra["relax"]`` of ``metrics.jsonl``, :mod:`cryospin.train.relax`;
    with ``auto`` the group each epoch's map showed), else ``config.model.relax_symmetry``
    (``"C1"`` when absent, as in runs from before it existed, and for ``auto`` without a
    group found)."""
    for row in reversed(metrics):
        extra = row.get("extra")
        relax = extra.get("relax") if isinstance(extra, Mapping) else None
        if isinstance(relax, Mapping) and str(relax.get("group", "C1")).upper() != "C1":
            return parse_point_group(str(relax["group"])).symbol
    model = config.get("model")
    symbol = str((model.get("relax_symmetry") if isinstance(model, Mapping) else None) or "C1")
    return "C1" if symbol.lower() == "auto" else parse_point_group(symbol).symbol


def check_symmetry(volume: np.ndarray, imposed: str, *, relaxed: str = "C1",
                   max_box_px: int = DEFAULT_MAX_BOX_PX, max_order: int = 12) -> SymmetryCheck:
    """Detect the point group of ``volume`` `(L, L, L)` (float32, 32 px search box) and keep
    the run's ``imposed`` and ``relaxed`` groups beside it; failures and boxes above
    ``max_box_px`` become :attr:`SymmetryCheck.problem` instead of an error."""
    imposed, relaxed = parse_point_group(imposed).symbol, parse_point_group(relaxed).symbol
    L = int(volume.shape[-1])
    if L > max_box_px:
        return SymmetryCheck(imposed, None, 0.0,
                             f"symmetry detection skipped: the map's box ({L} px) is above "
                             f"{max_box_px} px (run cryospin symmetry on it)", relaxed)
    start = time.perf_counter()
    try:
        search = detect_symmetry(torch.from_numpy(np.ascontiguousarray(volume)).float(),
                                 max_order=max_order)
    except (RuntimeError, ValueError, ArithmeticError, AssertionError, MemoryError) as exc:
        return SymmetryCheck(imposed, None, time.perf_counter() - start,
                             f"symmetry detection failed ({exc.__class__.__name__}: {exc})",
                             relaxed)
    return SymmetryCheck(imposed, search, time.perf_counter() - start, None, relaxed)


def symmetry_advice(check: SymmetryCheck) -> str | None:
    """A sentence when the detected group differs from the imposed one, else None. A C1 run
    whose map looks ``G`` may be of a ``G``-symmetric particle or of a pseudo-symmetric one
    (an ab initio map of an exactly symmetric particle scores 0.91–0.98, the pseudo-C3
    spike's 0.82–0.93: benchmarks/RESULTS.md, "Point-group symmetry"), so both flags are
    named, unless the run relaxed ``G`` already."""
    detected = check.detected
    if detected is None or detected == check.imposed:
        return None
    if check.search is not None and check.search.chosen.order > parse_point_group(
            check.imposed).order:
        if check.imposed == "C1" and check.relaxed == detected:
            return (f"The map looks {detected}, the pseudo-symmetry the run relaxed "
                    f"(each pose's {detected} copies scored in stage 2; the map is kept C1).")
        if check.imposed == "C1":
            return (f"The map looks {detected} but the run imposed C1: consider --symmetry "
                    f"{detected} if its subunits are identical; if they differ (a "
                    f"pseudo-symmetric particle), keep C1, and a run without a global search "
                    f"needs --relax-symmetry {detected} to tell the copies apart.")
        return (f"The map looks {detected} but the run imposed {check.imposed}: consider "
                f"--symmetry {detected}.")
    return (f"The map's detected group ({detected}) is not the one the run imposed "
            f"({check.imposed}): check the imposed group.")


def symmetry_summary(check: SymmetryCheck, *, pose_errors_modulo: str | None
                     ) -> SymmetrySummary:
    """The summary's ``symmetry`` entry: every scored group, best first."""
    fits = () if check.search is None else check.search.fits
    return {
        "imposed": check.imposed,
        "detected": check.detected,
        "scores": [{"group": f.group, "order": f.order, "score": f.score} for f in fits],
        "detection_s": check.seconds,
        "problem": check.problem,
        "pose_errors_modulo": pose_errors_modulo,
    }


def axes_to_draw(check: SymmetryCheck) -> DrawnAxes | None:
    """The imposed group's axes (RELION's orientation, through the box centre) or, when the
    run imposed C1 and a larger group was detected, the detected group's axes in its found
    frame ``M`` through its centre ``c``; None when neither."""
    if check.imposed != "C1":
        axes, orders = symmetry_axes(point_group_rotations(check.imposed))
        return DrawnAxes(check.imposed, "imposed", axes, orders,
                         torch.zeros(3, dtype=torch.float64))
    if check.search is None or check.search.chosen.order <= 1:
        return None
    fit = check.search.chosen
    M = fit.frame.double()
    axes, orders = symmetry_axes(M @ point_group_rotations(fit.group) @ M.T)
    return DrawnAxes(fit.group, "detected", axes, orders, check.search.centre_px.double())


def _line_or_point(a: Tensor, c: Tensor, normal: int, col: int, row: int, half: int,
                   box_px: int, sin_tol: float) -> tuple[str, tuple[tuple[float, float], ...]]:
    """One axis ``c + s a`` on the plane ``r[normal] = 0``: ("line", two ends) when it lies
    within the tolerance of the plane, ("point", (p,)) where it pierces it inside the box,
    ("", ()) when it pierces outside."""
    if abs(float(a[normal])) <= sin_tol:
        d = torch.stack([a[col], a[row]])
        d = d / d.norm()
        p0 = torch.stack([c[col], c[row]]) + half
        ends = (p0 - 0.5 * box_px * d, p0 + 0.5 * box_px * d)
        return "line", tuple((float(e[0]), float(e[1])) for e in ends)
    p = c - float(c[normal]) / float(a[normal]) * a  # (3,) on the plane
    u, v = float(p[col]) + half, float(p[row]) + half
    if -0.5 <= u <= box_px - 0.5 and -0.5 <= v <= box_px - 0.5:
        return "point", ((u, v),)
    return "", ()


def section_marks(drawn: DrawnAxes, box_px: int, *, in_plane_deg: float = 10.0
                  ) -> list[AxisMark]:
    """Where each axis of ``drawn`` meets the central sections (:data:`SECTIONS`).

    An axis within ``in_plane_deg`` of a section's plane is a line through the in-plane
    position of the centre, across the box; any other axis is a point where it pierces the
    plane (when inside the box). Points of the same order closer than half a pixel are one.

    Returns
    -------
    list of AxisMark
        Sections in :data:`SECTIONS` order, each in the order of ``drawn.axes``.
    """
    sin_tol = float(np.sin(np.radians(in_plane_deg)))
    half = box_px // 2
    c = drawn.centre_px.double()
    marks: list[AxisMark] = []
    for name, normal, col, row in SECTIONS:
        for a, n in zip(drawn.axes.double(), drawn.orders.tolist(), strict=True):
            kind, pts = _line_or_point(a, c, normal, col, row, half, box_px, sin_tol)
            if not kind:
                continue
            if kind == "point" and any(
                    m.section == name and m.kind == "point" and m.order == n
                    and np.hypot(*np.subtract(m.points[0], pts[0])) < 0.5 for m in marks):
                continue
            marks.append(AxisMark(name, kind, int(n), pts))
    return marks
