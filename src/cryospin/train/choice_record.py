"""The record of a choice among runs that differ only in their seed: each other run's map
aligned onto the chosen one's, ``choice.json`` and the ``chosen`` link of a ``--starts``
folder (the choice itself: :mod:`cryospin.train.choose`; its table on the terminal:
:mod:`cryospin.cli._choice`).

Used by ``cryospin choose-run`` (the record as ``-o JSON``), by ``reconstruct --starts``
(:mod:`cryospin.train.starts`) and so by each half of ``reconstruct --halves --starts``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError, OutputError
from cryospin.evaluate.align import align_maps
from cryospin.evaluate.fsc import fsc
from cryospin.io.mrc import read_cubic_map
from cryospin.rundir import StartsFiles
from cryospin.train.choose import CRITERION, RunOutcome

__all__ = ["MapAgreement", "map_agreement", "agreements", "choice_record", "write_choice",
           "record_choice"]


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


def choice_record(outcomes: Sequence[RunOutcome], chosen: int,
                  agreement: Sequence[MapAgreement | None] | None = None) -> dict[str, Any]:
    """The choice as JSON (``choose-run -o``, ``choice.json``): the criterion, the chosen
    folder and every run's figures (with ``agreement``, its map against the chosen one)."""
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


def write_choice(run_dir: str | Path, record: dict[str, Any], chosen: Path) -> None:
    """Record the choice in a ``--starts`` run folder: ``choice.json`` (``record``) and the
    ``chosen`` link to the chosen start's folder ``chosen`` (relative; replaced atomically).

    Raises
    ------
    OutputError
        When either cannot be written (the starts' own outputs are untouched).
    """
    files = StartsFiles(run_dir)
    atomic_write_text(files.choice, json.dumps(record, indent=2) + "\n")
    temporary = files.dir / f".{files.chosen.name}.{os.getpid()}.tmp"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(chosen.name, target_is_directory=True)
        os.replace(temporary, files.chosen)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot link the chosen start ({exc.strerror}); it is "
                          f"{chosen.name}, as {files.choice.name} says", files.chosen) from None


def record_choice(run_dir: str | Path, outcomes: Sequence[RunOutcome],
                  chosen: int) -> list[MapAgreement | None]:
    """Align every other start's map onto the chosen one's, then :func:`write_choice` the
    record into the ``--starts`` folder ``run_dir``; returns the agreements
    (:func:`agreements`)."""
    agreement = agreements(outcomes, chosen)
    write_choice(run_dir, choice_record(outcomes, chosen, agreement), outcomes[chosen].run_dir)
    return agreement
