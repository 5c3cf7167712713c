"""Symmetry relaxation: a pseudo-symmetric particle's poses pick their protomer copy.

A C1 particle with a pseudo-symmetry ``G`` (a trimer whose three protomers differ a little)
gives nearly the same image at a pose ``R`` and at its copies ``R g``. Local refinement moves a
pose only within its basin, so a particle that starts on the wrong copy (the encoder's heads
cannot tell the copies apart against a near-symmetric map; benchmarks/RESULTS.md, "The spike's
supervised bound") stays there, and a map built from particles on random copies is the
``G``-average of the particle. With ``model.relax_symmetry = G`` (RELION's ``--relax_sym``),
each stage-2 epoch of a C1 run starts by placing ``G`` in the current map as the
impose-symmetry step does (:func:`cryospin.train.impose.find_frame`: its frame ``M`` and
centre ``c``), and every
batch, before its pose steps, moves each particle to the best of its ``|G|`` copies
(:class:`cryospin.train.autodecode.SymmetryCopies`; ``R M g₀ Mᵀ`` with the shift that keeps
the centre, ``docs/conventions.md``, "Symmetry"), when that copy fits better. The map is never
averaged over ``G``: whatever asymmetry it has decides, and each decision sharpens it.

With ``relax_symmetry = auto`` the group is the one the epoch's starting map shows
(:func:`cryospin.symmetry_search.detect_symmetry`, as ``model.symmetry = auto`` chooses it),
found again in every stage-2 epoch, if it is cyclic (``Cn``): pseudo-symmetric particles are
rings of near-identical subunits (pseudo-C2 heterodimers, the C3 spike, pseudo-C5 channels),
while a map that shows a dihedral or higher group is far more often an exactly symmetric
assembly, whose copies are the same image: relaxing them moves particles between equal poses
at random, and the map follows the noise (measured on the D7 ring, benchmarks/RESULTS.md,
"Symmetry relaxation chosen by the map": the D7 score fell from 0.91 to 0.78, the error modulo
D7 rose from 1.78 to 1.86 deg, the local epochs took 1.9x as long). An epoch whose map shows no
group, or a non-cyclic one, relaxes nothing (``--symmetry G`` is the remedy for the latter;
the report advises it). ``auto`` relaxes only where it can apply: in a C1 run
(``model.symmetry`` C1) that switches (method ``semi-amortized``); elsewhere it does nothing,
so that a preset can carry it.

No global search: ``|G|`` candidates per particle, each a copy of its own pose. Under
``torchrun`` every rank places the group on the same (synchronised) volume and all take rank
0's group, frame and centre.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryospin.point_group import parse_point_group
from cryospin.train.autodecode import SymmetryCopies
from cryospin.train.config import Config
from cryospin.train.distributed import Shard
from cryospin.train.impose import SymmetryStep, find_frame, rank0_frame
from cryospin.train.metrics import RelaxRecord
from cryospin.volume import HartleyVolume

__all__ = ["RelaxFrame", "place_copies", "relax_record", "relaxed_group"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaxFrame:
    """The pseudo-symmetry as placed in one epoch's map.

    Attributes
    ----------
    step : SymmetryStep
        The placement (:func:`cryospin.train.impose.find_frame`): the group, its score on the
        map (1: exact), the frame ``M``, the centre ``c`` and the wall time.
    copies : SymmetryCopies or None
        The group's elements other than the identity in the map's frame, ``M g₀ Mᵀ``, and the
        centre (float32, the volume's device); None when nothing is relaxed in this epoch
        (``auto`` found no group, or one that is not cyclic).
    """

    step: SymmetryStep
    copies: SymmetryCopies | None


def relaxed_group(config: Config) -> str | None:
    """What stage 2 relaxes: ``model.relax_symmetry`` (a group, or ``"auto"`` in a C1
    semi-amortized run), None when nothing (``C1``, or ``auto`` where it does not apply)."""
    relax = config.model.relax_symmetry
    if relax.upper() == "C1":
        return None
    if relax.lower() == "auto":
        applies = (config.model.symmetry.upper() == "C1"
                   and config.schedule.method == "semi-amortized")
        return "auto" if applies else None
    return relax


def place_copies(volume: HartleyVolume, group: str, shard: Shard | None = None) -> RelaxFrame:
    """``group`` (or, for ``"auto"``, the group the map shows) placed in the real-space map of
    ``volume`` (distributed: rank 0's group, frame and centre on every rank) and its copies
    ``M g₀ Mᵀ`` `(G − 1, 3, 3)`; no copies when the group is ``C1``, or ``auto`` found a
    group that is not cyclic (module docstring)."""
    step = find_frame(volume, group)
    if shard is not None:  # one frame whatever the rounding of each rank's search
        step = rank0_frame(step, shard)
    if group.lower() == "auto" and parse_point_group(step.group).kind != "C":
        return RelaxFrame(step, None)  # taken for an exact symmetry: nothing to relax
    if parse_point_group(step.group).order == 1:
        return RelaxFrame(step, None)
    return RelaxFrame(step, SymmetryCopies.placed(step.group, step.rotation, step.centre_px,
                                                  volume.mantissa.device))


def relax_record(frame: RelaxFrame, moved_fraction: float | None) -> RelaxRecord:
    """The ``metrics.jsonl`` record (``extra["relax"]``) of one epoch, and its log line."""
    moved, step = float(moved_fraction or 0.0), frame.step
    if frame.copies is None and step.group == "C1":
        logger.info("relax: the map shows no symmetry (score of the best group below the "
                    "threshold), nothing relaxed; %.1f s", step.seconds)
    elif frame.copies is None:
        logger.info("relax: the map shows %s (score %.3f), not cyclic: more likely an exactly "
                    "symmetric particle (--symmetry %s) than a pseudo-symmetric one "
                    "(--relax-symmetry %s relaxes it); nothing relaxed; %.1f s", step.group,
                    step.score, step.group, step.group, step.seconds)
    else:
        logger.info("relaxed %s (score %.3f in the map, placed in %.1f s): %.1f %% of the "
                    "particles moved to another copy", step.group, step.score, step.seconds,
                    100 * moved)
    return {"group": step.group if frame.copies is not None else "C1", "detected": step.group,
            "score": float(step.score), "moved_fraction": moved,
            "centre_px": [float(v) for v in step.centre_px.tolist()]}
