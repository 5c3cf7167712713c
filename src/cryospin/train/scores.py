"""Per-particle fit scores: how much better the map explains each image than an empty image.

The score of particle ``i`` is the log-likelihood ratio (nats) of its image under the run's
image model — the trained volume's slice at its final pose, times its CTF, shifted — against
the same model with no particle (a zero image), on the training disc with the training's
noise variance (:func:`cryospin.losses.log_likelihood_ratio`). A particle whose image the map
explains no better than an empty one (score ≤ :data:`EMPTY_SCORE`) is likely not the
particle (empty ice, contamination, a false pick); the run writes the scores into
``poses.star`` (``rlnLogLikeliContribution``) and the others' indices into ``selected.pkl``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from cryospin.forward.model import render
from cryospin.losses import log_likelihood_ratio
from cryospin.train.batches import Batch
from cryospin.train.data import TrainingData

__all__ = ["EMPTY_SCORE", "SCORE_COLUMN", "particle_scores", "score_from_nll", "selected_indices"]

#: particles scoring at most this (nats) fit the map no better than an empty image
EMPTY_SCORE = 0.0
#: the ``poses.star`` column holding the scores (RELION's per-particle log-likelihood column)
SCORE_COLUMN = "rlnLogLikeliContribution"


@torch.no_grad()
def particle_scores(
    volume_ht: Tensor,
    rotations: Tensor,
    shifts_px: Tensor | None,
    data: TrainingData,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Each particle's score (module docstring), in particle order.

    Parameters
    ----------
    volume_ht : `(L, L, L)`
        The trained Hartley volume (``HartleyVolume()``), on ``data.device``.
    rotations : `(N, 3, 3)`
        Final poses of all ``N = len(data)`` particles (cryospin convention).
    shifts_px : `(N, 2)` or None
        Final shifts ``(tx, ty)`` in the training frame's pixels; None: no shifts.
    data : TrainingData
        The images as trained on (every particle: ``data.unsharded()`` in a distributed run).
    batch_size : int
        Images per batch.
    progress : callable, optional
        Called after each batch with its number of images.

    Returns
    -------
    `(N,)` float64 on the CPU, nats.
    """
    n = len(data)
    if rotations.shape != (n, 3, 3):
        raise ValueError(f"expected rotations ({n}, 3, 3), got {tuple(rotations.shape)}")
    scores = torch.empty(n, dtype=torch.float64)
    dev, dtype = volume_ht.device, volume_ht.dtype
    for idx in torch.arange(n).split(batch_size):
        batch = data.batch(idx)
        pred = render(volume_ht, rotations[idx].to(dev, dtype),
                      None if shifts_px is None else shifts_px[idx].to(dev, dtype),
                      batch.ctf, frequencies=data.frequencies,
                      negation_index=data.negation_index)  # (B, P)
        scores[idx] = log_likelihood_ratio(pred, batch.hartley, data.noise_variance).cpu()
        if progress is not None:
            progress(len(idx))
    return scores


def score_from_nll(nll: Tensor, batch: Batch, data: TrainingData) -> Tensor:
    """The scores `(B,)` float64 of ``batch``'s images from their NLL `(B,)` under the
    current prediction on the training disc (``cryospin.train.autodecode.pose_nll``): the NLL
    of an empty image, ``Σ y² / (2σ²)``, minus it. The same number as
    :func:`particle_scores` without rendering again, but taken from the float32 NLL (a
    difference of two sums of ``P / 2`` nats each)."""
    empty = batch.hartley.double().square().sum(-1) * (0.5 / data.noise_variance)
    return empty - nll.double()


def selected_indices(scores: Tensor | np.ndarray, ind: np.ndarray | None = None) -> np.ndarray:
    """0-based indices `(n,)` int64 of the particles scoring above :data:`EMPTY_SCORE`, of
    ``scores`` `(N,)`; with ``ind`` `(N,)` (the run's ``--ind``: where its particles lie in
    the input), their indices in the input, so that ``--ind`` of the result selects them
    from the same input."""
    chosen = np.flatnonzero(np.asarray(scores) > EMPTY_SCORE).astype(np.int64)
    if ind is None:
        return chosen
    ind = np.asarray(ind, dtype=np.int64)
    if ind.shape != (len(np.asarray(scores)),):
        raise ValueError(f"ind {ind.shape} does not match {len(np.asarray(scores))} scores")
    return ind[chosen]
