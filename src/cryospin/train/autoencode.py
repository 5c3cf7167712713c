"""Stage 1 (auto-encoding): the multi-head encoder and the volume trained jointly.

For a batch of ``B`` images the encoder proposes ``M`` poses per image; the volume renders all
``B × M`` predictions in one call (``render`` on `(B, M, 3, 3)` rotations), each is compared with
the observation by the Gaussian NLL over the loss disc, and only the best head of each image
contributes to the loss (winner-take-all). Since only the winners carry a gradient, the
``B × M`` scoring runs without autograd and the ``B`` winners are rendered again with it
(:func:`winner_nll`: the same loss and gradient, a fraction of the backward pass). One Adam
step of the encoder and one of the volume follow. :func:`infer_best_poses` is the inference
pass at the switch to stage 2.

``M`` is the encoder's number of hypotheses (``encoder.num_heads``): the heads of a
:class:`~cryospin.encoder.MultiHeadPoseEncoder`, or twice as many for an
:class:`~cryospin.encoder.InPlaneFlipEncoder` (``--method cryoai``: each head's pose and its
180° in-plane partner, :func:`~cryospin.encoder.in_plane_flip_hypotheses`). Nothing here
depends on the method: the expansion is done by the encoder, the choice by winner-take-all.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from cryospin.encoder import EncoderOutput, MultiHeadPoseEncoder
from cryospin.forward.model import render
from cryospin.losses import gaussian_nll, head_spread_deg, head_usage
from cryospin.rundir import Stage
from cryospin.train.data import (
    Batch,
    LossDisc,
    TrainingData,
    gaussian_lowpass,
    sub_disc,
)
from cryospin.train.distributed import Shard, local_batches
from cryospin.train.metrics import RunningMean, check_finite_gradients, check_finite_loss

__all__ = [
    "eval_mode",
    "EpochStats",
    "BestPoses",
    "autoencode_epoch",
    "HeadPoses",
    "infer_best_poses",
    "infer_head_poses",
    "predict_nll",
    "Winners",
    "winner_nll",
]


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
    head_spread_deg : list[float] or None
        Per head, the image-weighted mean over the epoch's batches of
        :func:`cryospin.losses.head_spread_deg` (stage 1; 0: one rotation for every image).
    mean_pose_change_deg : float or None
        Mean geodesic change of a visited particle's rotation during the epoch (stage 2).
    mean_shift_change_px : float or None
        Mean Euclidean change of a visited particle's shift (stage 2 with shifts).
    jump_fraction : float or None
        Fraction of the visited particles whose rotation moved by more than
        :data:`cryospin.train.autodecode.JUMP_THRESHOLD_DEG` during the epoch: basin jumps,
        not local refinement (stage 2).
    relaxed_fraction : float or None
        Fraction of the visited particles moved to another copy of their pose under a relaxed
        pseudo-symmetry (stage 2 with ``model.relax_symmetry``).
    empty_fraction : float or None
        Fraction of the visited images likeliest empty (stage 2 with ``model.empty_class``
        or ``model.junk_class``).
    junk_fraction : float or None
        Fraction of the visited images likeliest junk (stage 2 with ``model.junk_class``).
    junk_weighted : bool or None
        Whether the junk class weighed in this epoch (stage 2 with ``model.junk_class``).
    """

    loss: float
    num_images: int
    head_usage: list[float] | None = None
    head_spread_deg: list[float] | None = None
    mean_pose_change_deg: float | None = None
    mean_shift_change_px: float | None = None
    jump_fraction: float | None = None
    relaxed_fraction: float | None = None
    empty_fraction: float | None = None
    junk_fraction: float | None = None
    junk_weighted: bool | None = None


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

    @staticmethod
    def empty(num_particles: int, with_shifts: bool, device: torch.device) -> BestPoses:
        """Buffers for ``num_particles`` rows to be filled (identity rotations, zero shifts,
        head -1, loss NaN: the rows no batch wrote)."""
        n = int(num_particles)
        return BestPoses(
            rotations=torch.eye(3, device=device).repeat(n, 1, 1),
            shifts_px=torch.zeros(n, 2, device=device) if with_shifts else None,
            best_head=torch.full((n,), -1, dtype=torch.int64, device=device),
            loss=torch.full((n,), float("nan"), device=device),
        )

    def state_dict(self) -> dict[str, Tensor | None]:
        """The tensors on the CPU, for a checkpoint (:meth:`from_state_dict`)."""
        return {"rotations": self.rotations.cpu(), "best_head": self.best_head.cpu(),
                "loss": self.loss.cpu(),
                "shifts_px": None if self.shifts_px is None else self.shifts_px.cpu()}

    @staticmethod
    def from_state_dict(state: Mapping[str, Tensor | None], device: torch.device) -> BestPoses:
        """The inverse of :meth:`state_dict`, on ``device``."""
        def tensor(key: str) -> Tensor:
            value = state[key]
            if value is None:
                raise ValueError(f"a BestPoses state needs {key}")
            return value.to(device)

        shifts = state.get("shifts_px")
        return BestPoses(tensor("rotations"), None if shifts is None else shifts.to(device),
                         tensor("best_head"), tensor("loss"))

    def rows(self, indices: Tensor) -> BestPoses:
        """The rows ``indices`` `(n,)`, in that order."""
        idx = indices.to(self.loss.device)
        return BestPoses(self.rotations[idx], None if self.shifts_px is None
                         else self.shifts_px[idx], self.best_head[idx], self.loss[idx])

    def write(self, indices: Tensor, rotations: Tensor, shifts_px: Tensor | None,
              best_head: Tensor, loss: Tensor) -> None:
        """Store the winners of a batch (rows ``indices`` `(B,)`; values detached)."""
        idx = indices.to(self.loss.device)
        self.rotations[idx] = rotations.detach().to(self.rotations)
        if self.shifts_px is not None and shifts_px is not None:
            self.shifts_px[idx] = shifts_px.detach().to(self.shifts_px)
        self.best_head[idx] = best_head.to(self.best_head)
        self.loss[idx] = loss.detach().to(self.loss)


def _encoder_input(batch: Batch, disc: LossDisc | None, lowpass: bool) -> Tensor:
    """The encoder's input `(B, L, L)`: the images, Gaussian low-passed at the disc radius."""
    if not lowpass or disc is None:
        return batch.images
    return gaussian_lowpass(batch.images, disc.radius_px)


@dataclass(frozen=True)
class _Hypotheses:
    """The encoder's output for a batch and what scoring it needs, on the loss (sub-)disc."""

    out: EncoderOutput
    batch: Batch  # restricted to the disc
    frequencies: Tensor  # (P, 2)
    negation_index: Tensor  # (P,)
    ctf: Tensor | None  # (B, 1, P)


def _hypotheses(encoder: nn.Module, batch: Batch, data: TrainingData, disc: LossDisc | None,
                lowpass_input: bool) -> _Hypotheses:
    out = encoder(_encoder_input(batch, disc, lowpass_input))
    freqs, neg = data.frequencies, data.negation_index
    if disc is not None:
        batch = batch.restrict(disc)
        freqs, neg = disc.frequencies, disc.negation_index
    ctf = None if batch.ctf is None else batch.ctf[:, None, :]  # (B, 1, P)
    return _Hypotheses(out, batch, freqs, neg, ctf)


def predict_nll(
    encoder: nn.Module,
    volume_ht: Tensor,
    batch: Batch,
    data: TrainingData,
    disc: LossDisc | None = None,
    *,
    lowpass_input: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """NLL of every head for a batch.

    Parameters
    ----------
    encoder : MultiHeadPoseEncoder
    volume_ht : `(L, L, L)`
        Hartley volume (``volume()``).
    batch : Batch
        On the full training disc.
    data : TrainingData
    disc : LossDisc, optional
        Evaluate the NLL on this sub-disc only (frequency marching).
    lowpass_input : bool
        Low-pass the encoder's input with a Gaussian of ``σ = disc.radius_px``.

    Returns
    -------
    nll : `(B, M)`
    rotations : `(B, M, 3, 3)`
    shifts_px : `(B, M, 2)` or None
    """
    h = _hypotheses(encoder, batch, data, disc, lowpass_input)
    pred = render(volume_ht, h.out.rotations, h.out.shifts_px, h.ctf,
                  frequencies=h.frequencies, negation_index=h.negation_index)  # (B, M, P)
    nll = gaussian_nll(pred, h.batch.hartley, data.noise_variance)  # (B, M)
    return nll, h.out.rotations, h.out.shifts_px


class Winners(NamedTuple):
    """:func:`winner_nll`'s result for a batch of ``B`` images and ``M`` hypotheses."""

    nll: Tensor  # (B,) the winning head's NLL (differentiable)
    best_head: Tensor  # (B,) int64
    rotations: Tensor  # (B, 3, 3) the winning head's rotation
    shifts_px: Tensor | None  # (B, 2)
    hypotheses: Tensor  # (B, M, 3, 3) every head's rotation, detached


def winner_nll(
    encoder: nn.Module,
    volume_ht: Tensor,
    batch: Batch,
    data: TrainingData,
    disc: LossDisc | None = None,
    *,
    lowpass_input: bool = False,
) -> Winners:
    """NLL of each image's best head, differentiable, rendering the others without gradients.

    The same value and gradient as ``predict_nll(...)[0].min(dim=1)`` (the gradient of a
    minimum reaches only its argmin), at a fraction of the cost: all ``B × M`` hypotheses are
    rendered and scored without building a graph, then only the ``B`` winners are rendered
    again with one (a stage-1 step renders and backpropagates ``B`` slices instead of
    ``B × M``).

    Parameters
    ----------
    encoder, volume_ht, batch, data, disc, lowpass_input
        As in :func:`predict_nll`.

    Returns
    -------
    Winners
        ``nll`` `(B,)`: the winning head's NLL of every image (gradients to the encoder and
        the volume); ``best_head`` `(B,)` int64: its index (ties: the lowest);
        ``rotations`` `(B, 3, 3)` and ``shifts_px`` `(B, 2)` or None: its pose;
        ``hypotheses`` `(B, M, 3, 3)`: every head's rotation (detached; diagnostics).
    """
    h = _hypotheses(encoder, batch, data, disc, lowpass_input)
    rotations, shifts = h.out.rotations, h.out.shifts_px
    with torch.no_grad():
        pred = render(volume_ht.detach(), rotations.detach(),
                      None if shifts is None else shifts.detach(), h.ctf,
                      frequencies=h.frequencies, negation_index=h.negation_index)  # (B, M, P)
        best = gaussian_nll(pred, h.batch.hartley, data.noise_variance).argmin(dim=1)  # (B,)
        del pred
    rows = torch.arange(best.shape[0], device=best.device)
    rot_best = rotations[rows, best]  # (B, 3, 3)
    shift_best = None if shifts is None else shifts[rows, best]  # (B, 2)
    pred_best = render(
        volume_ht,
        rot_best[:, None],  # (B, 1, 3, 3)
        None if shift_best is None else shift_best[:, None],  # (B, 1, 2)
        h.ctf,
        frequencies=h.frequencies,
        negation_index=h.negation_index,
    )  # (B, 1, P)
    nll = gaussian_nll(pred_best, h.batch.hartley, data.noise_variance)[:, 0]  # (B,)
    return Winners(nll, best, rot_best, shift_best, rotations.detach())


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
    loss_radius: Callable[[int], float | None] | None = None,
    lowpass_input: bool = False,
    shard: Shard | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    record: BestPoses | None = None,
    max_batches: int | None = None,
    encoder_lr: Callable[[int], float] | None = None,
) -> EpochStats:
    """One pass over the particles in random order (drawn from ``generator``), or its first
    ``max_batches`` batches.

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
    loss_radius : callable, optional
        ``loss_radius(b)`` is the loss radius (cycles per box) of batch ``b`` (1-based) of the
        epoch, or None for the full training disc (frequency marching).
    lowpass_input : bool
        Low-pass the encoder's input at the loss radius (see :func:`predict_nll`).
    shard : cryospin.train.distributed.Shard, optional
        Distributed run: this rank trains on its particles of each global batch, ``encoder``
        is the DDP-wrapped encoder, the volume gradients are averaged over the ranks and the
        returned statistics are those of all ranks.
    grad_scaler : torch.amp.GradScaler, optional
        Loss scaling for an fp16 encoder trunk: the objective is scaled before ``backward``,
        the gradients unscaled before the optimisers step, and a step whose scaled gradients
        overflowed is skipped (the scaler's job, so no NonFiniteGradientError then).
    record : BestPoses, optional
        Rows (particle indices) into which each batch writes its images' winning head, pose
        and NLL as trained on (the switch may start from them instead of an inference pass).
    max_batches : int, optional
        Stop after this many batches (a stage-1 step budget ending inside the epoch; the
        batch order is drawn for the whole epoch all the same).
    encoder_lr : callable, optional
        ``encoder_lr(b)`` is the encoder's learning rate for batch ``b`` (1-based) of the epoch
        (set on ``encoder_optimizer`` before its step); None: left as it is.

    Raises
    ------
    NonFiniteLossError
        If a batch loss is NaN/Inf (before any parameter is updated with it).
    NonFiniteGradientError
        If a gradient of the encoder or the volume is NaN/Inf (before the optimiser steps;
        not with ``grad_scaler``).
    """
    encoder.train()
    discs: dict[int, LossDisc] = {}
    unwrapped = cast(MultiHeadPoseEncoder, getattr(encoder, "module", encoder))  # DDP wraps it
    num_heads = int(unwrapped.num_heads)
    running = RunningMean()
    wins = torch.zeros(num_heads, dtype=torch.float64)
    spread = torch.zeros(num_heads, dtype=torch.float64)
    spread_weight = 0.0
    batches = data.epoch_batches(batch_size, generator)
    steps = local_batches(batches, shard)
    if max_batches is not None:
        steps = itertools.islice(steps, max(int(max_batches), 0))
    for b, (batch, global_size) in enumerate(steps, start=1):
        idx = batch.indices
        radius = None if loss_radius is None else loss_radius(b)
        disc = None
        if radius is not None:
            key = round(radius * 1000)
            if key not in discs:
                discs[key] = sub_disc(data.frequencies, data.box_px, radius)
            disc = discs[key]
        best_nll, best, best_rot, best_shift, hypotheses = winner_nll(
            encoder, volume(), batch, data, disc, lowpass_input=lowpass_input
        )  # (B,), (B,), ...: winner-take-all over the heads
        if record is not None:
            record.write(idx, best_rot, best_shift, best, best_nll)
        if shard is None:
            loss = best_nll.mean()
            objective = loss
        else:  # this rank's share of the global batch mean
            objective = shard.objective(best_nll, global_size)
            loss = best_nll.detach().mean() if best_nll.numel() else objective.detach()
        check_finite_loss(objective, Stage.AUTOENCODE, epoch, b)
        if encoder_lr is not None:
            for group in encoder_optimizer.param_groups:
                group["lr"] = encoder_lr(b)
        _step(objective, encoder, volume, encoder_optimizer, decoder_optimizer,
              shard=shard, grad_scaler=grad_scaler, epoch=epoch, batch=b)
        n = int(idx.numel())
        running.add(float(loss.detach()), n)
        wins += head_usage(best.detach().cpu(), num_heads).double() * n
        if n >= 2:
            spread += head_spread_deg(hypotheses) * n
            spread_weight += n
        if progress is not None:
            progress(n, float(loss.detach()))
    if shard is not None:  # statistics of all ranks
        sums = shard.all_sum(torch.cat([torch.tensor([running.total, running.weight,
                                                      spread_weight]), wins, spread]))
        running.total, running.weight, spread_weight = (float(x) for x in sums[:3])
        wins, spread = sums[3:3 + num_heads], sums[3 + num_heads:]
    total = max(running.weight, 1.0)
    return EpochStats(
        loss=running.mean,
        num_images=int(running.weight),
        head_usage=(wins / total).tolist(),
        head_spread_deg=(spread / spread_weight).tolist() if spread_weight > 0 else None,
    )


def _step(
    objective: Tensor,
    encoder: nn.Module,
    volume: nn.Module,
    encoder_optimizer: torch.optim.Optimizer,
    decoder_optimizer: torch.optim.Optimizer,
    *,
    shard: Shard | None,
    grad_scaler: torch.amp.GradScaler | None,
    epoch: int,
    batch: int,
) -> None:
    """Backpropagate ``objective`` and step both optimisers: the volume's gradients averaged
    over the ranks (the encoder's are, by DDP); without ``grad_scaler``, a non-finite gradient
    raises before any parameter moves; with it, a step with overflowed gradients is skipped
    and the scale lowered."""
    encoder_optimizer.zero_grad(set_to_none=True)
    decoder_optimizer.zero_grad(set_to_none=True)
    if grad_scaler is None:
        objective.backward()
    else:
        grad_scaler.scale(objective).backward()
    if shard is not None:  # the encoder's gradients are averaged by DDP
        shard.average_gradients(volume.parameters())
    if grad_scaler is None:
        check_finite_gradients(
            {"encoder": (p.grad for p in encoder.parameters()),
             "volume": (p.grad for p in volume.parameters())},
            Stage.AUTOENCODE, epoch, batch,
        )
        encoder_optimizer.step()
        decoder_optimizer.step()
    else:
        grad_scaler.step(encoder_optimizer)
        grad_scaler.step(decoder_optimizer)
        grad_scaler.update()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then back to its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass(frozen=True)
class HeadPoses:
    """The ``K`` lowest-NLL heads of each particle (:func:`infer_head_poses`), best first.

    Attributes
    ----------
    rotations : `(N, K, 3, 3)` float32
    shifts_px : `(N, K, 2)` float32 or None
    heads : `(N, K)` int64
        Head numbers, in order of increasing NLL.
    loss : `(N, K)` float32
        Their NLL.
    """

    rotations: Tensor
    shifts_px: Tensor | None
    heads: Tensor
    loss: Tensor

    def best(self) -> BestPoses:
        """Each particle's best head (column 0)."""
        return BestPoses(rotations=self.rotations[:, 0], best_head=self.heads[:, 0],
                         shifts_px=None if self.shifts_px is None else self.shifts_px[:, 0],
                         loss=self.loss[:, 0])


def infer_best_poses(
    encoder: nn.Module,
    volume: nn.Module,
    data: TrainingData,
    *,
    batch_size: int = 256,
    loss_radius_px: float | None = None,
    lowpass_input: bool = False,
    indices: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> BestPoses:
    """Pose of each particle's best head (least NLL), in particle order, without gradients:
    :func:`infer_head_poses` with ``keep = 1``."""
    return infer_head_poses(encoder, volume, data, keep=1, batch_size=batch_size,
                            loss_radius_px=loss_radius_px, lowpass_input=lowpass_input,
                            indices=indices, progress=progress).best()


def infer_head_poses(
    encoder: nn.Module,
    volume: nn.Module,
    data: TrainingData,
    *,
    keep: int,
    batch_size: int = 256,
    loss_radius_px: float | None = None,
    lowpass_input: bool = False,
    indices: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> HeadPoses:
    """Poses of each particle's ``keep`` lowest-NLL heads, in particle order, without gradients.

    The encoder runs in eval mode (batch-norm running statistics); its mode is restored after.
    ``loss_radius_px`` and ``lowpass_input`` are those of the last stage-1 step (see
    :func:`predict_nll`); None uses the full training disc. ``indices`` `(n,)` restricts the
    pass to those particles (results in that order; a distributed rank's own particles).
    ``progress`` is called after each batch with its number of images.
    """
    disc = None
    if loss_radius_px is not None:
        disc = sub_disc(data.frequencies, data.box_px, loss_radius_px)
    order = torch.arange(len(data)) if indices is None else indices.cpu()
    # Results go into tensors allocated once: per-batch small tensors kept in lists, interleaved
    # with the batch's large temporaries, fragmented glibc's heap and the resident memory grew
    # with every batch (+685 MB over 140,000 streamed particles; benchmarks/RESULTS.md "Scale").
    n, dev, k = len(order), data.device, int(keep)
    rotations = torch.empty(n, k, 3, 3, device=dev)
    shifts: Tensor | None = None
    heads = torch.empty(n, k, dtype=torch.int64, device=dev)
    losses = torch.empty(n, k, device=dev)
    with eval_mode(encoder), torch.inference_mode():
        volume_ht = volume()
        start = 0
        for idx in order.split(batch_size):
            batch = data.batch(idx)
            nll, rot, sh = predict_nll(
                encoder, volume_ht, batch, data, disc, lowpass_input=lowpass_input
            )  # (B, M), ...
            best_loss, best = nll.topk(k, dim=1, largest=False)  # (B, K), ascending
            rows = torch.arange(best.shape[0], device=best.device)[:, None]  # (B, 1)
            stop = start + len(idx)
            rotations[start:stop] = rot[rows, best]  # (B, K, 3, 3)
            if sh is not None:
                if shifts is None:
                    shifts = torch.empty(n, k, 2, device=dev)
                shifts[start:stop] = sh[rows, best]  # (B, K, 2)
            heads[start:stop] = best
            losses[start:stop] = best_loss
            start = stop
            if progress is not None:
                progress(len(idx))
    return HeadPoses(rotations=rotations, shifts_px=shifts, heads=heads, loss=losses)
