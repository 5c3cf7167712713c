"""The choice among runs that differ only in their seed, as the CLI shows it: the table,
the JSON record, each map's agreement with the chosen one (``cryospin choose-run`` and
``cryospin reconstruct --starts``; the choice itself: :mod:`cryospin.train.choose`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cryospin.errors import InputError
from cryospin.evaluate.align import align_maps
from cryospin.evaluate.fsc import fsc
from cryospin.io.mrc import read_cubic_map
from cryospin.train.choose import RunOutcome

__all__ = ["CRITERION", "MapAgreement", "map_agreement", "agreements", "format_table",
           "choice_record"]

#: What the final loss is, in the table's heading and the JSON.
CRITERION = ("the lowest final loss: the last epoch's mean negative log-likelihood of the "
             "images, nats per image")


@dataclass(frozen=True)
class MapAgreement:
    """A run's ``map.mrc`` aligned onto the chosen run's (:func:`map_agreement`).

    Attributes
    ----------
    correlation : float
        Real-space correlation after the alignment.
    flipped : bool
        The alignment mirrored the map (the other hand).
    resolution_angstrom : float
        FSC = 0.5 between the two (Å; px when the maps carry no voxel size; the Nyquist
        resolution when the curve never falls below 0.5, inf when it starts below).
    """

    correlation: float
    flipped: bool
    resolution_angstrom: float


def map_agreement(reference: Path, other: Path) -> MapAgreement:
    """Align the map at ``other`` onto ``reference`` (rotation, shift, hand;
    :func:`cryospin.evaluate.align.align_maps`) and compare them."""
    return _agreements_with(reference, [other])[0]


def agreements(outcomes: Sequence[RunOutcome], chosen: int) -> list[MapAgreement | None]:
    """Each run's :func:`map_agreement` with the chosen one (None for the chosen run; the
    chosen map is read once)."""
    others = [o.run.files.map for i, o in enumerate(outcomes) if i != chosen]
    found = iter(_agreements_with(outcomes[chosen].run.files.map, others))
    return [None if i == chosen else next(found) for i in range(len(outcomes))]


def _agreements_with(reference: Path, others: Sequence[Path]) -> list[MapAgreement]:
    """:func:`map_agreement` of each of ``others`` with ``reference``."""
    a, apix = read_cubic_map(reference)
    target = torch.from_numpy(a)
    out = []
    for other in others:
        b, _ = read_cubic_map(other)
        if a.shape != b.shape:
            raise InputError(f"box {tuple(b.shape)} differs from {reference}'s "
                             f"{tuple(a.shape)}", other)
        aligned = align_maps(target, torch.from_numpy(b), search_hand=True)
        curve = fsc(target, aligned.aligned, pixel_size_angstrom=apix if apix > 0 else None)
        out.append(MapAgreement(float(aligned.correlation), bool(aligned.flipped),
                                float(curve.resolution(0.5))))
    return out


def _search(o: RunOutcome) -> str:
    if o.search_stopped_after is None:
        return "not stopped early"
    return f"{o.search_stop_rule} after epoch {o.search_stopped_after}"


def _agreement(a: MapAgreement | None) -> str:
    if a is None:
        return f"{'-':>11}  {'-':>10}"
    return f"{a.correlation:>11.3f}  {a.resolution_angstrom:>10.1f}"


def format_table(outcomes: Sequence[RunOutcome], chosen: int,
                 agreement: Sequence[MapAgreement | None] | None = None) -> str:
    """The runs, one line each (seed, epochs, the search's stop, final loss and its excess
    over the lowest; with ``agreement``, the map's correlation with the chosen one and their
    FSC = 0.5 resolution), then the choice."""
    lowest = outcomes[chosen].final_loss_nats
    names = [str(o.run_dir) for o in outcomes]
    width = max(len("run"), *(len(n) for n in names))
    maps = "" if agreement is None else f"  {'correlation':>11}  {'FSC 0.5 Å':>10}"
    lines = [f"{len(outcomes)} runs of the same {outcomes[0].identity.num_particles:,} "
             f"particles; chosen by {CRITERION}"
             + ("" if agreement is None else "; maps aligned onto the chosen one's"),
             f"  {'run':<{width}}  {'seed':>6}  {'epochs':>6}  {'global search':<22}  "
             f"{'final loss':>12}  {'above lowest':>12}{maps}"]
    for i, (o, name) in enumerate(zip(outcomes, names, strict=True)):
        seed = "?" if o.seed is None else str(o.seed)
        mark = "  <- chosen" if i == chosen else ""
        cells = "" if agreement is None else "  " + _agreement(agreement[i])
        lines.append(f"  {name:<{width}}  {seed:>6}  {o.epochs:>6}  {_search(o):<22}  "
                     f"{o.final_loss_nats:>12.2f}  {o.final_loss_nats - lowest:>12.2f}"
                     f"{cells}{mark}")
    others = sorted(o.final_loss_nats - lowest for i, o in enumerate(outcomes) if i != chosen)
    lines.append(f"chosen: {names[chosen]} (map {outcomes[chosen].run.files.map}); the next "
                 f"lowest is {others[0]:.2f} nats per image higher")
    return "\n".join(lines)


def choice_record(outcomes: Sequence[RunOutcome], chosen: int,
                  agreement: Sequence[MapAgreement | None] | None = None) -> dict[str, Any]:
    """The JSON of ``-o``: the criterion, the chosen folder and every run's figures."""
    lowest = outcomes[chosen].final_loss_nats
    runs = []
    for i, o in enumerate(outcomes):
        row: dict[str, Any] = {
            "run_dir": str(o.run_dir), "seed": o.seed, "epochs": o.epochs,
            "final_loss_nats": o.final_loss_nats,
            "above_lowest_nats": o.final_loss_nats - lowest,
            "search_stop_rule": o.search_stop_rule,
            "search_stopped_after": o.search_stopped_after,
            "chosen": i == chosen,
        }
        a = None if agreement is None else agreement[i]
        if a is not None:
            row["map_vs_chosen"] = {
                "correlation": a.correlation, "mirrored": a.flipped,
                "fsc_0.5_resolution_angstrom": a.resolution_angstrom
                if math.isfinite(a.resolution_angstrom) else None}
        runs.append(row)
    return {"criterion": CRITERION, "chosen": str(outcomes[chosen].run_dir), "runs": runs}
