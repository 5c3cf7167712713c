"""A start of a ``--starts`` run in its own report: which start it is, the choice among the
starts (the starts folder's ``choice.json``, :mod:`cryospin.train.starts`) and every start's
loss against epoch, the chosen one drawn boldest."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryospin.errors import InputError
from cryospin.plotting import pyplot, save_figure
from cryospin.report.html import Section
from cryospin.rundir import METRICS, STARTS_CHOICE, STARTS_MARKER, read_metrics

__all__ = ["StartRow", "StartsContext", "read_starts_context", "starts_section",
           "plot_starts_losses"]


@dataclass(frozen=True)
class StartRow:
    """One start as ``choice.json`` records it, with its loss per epoch.

    Attributes
    ----------
    name : str
        Its folder's name (``start_2``).
    seed : int or None
    final_loss_nats : float
        The last epoch's mean loss, nats per image.
    above_lowest_nats : float
    chosen : bool
    correlation, resolution_angstrom : float or None
        Its map aligned onto the chosen one's (None for the chosen start, or when not
        recorded; the resolution is FSC = 0.5 between the two, Å).
    epochs : `(E,)` int
    losses : `(E,)` float, nats per image
    """

    name: str
    seed: int | None
    final_loss_nats: float
    above_lowest_nats: float
    chosen: bool
    correlation: float | None
    resolution_angstrom: float | None
    epochs: np.ndarray
    losses: np.ndarray


@dataclass(frozen=True)
class StartsContext:
    """The ``--starts`` run a reported run folder belongs to.

    Attributes
    ----------
    starts_dir : Path
        The ``--starts`` run folder.
    this : str
        The reported start's folder name.
    rows : tuple[StartRow, ...]
        Every start, in order.
    """

    starts_dir: Path
    this: str
    rows: tuple[StartRow, ...]


def _optional(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def read_starts_context(run_dir: str | Path) -> StartsContext | None:
    """The starts context of ``run_dir`` when it is a start of a ``--starts`` run whose choice
    is made (its parent holds ``starts.json`` and ``choice.json``), else None.

    Raises
    ------
    InputError
        When ``choice.json`` cannot be read.
    """
    folder = Path(run_dir).resolve()  # RUN/chosen is a link to the chosen start
    parent = folder.parent
    choice = parent / STARTS_CHOICE
    if not (parent / STARTS_MARKER).is_file() or not choice.is_file():
        return None
    try:
        runs = json.loads(choice.read_text(encoding="utf-8"))["runs"]
        rows = []
        for r in runs:
            name = Path(str(r["run_dir"])).name
            metrics = read_metrics(parent / name / METRICS)
            agreement = r.get("map_vs_chosen") or {}
            rows.append(StartRow(
                name=name, seed=r.get("seed") if isinstance(r.get("seed"), int) else None,
                final_loss_nats=float(r["final_loss_nats"]),
                above_lowest_nats=float(r["above_lowest_nats"]), chosen=bool(r["chosen"]),
                correlation=_optional(agreement.get("correlation")),
                resolution_angstrom=_optional(agreement.get("fsc_0.5_resolution_angstrom")),
                epochs=np.array([int(m["epoch"]) for m in metrics], dtype=np.int64),
                losses=np.array([float(m["loss"]) for m in metrics], dtype=np.float64)))
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError("unreadable choice among the starts", choice) from None
    return StartsContext(parent, folder.name, tuple(rows))


def starts_section(ctx: StartsContext) -> Section:
    """The page's "Several starts" section: this start's place in the choice and a table of
    every start."""
    esc = html.escape
    chosen = next((r for r in ctx.rows if r.chosen), None)
    this = next((r for r in ctx.rows if r.name == ctx.this), None)
    if this is None:
        verdict = "not among the starts its choice lists"
    elif this.chosen:
        verdict = "the chosen one: its images fit best, the lowest final loss"
    else:
        verdict = (f"not the chosen one: its final loss is {this.above_lowest_nats:.2f} nats "
                   f"per image above that of {esc(chosen.name) if chosen else '?'}")
    paragraphs = [f"This run is <b>{esc(ctx.this)}</b>, one of the {len(ctx.rows)} starts of "
                  f"the --starts run {esc(str(ctx.starts_dir))} (the same settings, another "
                  f"seed each): {verdict} (the choice: {STARTS_CHOICE}; the chosen start is "
                  "linked as chosen). Runs that found the same structure have maps that "
                  "agree to about their resolution; a start that settled on another "
                  "structure ends tens of nats per image higher."]
    rows = [[r.name, "?" if r.seed is None else str(r.seed), f"{r.final_loss_nats:.2f}",
             f"{r.above_lowest_nats:.2f}",
             "–" if r.correlation is None else f"{r.correlation:.3f}",
             "–" if r.resolution_angstrom is None else f"{r.resolution_angstrom:.1f}",
             "chosen" if r.chosen else ""] for r in ctx.rows]
    return Section("Several starts", paragraphs,
                   ["start", "seed", "final loss (nats/image)", "above lowest",
                    "map vs chosen: correlation", "FSC 0.5 (Å)", ""], rows)


def plot_starts_losses(ctx: StartsContext, path: str | Path) -> None:
    """Every start's loss against epoch (the chosen start bold, this one marked)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for r in ctx.rows:
        label = r.name + (" (chosen)" if r.chosen else "") + (" — this run" if
                                                              r.name == ctx.this else "")
        ax.plot(r.epochs, r.losses, marker="o" if r.name == ctx.this else ".",
                linewidth=2.4 if r.chosen else 1.0, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
