"""Per-particle fit scores: how much better the map explains each image than an empty image.

The score of particle ``i`` is the log-likelihood ratio (nats) of its image under the run's
image model — the trained volume's slice at its final pose, times its CTF, shifted — against
the same model with no particle (a zero image), on the training disc with the training's
noise variance (:func:`cryospin.losses.log_likelihood_ratio`). A particle whose image the map
explains no better than an empty one (score ≤ :data:`EMPTY_SCORE`) is likely not the
particle (empty ice, contamination, a false pick); the run writes the scores into
``poses.star`` (``rlnLogLikeliContribution``) and the others' indices into ``selected.pkl``.
With the junk class (``model.junk_class``, once it took effect: :func:`junk_takes_effect`)
the score is taken against the likelier of an empty image and junk, a signal of the map's
power with random phases (:func:`junk_log_likelihood_ratio`): ``score − max(0, junk)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from cryospin.forward.model import render
from cryospin.losses import (
    log_likelihood_ratio,
    random_phase_log_likelihood_ratio,
    shell_signal_power,
)
from cryospin.train.batches import Batch
from cryospin.train.data import TrainingData

__all__ = [
    "EMPTY_SCORE",
    "SCORE_COLUMN",
    "SCORE_CS_FIELD",
    "JUNK_GATE_FRACTION",
    "junk_log_likelihood_ratio",
    "junk_takes_effect",
    "particle_scores",
    "score_alternative",
    "score_from_nll",
    "selected_indices",
]

#: particles scoring at most this (nats) fit the map no better than an empty image
EMPTY_SCORE = 0.0
#: the junk class weighs in once fewer than this share of a stage-2 epoch's images were
#: likeliest junk (:func:`junk_takes_effect`)
JUNK_GATE_FRACTION = 0.5
#: the ``poses.star`` column holding the scores (RELION's per-particle log-likelihood column)
SCORE_COLUMN = "rlnLogLikeliContribution"
#: the ``poses.cs`` field holding the same scores (cryoSPARC has no field of this meaning)
SCORE_CS_FIELD = "cryospin/score"


@torch.no_grad()
def particle_scores(
    volume_ht: Tensor,
    rotations: Tensor,
    shifts_px: Tensor | None,
    data: TrainingData,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    junk_class: bool = False,
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
    junk_class : bool
        Take each score against the likelier of an empty image and junk (the junk class's
        power pooled over each batch of ``batch_size``).

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
        score = log_likelihood_ratio(pred, batch.hartley, data.noise_variance)
        if junk_class:
            score = score - junk_log_likelihood_ratio(pred, batch, data).clamp_min(EMPTY_SCORE)
        scores[idx] = score.cpu()
        if progress is not None:
            progress(len(idx))
    return scores


def junk_takes_effect(last_junk_fraction: float | None) -> bool:
    """Whether the junk class weighs in (volume steps, scores, final map), given the share of
    images likeliest junk in the last stage-2 epoch (None: none yet). Only once the map
    explains most images better than junk: a map still forming (its phases random, its power
    already there) loses to junk on every image, and weights of ~0 for all would stop it
    from ever forming; nor where most of the data is junk to this map."""
    return last_junk_fraction is not None and last_junk_fraction < JUNK_GATE_FRACTION


def score_alternative(junk_class: bool) -> str:
    """What the scores are taken against, in words: an empty image, and with the junk class
    (``model.junk_class``) the likelier of that and junk."""
    return "an empty image or junk" if junk_class else "an empty image"


def junk_log_likelihood_ratio(predicted: Tensor, batch: Batch, data: TrainingData, *,
                              reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Each image's log-likelihood `(B,)` float64 under the junk class against an empty image:
    a signal of the map's power at the batch's poses (:func:`cryospin.losses.shell_signal_power`
    of ``predicted`` `(B, P)`, the batch's predictions on the training disc; ``reduce``: the
    sum over a distributed run's ranks) with random phases
    (:func:`cryospin.losses.random_phase_log_likelihood_ratio`)."""
    power = shell_signal_power(predicted, batch.ctf, data.frequencies, reduce=reduce)
    return random_phase_log_likelihood_ratio(batch.hartley, power, data.noise_variance)


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
