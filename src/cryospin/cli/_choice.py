"""The choice among runs that differ only in their seed, as the terminal shows it: the table
(``cryospin choose-run`` and ``cryospin reconstruct --starts``; the choice itself:
:mod:`cryospin.train.choose`; its record and the maps' agreement:
:mod:`cryospin.train.choice_record`)."""

from __future__ import annotations

from collections.abc import Sequence

from cryospin.train.choice_record import MapAgreement
from cryospin.train.choose import CRITERION, RunOutcome

__all__ = ["format_table"]


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
