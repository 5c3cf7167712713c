"""Approximate pose posterior over view directions, on a HEALPix grid (paper Figs. 4–5, 7–8).

For one image ``y`` with CTF ``c`` and shift ``t``, the Gaussian image model of training
(:func:`cryospin.losses.gaussian_nll`, noise variance ``σ²`` per Hartley coefficient) gives
``log p(y | R) = −NLL(R) + const``. With a uniform prior on SO(3), parametrised by a view
direction ``v`` (third row of ``R``, ``docs/conventions.md``) and an in-plane angle ``ψ``,

    log p(v | y) = logsumexp_ψ(−NLL(R(v, ψ))) − log S − logsumexp_v(...)       (normalised),

with ``v`` the centres of the ``12·nside²`` equal-area HEALPix pixels and ``ψ`` ``S`` equally
spaced angles. ``R(v, ψ)`` is RELION's Euler matrix with ``rot = φ``, ``tilt = θ`` of ``v`` and
``psi = ψ`` (its third row is ``v``). "Approximate": the shift is held fixed and the integrals
are sums over grids.

The HEALPix grid is :mod:`cryospin.healpix`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.lattice import negation_permutation
from cryospin.forward.model import render
from cryospin.healpix import check_nside, healpix_vectors
from cryospin.io.particle_set import ParticleSet
from cryospin.io.particles import load_particles
from cryospin.losses import gaussian_nll
from cryospin.rotations import relion_matrix_from_euler
from cryospin.rundir import Checkpoint, RunFiles
from cryospin.train.config import load_config
from cryospin.train.data import prepare_data, sub_disc
from cryospin.train.track import PoseTrack, load_pose_track
from cryospin.volume import HartleyVolume

__all__ = [
    "view_rotations",
    "log_posterior_views",
    "ParticlePosterior",
    "run_posteriors",
]


# ---------------------------------------------------------------------------- posterior
def view_rotations(directions: Tensor, psi_rad: Tensor) -> Tensor:
    """Rotations with third row ``directions`` and in-plane angle ``ψ``, `(D, S, 3, 3)`.

    ``R = Rz(ψ)·Ry(θ)·Rz(φ)`` (RELION's Euler matrix, ``docs/conventions.md``) with ``θ, φ``
    the colatitude and longitude of each direction `(D, 3)` (unit vectors); ``psi_rad`` `(S,)`.
    Dtype and device of ``directions``.
    """
    v = directions / directions.norm(dim=-1, keepdim=True)
    theta = torch.acos(v[:, 2].clamp(-1.0, 1.0))  # (D,)
    phi = torch.atan2(v[:, 1], v[:, 0])  # (D,)
    psi = psi_rad.to(v)
    D, S = v.shape[0], psi.shape[0]
    return relion_matrix_from_euler(
        torch.rad2deg(phi)[:, None].expand(D, S),
        torch.rad2deg(theta)[:, None].expand(D, S),
        torch.rad2deg(psi)[None, :].expand(D, S),
    )  # (D, S, 3, 3)


def log_posterior_views(
    volume_ht: Tensor,
    observed: Tensor,
    noise_variance: float,
    frequencies: Tensor,
    directions: Tensor,
    *,
    psi_steps: int = 36,
    ctf: Tensor | None = None,
    shift_px: Tensor | None = None,
    negation_index: Tensor | None = None,
    chunk: int = 2048,
) -> Tensor:
    """Normalised log posterior of one image over view directions (in-plane marginalised).

    Parameters
    ----------
    volume_ht : `(L, L, L)`
        Hartley volume (``HartleyVolume()``).
    observed : `(P,)`
        The image's Hartley values on ``frequencies``, scaled as in training.
    noise_variance : float
        ``σ²`` per Hartley coefficient (training's ``TrainingData.noise_variance``).
    frequencies : `(P, 2)`
        ``(kx, ky)`` cycles per box (closed under ``k → −k`` when ``shift_px`` is given).
    directions : `(D, 3)`
        View directions (e.g. :func:`cryospin.healpix.healpix_vectors`), treated as equal-area
        cells.
    psi_steps : int
        ``S`` in-plane angles ``ψ = 2π s / S``, ``s = 0 … S−1``.
    ctf : `(P,)`, optional
    shift_px : `(2,)`, optional
        Fixed shift ``(tx, ty)`` in pixels.
    negation_index : `(P,)`, optional
        ``negation_permutation(frequencies, L)``.
    chunk : int
        Rotations rendered per call (bounds memory).

    Returns
    -------
    `(D,)` float64: ``log p(v | y)`` with ``logsumexp = 0`` (the images are rendered and
    scored in the dtype of ``volume_ht``, e.g. float32 as in training).
    """
    if psi_steps < 1:
        raise ValueError(f"psi_steps must be >= 1, got {psi_steps}")
    dtype, device = volume_ht.dtype, volume_ht.device
    psi = torch.arange(psi_steps, dtype=torch.float64) * (2 * math.pi / psi_steps)
    R = view_rotations(directions.to(device=device, dtype=torch.float64), psi.to(device))
    D = R.shape[0]
    flat = R.reshape(-1, 3, 3).to(dtype)  # (D S, 3, 3)
    obs = observed.to(device=device, dtype=dtype)[None]  # (1, P)
    freqs = frequencies.to(device)
    out = []
    with torch.no_grad():
        for part in flat.split(chunk):
            sh = None if shift_px is None else shift_px.to(device, dtype).expand(part.shape[0], 2)
            pred = render(volume_ht, part, sh, None if ctf is None else ctf.to(device, dtype),
                          frequencies=freqs, negation_index=negation_index)  # (C, P)
            out.append(-gaussian_nll(pred[None], obs, noise_variance)[0])  # (C,)
    loglik = torch.cat(out).double().reshape(D, psi_steps)  # (D, S)
    marginal = torch.logsumexp(loglik, dim=1) - math.log(psi_steps)  # (D,)
    return marginal - torch.logsumexp(marginal, dim=0)


# ---------------------------------------------------------------------------- run folders
@dataclass(frozen=True)
class ParticlePosterior:
    """The view posterior of one particle of a run, with what the plot overlays.

    Attributes
    ----------
    particle : int
        Index in the run's particle set.
    log_posterior : `(12 nside²,)` float64
        Normalised over the HEALPix pixels (RING order).
    final_rotation : `(3, 3)` float64 or None
        The run's current pose of the particle (pose table of the checkpoint, or the last
        tracked epoch / ``poses.star`` of a run that never switched).
    shift_px : `(2,)` float64
        The shift used (the run's current shift, or 0).
    head_rotations : `(M, 3, 3)` float64 or None
        Every head's prediction at the last tracked stage-1 epoch (None if not tracked).
    head_losses : `(M,)` float64 or None
    head_epoch : int or None
    path_rotations : `(E2, 3, 3)` float64 or None
        The particle's pose at the end of each tracked stage-2 epoch.
    path_epochs : `(E2,)` int64 or None
    """

    particle: int
    log_posterior: np.ndarray
    final_rotation: np.ndarray | None
    shift_px: np.ndarray
    head_rotations: np.ndarray | None = None
    head_losses: np.ndarray | None = None
    head_epoch: int | None = None
    path_rotations: np.ndarray | None = None
    path_epochs: np.ndarray | None = None


def _read_track(files: RunFiles) -> PoseTrack | None:
    return load_pose_track(files.track) if files.track.is_file() else None


def run_posteriors(
    run_dir: str | Path,
    particles: ParticleSet,
    indices: list[int],
    *,
    nside: int = 8,
    psi_steps: int = 36,
    loss_radius_px: float | None = None,
) -> list[ParticlePosterior]:
    """View posteriors of particles ``indices`` of a run, with the run's trained volume.

    Reads ``RUN_DIR/config.yaml``, ``checkpoint.pt`` (volume, pose table, the training's image
    scale and noise variance) and, when present, ``pose_track.npz``. The images are prepared
    exactly as in training (:func:`cryospin.train.data.prepare_data` on the subset, rescaled to
    the training's ``image_scale``); the NLL is the training's, on its loss disc (or on the
    smaller disc ``|k| ≤ loss_radius_px``).

    Parameters
    ----------
    particles : ParticleSet
        The run's particle set (same order as in training).
    indices : list of int
        0-based particle indices.

    Raises
    ------
    InputError
        Missing run files, indices out of range, or a loss radius outside the training disc.
    """
    files = RunFiles(run_dir)
    check_nside(nside)
    if psi_steps < 1:
        raise InputError(f"--psi-steps must be >= 1, got {psi_steps}")
    n = len(particles)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise InputError(f"particle index {bad[0]} is outside 0..{n - 1}", particles.source)
    config = load_config(files.config)
    if not files.checkpoint.is_file():
        raise InputError(f"no {files.checkpoint.name} in the run folder", files.dir)
    ckpt = Checkpoint.load(files.checkpoint)
    summary = ckpt.data
    # the images as trained on (Fourier crop, normalisation: config.data), few, preloaded
    sub = particles.subset(np.asarray(indices, dtype=np.int64))
    data = prepare_data(sub, dataclasses.replace(config.data, max_preload_gb=1e9))
    if data.hartley is None:
        raise InputError("could not preload the chosen particles", particles.source)
    volume = HartleyVolume(data.box_px, init_scale=0.0,  # older checkpoints: model.symmetry
                           symmetry=ckpt.volume_symmetry or config.model.symmetry)
    try:
        volume.load_state_dict(ckpt.volume)
    except RuntimeError:
        raise InputError(f"the checkpoint's volume does not match the training box of "
                         f"{data.box_px} px", files.checkpoint) from None
    scale = float(summary.get("image_scale", data.image_scale)) / data.image_scale
    noise = float(summary.get("noise_variance_hartley", data.noise_variance))
    hart, ctf, freqs = data.hartley * scale, data.ctf, data.frequencies
    if loss_radius_px is not None:
        largest = float(freqs.norm(dim=-1).max())
        if not 1 <= loss_radius_px <= largest + 1e-6:
            raise InputError(f"--loss-radius must lie in [1, {largest:.4g}], "
                             f"got {loss_radius_px}")
        disc = sub_disc(freqs, data.box_px, loss_radius_px)
        hart, freqs = hart[:, disc.columns], disc.frequencies
        ctf = None if ctf is None else ctf[:, disc.columns]
    neg = negation_permutation(freqs, data.box_px)

    table = ckpt.pose_table
    track = _read_track(files)
    star_rot = star_shift = None
    if table is None and track is None and files.star.is_file():
        star_rot, star_shift = _star_poses(files, particles, data.box_px)
    directions = torch.from_numpy(healpix_vectors(nside))
    with torch.no_grad():
        volume_ht = volume()  # float32, as in training
    results = []
    for row, i in enumerate(indices):
        pos = None
        if track is not None:
            hits = np.flatnonzero(track.indices == i)
            pos = int(hits[0]) if hits.size else None
        final_R: np.ndarray | None = None
        shift = np.zeros(2)
        if table is not None:
            final_R = table["rotations"][i].double().numpy()
            shift = table["shifts_px"][i].double().numpy()
        elif track is not None and pos is not None and track.epochs.size:
            final_R = track.rotations[-1, pos].astype(np.float64)
            shift = track.shifts_px[-1, pos].astype(np.float64)
        elif star_rot is not None:
            final_R = star_rot[i].double().numpy()
            shift = np.zeros(2) if star_shift is None else star_shift[i].double().numpy()
        log_post = log_posterior_views(
            volume_ht, hart[row], noise, freqs, directions, psi_steps=psi_steps,
            ctf=None if ctf is None else ctf[row],
            shift_px=torch.from_numpy(np.asarray(shift, np.float64)), negation_index=neg,
        )
        post = ParticlePosterior(particle=int(i), log_posterior=log_post.numpy(),
                                 final_rotation=final_R, shift_px=np.asarray(shift, np.float64))
        results.append(post if track is None or pos is None else _with_track(post, track, pos))
    return results


def _star_poses(files: RunFiles, particles: ParticleSet,
                box_px: int) -> tuple[Tensor | None, Tensor | None]:
    """The rotations `(N, 3, 3)` and shifts `(N, 2)` (in the training box's pixels, ``box_px``)
    of the run's ``poses.star``, for a run with neither a pose table nor a pose track."""
    final = load_particles(files.star, metadata_only=True, no_ctf=True,
                           check_finite=False, box_px=particles.box_px)
    shifts = final.shifts_px
    if shifts is not None:  # poses.star keeps the original pixels
        shifts = shifts * (box_px / particles.box_px)
    return final.rotations, shifts


def _with_track(post: ParticlePosterior, track: PoseTrack, pos: int) -> ParticlePosterior:
    """``post`` with what the track holds of its particle (column ``pos``): every head's
    prediction at the last tracked stage-1 epoch and the pose after each stage-2 epoch."""
    stage1 = track.stage1_mask()
    if stage1.any():
        e = int(np.flatnonzero(stage1)[-1])
        post = dataclasses.replace(
            post, head_rotations=track.head_rotations[e, pos].astype(np.float64),
            head_losses=track.head_losses[e, pos].astype(np.float64),
            head_epoch=int(track.epochs[e]))
    if (~stage1).any():
        post = dataclasses.replace(
            post, path_rotations=track.rotations[~stage1, pos].astype(np.float64),
            path_epochs=track.epochs[~stage1].copy())
    return post
