"""What a training run writes into its run folder (names: :mod:`cryospin.rundir`).

After every epoch (:func:`write_epoch`): ``map.NNN.mrc`` (real-space map, voxel size set;
unless ``run.keep_epoch_maps`` is off), a line of ``metrics.jsonl`` (:func:`epoch_metrics`),
then ``checkpoint.pt``, the epoch's commit point (atomic; the previous one survives until the
new one is complete). ``pose_track.npz`` is written before it by
:class:`cryospin.train.track.PoseTracker`.

At the end (:func:`write_final`): ``map.mrc`` — with ``run.final_map = "backprojection"``
(default) the CTF-corrected Wiener backprojection of the training images from the final poses
(:func:`final_backprojection`; with ``model.symmetry`` each image inserted at its ``|G|``
symmetry-related poses), the trained volume kept as ``map_decoder.mrc`` and their FSC
as the convergence check ``convergence_fsc.json`` (:mod:`cryospin.train.convergence`; not a
resolution) — ``poses.star`` (RELION 3.1, every input column carried), ``poses.pkl``
(cryoDRGN) and, for a ``.cs`` input, ``poses.cs`` (with the scores as
:data:`~cryospin.train.scores.SCORE_CS_FIELD`). Shifts are written in the original
particles' pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import numpy as np
import torch

from cryospin.backproject import Symmetrize, backproject, backprojection_dtype
from cryospin.forward.ctf import CTFParams
from cryospin.io.cs import write_cryosparc
from cryospin.io.mrc import write_map
from cryospin.io.particle_set import ParticleSet
from cryospin.io.particles import load_indices, write_cryodrgn_poses, write_particles_star
from cryospin.io.pkl import write_indices_pkl
from cryospin.rundir import Checkpoint, EpochMetrics, RunFiles, Stage, append_metrics
from cryospin.symmetry import point_group_rotations
from cryospin.train.autoencode import EpochStats
from cryospin.train.config import Config
from cryospin.train.convergence import record_convergence_check
from cryospin.train.data import TrainingData
from cryospin.train.feedback import Feedback
from cryospin.train.metrics import EpochExtra
from cryospin.train.scores import (
    EMPTY_SCORE,
    SCORE_COLUMN,
    SCORE_CS_FIELD,
    score_alternative,
    selected_indices,
)
from cryospin.volume import HartleyVolume

__all__ = ["epoch_metrics", "write_epoch", "write_final", "final_backprojection"]

logger = logging.getLogger(__name__)


def epoch_metrics(
    stats: EpochStats,
    *,
    epoch: int,
    stage: Stage,
    wall_s: float,
    elapsed_s: float,
    decoder_lr: float,
    pose_lr: float | None,
    extra: EpochExtra,
    encoder_lr: float | None = None,
) -> EpochMetrics:
    """The ``metrics.jsonl`` line of ``epoch``; ``extra`` holds the switch's record (its
    ``head_usage`` stands for the epoch's when ``stats`` has none) and the search's stop."""
    usage = stats.head_usage
    if usage is None and "switch" in extra:
        usage = extra["switch"]["head_usage"]
    return EpochMetrics(
        epoch=epoch,
        stage=stage,
        loss=stats.loss,
        num_images=stats.num_images,
        wall_time_s=wall_s,
        images_per_s=stats.num_images / wall_s if wall_s > 0 else float("nan"),
        head_usage=usage,
        head_spread_deg=stats.head_spread_deg,
        mean_pose_change_deg=stats.mean_pose_change_deg,
        mean_shift_change_px=stats.mean_shift_change_px,
        decoder_lr=decoder_lr,
        pose_lr=pose_lr,
        elapsed_s=elapsed_s,
        jump_fraction=stats.jump_fraction,
        empty_fraction=stats.empty_fraction,
        junk_fraction=stats.junk_fraction,
        junk_weighted=stats.junk_weighted,
        encoder_lr=encoder_lr,
        extra=dict(extra),
    )


def write_epoch(files: RunFiles, volume: HartleyVolume, *, pixel_size_angstrom: float,
                keep_map: bool, metrics: EpochMetrics, checkpoint: Checkpoint) -> None:
    """``map.NNN.mrc`` (when ``keep_map``), the metrics line, then the checkpoint (the commit
    point of the epoch ``metrics.epoch``)."""
    if keep_map:
        with torch.no_grad():
            real = volume.to_real_space().detach().cpu()
        write_map(files.epoch_map(metrics.epoch), real.numpy(), pixel_size_angstrom)
    append_metrics(files.metrics, metrics)
    checkpoint.save(files.checkpoint)


def write_final(
    files: RunFiles,
    config: Config,
    particles: ParticleSet,
    data: TrainingData,
    volume: HartleyVolume,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None,
    *,
    feedback: Feedback | None = None,
    scores: torch.Tensor | None = None,
    junk_scored: bool = False,
) -> None:
    """The final outputs (module docstring) from the final poses, `(N, 3, 3)` and `(N, 2)`
    in training pixels (None: no shifts), of ``particles`` (a ``ParticleSet``); with the
    particles' ``scores`` `(N,)` (:mod:`cryospin.train.scores`), also their column in
    ``poses.star`` (and field in ``poses.cs``) and ``selected.pkl``; ``junk_scored``: the
    scores are taken against junk too (:func:`cryospin.train.scores.particle_scores`)."""
    with torch.no_grad():
        real = volume.to_real_space().detach().cpu()
    against = score_alternative(junk_scored)
    if config.run.final_map == "backprojection":
        write_map(files.map_decoder, real.numpy(), data.pixel_size_angstrom)
        trained = real
        keep = None
        if (config.model.empty_class or junk_scored) and scores is not None:
            keep = selected_indices(scores)  # rows of this run's particles
            if keep.size < 2:
                logger.warning("%s above %s: the final map uses all %d",
                               "no particle scores" if keep.size == 0 else "only 1 particle scores",
                               against, rotations.shape[0])
            if keep.size < 2 or keep.size == rotations.shape[0]:
                keep = None
        with (feedback or Feedback()).start(
                "final map: backprojection",
                rotations.shape[0] if keep is None else int(keep.size)) as progress:
            real = final_backprojection(particles, data, rotations, shifts_px,
                                        seed=config.run.seed, on_batch=progress.update,
                                        symmetry=volume.point_group, keep=keep,
                                        against=against)
        # logged and written as a convergence check, never as a resolution (use --halves)
        record_convergence_check(files.convergence, real, trained,
                                 pixel_size_angstrom=data.pixel_size_angstrom,
                                 final_name=files.map.name, trained_name=files.map_decoder.name)
    write_map(files.map, real.numpy(), data.pixel_size_angstrom)
    shifts = shifts_px if shifts_px is not None else torch.zeros(rotations.shape[0], 2)
    # shifts in the ORIGINAL particles' pixels (training pixels are L/box_px times larger)
    shifts = shifts * (int(particles.box_px) / data.box_px)
    final = particles.with_poses(rotations, shifts)
    columns = None if scores is None else {SCORE_COLUMN: np.round(scores.double().numpy(), 3)}
    write_particles_star(files.star, final, relative_to=config.input.relative_to,
                         columns=columns)
    write_cryodrgn_poses(files.pkl, rotations, shifts, int(particles.box_px))
    if final.cs_table is not None:  # a .cs input: its rows with the new poses (and scores)
        write_cryosparc(files.cs, final, fields=None if columns is None
                        else {SCORE_CS_FIELD: columns[SCORE_COLUMN]})
    logger.info("wrote %s, %s and %s", files.map, files.star, files.pkl)
    if scores is not None:
        _write_selection(files, scores, config.input.ind, against)


def _write_selection(files: RunFiles, scores: torch.Tensor, ind: str | None,
                     against: str = "an empty image") -> None:
    """``selected.pkl`` from the particles' ``scores`` `(N,)` (indices in the input, through
    the run's index file ``ind``), and one log line."""
    above = scores.numpy() > EMPTY_SCORE
    selected = selected_indices(scores, None if ind is None else load_indices(ind))
    write_indices_pkl(files.selected, selected)
    n, kept = int(scores.numel()), int(selected.size)
    head = (f"particle scores ({SCORE_COLUMN} in {files.star.name}): {n - kept:,} of {n:,} "
            f"particles ({100.0 * (n - kept) / max(n, 1):.1f} %) fit the map no better than "
            f"{against} (score <= {EMPTY_SCORE:g} nats")
    via = "" if ind is None else ", through this run's --ind"
    if kept:
        logger.info("%s; median score of the others %.3g); %s lists the other %s (0-based in "
                    "the input%s, for --ind)", head, float(np.median(scores.numpy()[above])),
                    files.selected.name, f"{kept:,}", via)
    else:
        logger.warning("%s); %s is empty: no particle to select", head, files.selected.name)


class _TrainingImages:
    """The images as trained on (cropped, normalised, contrast-corrected; not the encoder's
    input mask) as an ``.images(idx)`` source, read from ``data.source``."""

    def __init__(self, data: TrainingData, rows: torch.Tensor | None = None) -> None:
        if data.source is None:  # prepare_data always gives one
            raise ValueError("the training data have no image source")
        self.source = data.source
        self.scale = float(data.image_scale)
        self.box_px = data.box_px
        self.rows = rows  # (K,) particle of each index, None: index = particle

    def images(self, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.rows is not None:
            idx = self.rows[idx]
        return self.source.images(idx).to(torch.float64) * self.scale


def final_backprojection(
    particles: ParticleSet,
    data: TrainingData,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None,
    *,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    symmetry: str = "C1",
    keep: np.ndarray | None = None,
    against: str = "an empty image",
    label: str = "final map",
    poses: str = "final",
    symmetrize: Symmetrize = "insert",
    radius_px: float | None = None,
) -> torch.Tensor:
    """The final map: Wiener backprojection of the training images from the final poses.

    Parameters
    ----------
    particles : ParticleSet
        The particles (CTF parameters when ``data.source`` has none).
    data : TrainingData
        The images exactly as trained on (``data.source``: cropped, normalised,
        contrast-corrected by ``data.image_scale``).
    rotations : `(N, 3, 3)`
        Final poses (cryospin convention).
    shifts_px : `(N, 2)` or None
        Final shifts ``(tx, ty)`` in the training frame's pixels.
    seed : int
        Seed of the half-set split that estimates the Wiener filter's SNR.
    on_batch : callable, optional
        Called after each batch of the backprojection with its number of images.
    symmetry : str
        Point group (:mod:`cryospin.symmetry`): each image is inserted at its ``|G|``
        symmetry-related poses ``R g`` (``"C1"``: once), or with ``symmetrize="resample"``
        once and the sums averaged over the group (inexact, faster:
        :func:`cryospin.backproject.accumulate_backprojection`).
    keep : `(K,)` int64, optional
        Backproject only these particles (0-based, ``K >= 2``; the half-set split is then
        that of ``K`` particles); None: all.
    against : str
        For the log line: what the left-out particles fit as well as the map.
    label, poses : str
        What the log line calls the map and the poses.
    radius_px : float, optional
        A low-pass map: the shells ``round(|k|) <= radius_px`` (cycles per box of the
        training box) only, zero beyond (:func:`cryospin.backproject.backproject`); None:
        every frequency.

    Returns
    -------
    `(L, L, L)` float32 real-space map on the CPU (same arbitrary scale as the training
    images), computed on ``data.device`` in float64 (float32 on MPS, which has no float64).

    Notes
    -----
    The Wiener term comes from the FSC between two half sets of this one backprojection;
    the poses were refined against a common reference, so that FSC is not a gold-standard
    resolution estimate (use ``--halves`` for one) and is not reported.
    """
    source = data.source if data.source is not None else particles
    # a training source's CTF table is the particles' CTFParams (ParticleSet and its views)
    ctf = cast("CTFParams | None", source.ctf if data.use_ctf else None)
    images = _TrainingImages(data)
    n = rotations.shape[0]
    if keep is not None:
        rows = torch.as_tensor(np.asarray(keep, dtype=np.int64))
        rotations = rotations[rows]
        shifts_px = None if shifts_px is None else shifts_px[rows]
        ctf = None if ctf is None else ctf[rows]
        images = _TrainingImages(data, rows)
    group = point_group_rotations(symmetry)  # (G, 3, 3)
    device = data.device  # the training device: a GPU run backprojects on its GPU
    dtype = backprojection_dtype(device)
    result = backproject(
        images, rotations.detach().to(device, dtype),
        None if shifts_px is None else shifts_px.detach().to(device, dtype), ctf, dtype=dtype,
        box_px=data.box_px, pixel_size_angstrom=data.pixel_size_angstrom, seed=seed,
        on_batch=on_batch, symmetry=group if group.shape[0] > 1 else None,
        symmetrize=symmetrize, radius_px=radius_px,
    )
    logger.info("%s: Wiener backprojection of %s images from the %s poses%s%s%s", label,
                f"{rotations.shape[0]:,}", poses,
                "" if radius_px is None else f", up to {radius_px:g} cycles/box",
                "" if group.shape[0] == 1 else f", symmetry {symmetry}" + (
                    " (each image inserted once, the sums averaged over the group)"
                    if symmetrize == "resample" else ""),
                "" if keep is None else
                f" ({n - rotations.shape[0]:,} scoring no better than {against} left out)")
    return result.volume.float().cpu()
