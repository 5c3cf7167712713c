"""How stage 1 scores each head's hypothesis: the encoder's input and where the shifts come from.

:class:`HeadScoring` is read from the run's configuration (:meth:`HeadScoring.of`)
and passed to every stage-1 scoring function of :mod:`cryospin.train.autoencode` (the steps,
the inference pass at the switch, the pose track), so that they all score alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.forward.model import render
from cryospin.forward.shift_search import best_shifts
from cryospin.train.batches import sub_disc
from cryospin.train.config import Config

__all__ = ["HeadScoring", "DEFAULT_SCORING", "searched_shifts"]


@dataclass(frozen=True)
class HeadScoring:
    """How stage 1 turns an image into the hypotheses it scores (``model`` settings).

    Attributes
    ----------
    lowpass_input : bool
        Low-pass the encoder's input with a Gaussian of ``σ`` = the loss disc's radius
        (``model.encoder_lowpass``; only with a sub-disc, i.e. frequency marching).
    shift_search_px : float or None
        Give each head the shift that best explains the image under the current volume —
        the least-squares shift over the integer shifts with ``|tx|, |ty| ≤`` this bound,
        then sub-pixel (:func:`cryospin.forward.shift_search.best_shifts`) — in place of the
        encoder's shift outputs (``model.shift_search``); None: the encoder's shifts.
    shift_search_radius_px : float
        The shift search compares the images with the predictions on the frequencies
        ``|k| ≤`` this radius (cycles per box) of the scoring disc only (the global
        search's disc, ``optim.search_radius_px``).
    """

    lowpass_input: bool = False
    shift_search_px: float | None = None
    shift_search_radius_px: float = math.inf

    @staticmethod
    def of(config: Config) -> HeadScoring:
        """The scoring a run's configuration asks for."""
        m = config.model
        search = m.max_shift_px if m.predict_shifts and m.shift_search else None
        return HeadScoring(lowpass_input=m.encoder_lowpass, shift_search_px=search,
                           shift_search_radius_px=config.optim.search_radius_px)


#: the encoder's own input and shifts
DEFAULT_SCORING = HeadScoring()


# images per chunk of the shift search: its correlation grids, (chunk, M, L, L) complex, stay
# near 2**22 elements (32 MB) whatever the batch
_SEARCH_GRID_ELEMENTS = 1 << 22


@torch.no_grad()
def searched_shifts(volume_ht: Tensor, rotations: Tensor, hartley: Tensor, ctf: Tensor | None,
                    frequencies: Tensor, box_px: int, max_shift_px: float,
                    radius_px: float = math.inf) -> Tensor:
    """Each head's least-squares shift `(B, M, 2)` px under the volume (see
    :class:`HeadScoring`).

    ``volume_ht`` `(L, L, L)` Hartley volume; ``rotations`` `(B, M, 3, 3)` the heads' poses;
    ``hartley`` `(B, P)` the images and ``ctf`` `(B, 1, P)` (or None) on the disc
    ``frequencies`` `(P, 2)` (cycles per box); compared on ``|k| ≤ radius_px`` only.
    """
    disc = sub_disc(frequencies, box_px, min(radius_px, box_px / 2))
    cols = disc.columns
    hartley = hartley[:, cols]
    ctf = None if ctf is None else ctf[..., cols]
    B, M = rotations.shape[:2]
    chunk = max(1, _SEARCH_GRID_ELEMENTS // (M * box_px * box_px))
    parts = []
    for rows in torch.arange(B, device=rotations.device).split(chunk):
        unshifted = render(volume_ht.detach(), rotations[rows].detach(), None,
                           None if ctf is None else ctf[rows], frequencies=disc.frequencies)
        parts.append(best_shifts(hartley[rows].to(unshifted.dtype), unshifted,
                                 disc.negation_index, disc.frequencies, box_px, max_shift_px))
    return torch.cat(parts).to(rotations.dtype)  # (B, M, 2)
