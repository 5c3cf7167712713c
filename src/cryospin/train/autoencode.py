"""Stage 1 (auto-encoding): the multi-head encoder and the volume trained jointly.

For a batch of ``B`` images the encoder proposes ``M`` poses per image; the volume renders all
``B × M`` predictions in one call (``render`` on `(B, M, 3, 3)` rotations), each is compared with
the observation by the Gaussian NLL over the loss disc, and only the best head of each image
contributes to the loss (winner-take-all). One Adam step of the encoder and one of the volume
follow. :func:`infer_best_poses` is the inference pass at the switch to stage 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cryospin.forward.model import render
from cryospin.losses import gaussian_nll, head_usage, winner_take_all
from cryospin.train.data import Batch, TrainingData, batch_indices
from cryospin.train.metrics import RunningMean, check_finite_loss

__all__ = ["EpochStats", "BestPoses", "autoencode_epoch", "infer_best_poses", "predict_nll"]

STAGE = "autoencode"


@dataclass(frozen=True)
class EpochStats:
    """What an epoch function reports.

    Attributes
    ----------
    loss : float
        Mean per-image NLL over the epoch (winner head in stage 1; after the pose steps in
        stage 2).
    num_images : int
    head_usage : list[float] or None
        Fraction of images won by each head (stage 1).
    mean_pose_change_deg : float or None
        Mean geodesic change of a visited particle's rotation during the epoch (stage 2).
    mean_shift_change_px : float or None
        Mean Euclidean change of a visited particle's shift (stage 2 with shifts).
    """

    loss: float
    num_images: int
    head_usage: list[float] | None = None
    mean_pose_change_deg: float | None = None
    mean_shift_change_px: float | None = None


@dataclass(frozen=True)
class BestPoses:
    """Result of the inference pass: each particle's best head and its pose.

    Attributes
    ----------
    rotations : `(N, 3, 3)` float32
    shifts_px : `(N, 2)` float32 or None
    best_head : `(N,)` int64
    loss : `(N,)` float32
        NLL of the best head.
    """

    rotations: Tensor
    shifts_px: Tensor | None
    best_head: Tensor
    loss: Tensor


def predict_nll(
    encoder: nn.Module, volume_ht: Tensor, batch: Batch, data: TrainingData
) -> tuple[Tensor, Tensor, Tensor | None]:
    """NLL of every head for a batch.

    Parameters
    ----------
    encoder : MultiHeadPoseEncoder
    volume_ht : `(L, L, L)`
        Hartley volume (``volume()``).
    batch : Batch
    data : TrainingData

    Returns
    -------
    nll : `(B, M)`
    rotations : `(B, M, 3, 3)`
    shifts_px : `(B, M, 2)` or None
    """
    out = encoder(batch.images)
    ctf = None if batch.ctf is None else batch.ctf[:, None, :]  # (B, 1, P)
    pred = render(
        volume_ht,
        out.rotations,
        out.shifts_px,
        ctf,
        frequencies=data.frequencies,
        negation_index=data.negation_index,
    )  # (B, M, P)
    nll = gaussian_nll(pred, batch.hartley, data.noise_variance)  # (B, M)
    return nll, out.rotations, out.shifts_px


def autoencode_epoch(
    encoder: nn.Module,
    volume: nn.Module,
    data: TrainingData,
    encoder_optimizer: torch.optim.Optimizer,
    decoder_optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
    progress: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """One pass over the particles in random order (drawn from ``generator``).

    Parameters
    ----------
    encoder : MultiHeadPoseEncoder
    volume : HartleyVolume
    data : TrainingData
    encoder_optimizer, decoder_optimizer : torch.optim.Optimizer
        Over ``encoder.parameters()`` and ``volume.parameters()``.
    batch_size : int
    generator : torch.Generator
        CPU generator of the batch order.
    epoch : int
        For error messages.
    progress : callable, optional
        Called after each batch with ``(images_in_batch, batch_loss)``.

    Raises
    ------
    NonFiniteLossError
        If a batch loss is NaN/Inf (before any parameter is updated with it).
    """
    encoder.train()
    num_heads = int(encoder.num_heads)
    running = RunningMean()
    wins = torch.zeros(num_heads, dtype=torch.float64)
    for b, idx in enumerate(batch_indices(len(data), batch_size, generator), start=1):
        batch = data.batch(idx)
        nll, _, _ = predict_nll(encoder, volume(), batch, data)  # (B, M)
        loss, best = winner_take_all(nll)
        check_finite_loss(loss, STAGE, epoch, b)
        encoder_optimizer.zero_grad(set_to_none=True)
        decoder_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        encoder_optimizer.step()
        decoder_optimizer.step()
        n = int(idx.numel())
        running.add(float(loss.detach()), n)
        wins += head_usage(best.detach().cpu(), num_heads).double() * n
        if progress is not None:
            progress(n, float(loss.detach()))
    total = max(running.weight, 1.0)
    return EpochStats(
        loss=running.mean,
        num_images=int(running.weight),
        head_usage=(wins / total).tolist(),
    )


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def infer_best_poses(
    encoder: nn.Module, volume: nn.Module, data: TrainingData, *, batch_size: int = 256
) -> BestPoses:
    """Pose of each particle's best head (least NLL), in particle order, without gradients.

    The encoder runs in eval mode (batch-norm running statistics); its mode is restored after.
    """
    n = len(data)
    rotations, shifts, heads, losses = [], [], [], []
    with _eval_mode(encoder), torch.inference_mode():
        volume_ht = volume()
        for idx in torch.arange(n).split(batch_size):
            batch = data.batch(idx)
            nll, rot, sh = predict_nll(encoder, volume_ht, batch, data)  # (B, M), ...
            best_loss, best = nll.min(dim=1)  # (B,)
            rows = torch.arange(best.shape[0], device=best.device)
            rotations.append(rot[rows, best])  # (B, 3, 3)
            if sh is not None:
                shifts.append(sh[rows, best])  # (B, 2)
            heads.append(best)
            losses.append(best_loss)
    return BestPoses(
        rotations=torch.cat(rotations).clone(),
        shifts_px=torch.cat(shifts).clone() if shifts else None,
        best_head=torch.cat(heads).clone(),
        loss=torch.cat(losses).clone(),
    )
