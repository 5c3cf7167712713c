"""The report's inputs beyond :func:`cryospin.rundir.load_run` (a run folder's metrics, config
and the paths of its maps and poses): the maps, the poses, the pose track, the noise spectrum
and the ground truth.

Everything here only reads; it raises :class:`~cryospin.errors.InputError` naming the file for
anything that does not fit, so that a page checks all its inputs before it writes anything.

Conventions (``docs/conventions.md``): maps are `(L, L, L)` float64 indexed ``[z, y, x]``;
rotations `(N, 3, 3)` left-multiply xyz column vectors; shifts `(N, 2)` are in pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.forward.resample import fourier_crop_3d, fourier_pad_3d
from cryospin.io.mrc import read_cubic_map
from cryospin.io.particles import load_particles
from cryospin.io.pkl import read_cryodrgn_poses
from cryospin.io.star_tables import numbers
from cryospin.rundir import RunFiles
from cryospin.train.noise_record import NoiseSpectrumRecord, read_noise_spectrum
from cryospin.train.scores import SCORE_COLUMN
from cryospin.train.track import PoseTrack, load_pose_track

__all__ = [
    "ground_truth_on_grid",
    "read_poses",
    "read_scores",
    "read_gt_poses",
    "read_track",
    "read_noise",
]


def ground_truth_on_grid(gt_path: Path, box_px: int, pixel_size_angstrom: float) -> np.ndarray:
    """The ground-truth map on the run's grid: same box, or Fourier-resampled when only the
    sampling differs (same physical box size within 1 %)."""
    gt, apix = read_cubic_map(gt_path)
    L_gt = gt.shape[0]
    if L_gt == box_px:
        if apix > 0 and pixel_size_angstrom > 0 and abs(apix - pixel_size_angstrom) > (
                0.01 * pixel_size_angstrom):
            raise InputError(f"voxel size {apix:g} Å differs from the run's "
                             f"{pixel_size_angstrom:g} Å", gt_path)
        return gt
    if apix > 0 and pixel_size_angstrom > 0 and abs(L_gt * apix - box_px * pixel_size_angstrom) <= (
            0.01 * box_px * pixel_size_angstrom):
        t = torch.from_numpy(gt)
        t = fourier_crop_3d(t, box_px) if L_gt > box_px else fourier_pad_3d(t, box_px)
        return t.numpy()
    raise InputError(f"box {L_gt} px at {apix:g} Å/px does not match the run's {box_px} px at "
                     f"{pixel_size_angstrom:g} Å/px", gt_path)


def read_poses(path: Path, box_px: int) -> tuple[Tensor, Tensor | None]:
    """Rotations `(N, 3, 3)` and shifts `(N, 2)` from a .star/.cs (metadata only) or a pose.pkl."""
    if path.suffix.lower() == ".pkl":
        return read_cryodrgn_poses(path, box_px)
    ps = load_particles(path, metadata_only=True, no_ctf=True, check_finite=False,
                        box_px=box_px)
    if ps.rotations is None:
        raise InputError("no poses (rlnAngleRot/Tilt/Psi) in the file", path)
    return ps.rotations, ps.shifts_px


def read_scores(path: Path, box_px: int) -> np.ndarray | None:
    """The particles' scores `(N,)` (nats, :mod:`cryospin.train.scores`) from a run's
    ``poses.star``; None for another file or a star without them (a run of an older
    version)."""
    if path.suffix.lower() != ".star":
        return None
    ps = load_particles(path, metadata_only=True, no_ctf=True, check_finite=False,
                        box_px=box_px)
    if ps.star_table is None or SCORE_COLUMN not in ps.star_table.columns:
        return None
    scores = numbers(ps.star_table[SCORE_COLUMN])
    if not np.isfinite(scores).all():
        raise InputError(f"{SCORE_COLUMN} holds values that are not numbers", path)
    return scores


def read_gt_poses(gt_poses: str | Path, rotations: Tensor | None, box_px: int | None,
                  run_dir: Path) -> tuple[Tensor, Tensor | None]:
    """Ground-truth rotations `(N, 3, 3)` and shifts `(N, 2)`, checked against the run's
    ``rotations`` (None: the run has no final poses, an InputError naming ``run_dir``)."""
    if rotations is None or box_px is None:
        raise InputError("the run has no final poses (poses.star) to compare", run_dir)
    gt_R, gt_t = read_poses(Path(gt_poses), box_px)
    if gt_R.shape[0] != rotations.shape[0]:
        raise InputError(f"{gt_R.shape[0]} poses but the run has {rotations.shape[0]} "
                         "particles", gt_poses)
    return gt_R, gt_t


def read_track(run_dir: Path, num_particles: int) -> PoseTrack | None:
    """The run's pose track when it exists, holds an epoch and fits ``num_particles``."""
    path = RunFiles(run_dir).track
    if not path.is_file():
        return None
    track = load_pose_track(run_dir)
    if not track.epochs.size or not track.indices.size:
        return None
    if int(track.indices.max()) >= num_particles:
        raise InputError(f"tracks particle {int(track.indices.max())} but the ground truth "
                         f"has {num_particles} poses", path)
    return track


def read_noise(run_dir: Path) -> NoiseSpectrumRecord | None:
    """The noise spectrum the run whitened with (``noise_spectrum.json``); None when the run
    did not whiten its noise (or is from before the file)."""
    path = RunFiles(run_dir).noise_spectrum
    return read_noise_spectrum(path) if path.is_file() else None
