"""Symmetry relaxation: a pseudo-symmetric particle's poses pick their protomer copy.

A C1 particle with a pseudo-symmetry ``G`` (a trimer whose three protomers differ a little)
gives nearly the same image at a pose ``R`` and at its copies ``R g``. Local refinement moves a
pose only within its basin, so a particle that starts on the wrong copy (the encoder's heads
cannot tell the copies apart against a near-symmetric map; benchmarks/RESULTS.md, "The spike's
supervised bound") stays there, and a map built from particles on random copies is the
``G``-average of the particle. With ``model.relax_symmetry = G`` (RELION's ``--relax_sym``),
each stage-2 epoch of a C1 run starts by placing ``G`` in the current map
(:func:`cryospin.symmetry_search.place_group`: its frame ``M`` and centre ``c``), and every
batch, before its pose steps, moves each particle to the best of its ``|G|`` copies
(:class:`cryospin.train.autodecode.SymmetryCopies`; ``R M g₀ Mᵀ`` with the shift that keeps
the centre, ``docs/conventions.md``, "Symmetry"), when that copy fits better. The map is never
averaged over ``G``: whatever asymmetry it has decides, and each decision sharpens it.

No global search: ``|G|`` candidates per particle, each a copy of its own pose. Under
``torchrun`` every rank places the group on the same (synchronised) volume and all take rank
0's frame and centre.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from cryospin.symmetry import point_group_rotations
from cryospin.symmetry_search import place_group
from cryospin.train.autodecode import SymmetryCopies
from cryospin.train.distributed import Shard
from cryospin.train.metrics import RelaxRecord
from cryospin.volume import HartleyVolume

__all__ = ["RelaxFrame", "place_copies", "relax_record"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaxFrame:
    """The pseudo-symmetry as placed in one epoch's map.

    Attributes
    ----------
    group : str
        Its symbol (``model.relax_symmetry``).
    score : float
        Its score on the map (:func:`cryospin.symmetry_search.group_score`; 1: exact).
    copies : SymmetryCopies
        Its rotations in the map's frame and its centre (float32, the volume's device).
    seconds : float
        Wall time of the placement.
    """

    group: str
    score: float
    copies: SymmetryCopies
    seconds: float


def place_copies(volume: HartleyVolume, group: str, shard: Shard | None = None) -> RelaxFrame:
    """``group`` placed in the real-space map of ``volume``: ``M g₀ Mᵀ`` `(G − 1, 3, 3)` for
    the conventional elements ``g₀`` other than the identity, and the centre ``c``
    (distributed: rank 0's, on every rank)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        real = volume.to_real_space().detach().cpu()
    search = place_group(real, group)
    fit = search.chosen
    frame, centre = fit.frame.double().cpu(), search.centre_px.double().cpu()
    score = float(fit.score)
    if shard is not None:  # one frame whatever the rounding of each rank's search
        numbers = torch.cat([frame.flatten(), centre, torch.tensor([score], dtype=torch.float64)])
        agreed = shard.all_sum(numbers if shard.rank == 0 else torch.zeros_like(numbers))
        frame, centre, score = agreed[:9].reshape(3, 3), agreed[9:12], float(agreed[12])
    g0 = point_group_rotations(fit.group).double()
    g0 = g0[g0.diagonal(dim1=-2, dim2=-1).sum(-1) < 3 - 1e-9]  # all but the identity
    rotations = frame @ g0 @ frame.T  # (G − 1, 3, 3)
    device = volume.mantissa.device
    copies = SymmetryCopies(rotations.float().to(device), centre.float().to(device))
    return RelaxFrame(fit.group, score, copies, time.perf_counter() - t0)


def relax_record(frame: RelaxFrame, moved_fraction: float | None) -> RelaxRecord:
    """The ``metrics.jsonl`` record (``extra["relax"]``) of one epoch, and its log line."""
    moved = float(moved_fraction or 0.0)
    logger.info("relaxed %s (score %.3f in the map, placed in %.1f s): %.1f %% of the "
                "particles moved to another copy", frame.group, frame.score, frame.seconds,
                100 * moved)
    return {"group": frame.group, "score": frame.score, "moved_fraction": moved,
            "centre_px": [float(v) for v in frame.copies.centre_px.tolist()]}
