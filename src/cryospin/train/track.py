"""Per-epoch pose track of a fixed subset of particles: ``RUN_DIR/pose_track.npz``.

``cryospin reconstruct`` rewrites the file (atomically) at the end of every epoch, before the
checkpoint. It follows ``K = run.track_particles`` particles (a seeded, fixed subset; all of
them when there are fewer; 0 disables the track) through training:

* stage-1 (auto-encoding) epochs: a small inference pass over the tracked particles after the
  epoch's last step gives every head's pose and loss (:func:`head_predictions`, the prediction
  code of the training, :func:`cryospin.train.autoencode.predict_nll`); the particle's pose is
  its best head by loss;
* stage-2 (auto-decoding) epochs: the particle's pose-table row; the per-head arrays are NaN.

File layout (``numpy.savez``; read with :func:`load_pose_track`):

======================  ========================  ==========================================
key                     shape, dtype              meaning
======================  ========================  ==========================================
``indices``             `(K,)` int64              tracked particle indices (sorted)
``epochs``              `(E,)` int64              epochs recorded (from 1, increasing)
``rotations``           `(E, K, 3, 3)` float32    pose at the end of each epoch
``shifts_px``           `(E, K, 2)` float32       shift ``(tx, ty)`` px (0 without shifts)
``head_rotations``      `(E, K, M, 3, 3)` float32 every head's rotation (stage 1; else NaN)
``head_losses``         `(E, K, M)` float32       every head's NLL (stage 1; else NaN)
======================  ========================  ==========================================

Rotations follow ``docs/conventions.md`` (left-multiply xyz columns; third row = view
direction). The track draws nothing from the training's random generators (its subset comes
from a NumPy generator seeded with ``run.seed``; the inference pass runs the encoder in eval
mode without gradients), so a run with a track is bitwise the run without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cryospin.atomic import atomic_path
from cryospin.errors import InputError
from cryospin.pose import PoseTable
from cryospin.rundir import POSE_TRACK
from cryospin.train.autoencode import eval_mode, predict_nll
from cryospin.train.data import TrainingData, sub_disc

__all__ = [
    "PoseTrack",
    "select_track_indices",
    "head_predictions",
    "load_pose_track",
    "save_pose_track",
    "truncate_pose_track",
    "PoseTracker",
]


_KEYS = ("indices", "epochs", "rotations", "shifts_px", "head_rotations", "head_losses")


@dataclass(frozen=True)
class PoseTrack:
    """The per-epoch poses of the tracked particles (see the module docstring).

    Attributes
    ----------
    indices : `(K,)` int64
    epochs : `(E,)` int64
    rotations : `(E, K, 3, 3)` float32
    shifts_px : `(E, K, 2)` float32
    head_rotations : `(E, K, M, 3, 3)` float32
        NaN in stage-2 epochs.
    head_losses : `(E, K, M)` float32
        NaN in stage-2 epochs.
    """

    indices: np.ndarray
    epochs: np.ndarray
    rotations: np.ndarray
    shifts_px: np.ndarray
    head_rotations: np.ndarray
    head_losses: np.ndarray

    @property
    def num_heads(self) -> int:
        """``M``."""
        return int(self.head_losses.shape[-1])

    def stage1_mask(self) -> np.ndarray:
        """`(E,)` bool: epochs that hold head predictions (auto-encoding epochs)."""
        if self.head_losses.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        return np.isfinite(self.head_losses).reshape(self.head_losses.shape[0], -1).any(axis=1)

    def up_to(self, last_epoch: int) -> PoseTrack:
        """The track restricted to epochs ``<= last_epoch``."""
        keep = self.epochs <= int(last_epoch)
        return PoseTrack(self.indices, self.epochs[keep], self.rotations[keep],
                         self.shifts_px[keep], self.head_rotations[keep], self.head_losses[keep])

    @staticmethod
    def empty(indices: np.ndarray, num_heads: int) -> PoseTrack:
        """A track of no epoch for ``indices`` `(K,)` and ``num_heads`` heads."""
        k = int(np.asarray(indices).shape[0])
        f32 = np.float32
        return PoseTrack(
            indices=np.asarray(indices, dtype=np.int64),
            epochs=np.zeros(0, dtype=np.int64),
            rotations=np.zeros((0, k, 3, 3), f32),
            shifts_px=np.zeros((0, k, 2), f32),
            head_rotations=np.zeros((0, k, num_heads, 3, 3), f32),
            head_losses=np.zeros((0, k, num_heads), f32),
        )


def select_track_indices(num_particles: int, count: int, seed: int) -> np.ndarray:
    """A seeded, fixed subset of ``count`` particle indices, sorted, `(min(count, N),)` int64.

    All particles when ``count >= num_particles``; empty for ``count = 0``. Uses its own NumPy
    generator (``default_rng(seed)``): no global or training generator is touched.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    n = int(num_particles)
    if count >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed) % 2**63, 0x7A11])
    return np.sort(rng.choice(n, size=int(count), replace=False)).astype(np.int64)


def head_predictions(
    encoder: nn.Module,
    volume: nn.Module,
    data: TrainingData,
    indices: Tensor,
    *,
    batch_size: int = 256,
    loss_radius_px: float | None = None,
    lowpass_input: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Every head's pose and NLL for particles ``indices``, without gradients.

    The same computation as the inference pass at the switch
    (:func:`~cryospin.train.autoencode.infer_best_poses`), keeping all heads: the encoder in
    eval mode (restored after), :func:`~cryospin.train.autoencode.predict_nll` on the loss
    disc of radius ``loss_radius_px`` (None: the full training disc).

    Parameters
    ----------
    encoder : MultiHeadPoseEncoder
    volume : HartleyVolume
    data : TrainingData
    indices : `(K,)` int64
        Particle indices.

    Returns
    -------
    nll : `(K, M)` float32
    rotations : `(K, M, 3, 3)` float32
    shifts_px : `(K, M, 2)` float32 or None
    """
    disc = None
    if loss_radius_px is not None:
        disc = sub_disc(data.frequencies, data.box_px, loss_radius_px)
    losses, rotations, shifts = [], [], []
    with eval_mode(encoder), torch.inference_mode():
        volume_ht = volume()
        for idx in indices.cpu().split(batch_size):
            nll, rot, sh = predict_nll(encoder, volume_ht, data.batch(idx), data, disc,
                                       lowpass_input=lowpass_input)  # (B, M), (B, M, 3, 3)
            losses.append(nll.float().cpu())
            rotations.append(rot.float().cpu())
            if sh is not None:
                shifts.append(sh.float().cpu())
    return (torch.cat(losses).clone(), torch.cat(rotations).clone(),
            torch.cat(shifts).clone() if shifts else None)


def save_pose_track(path: str | Path, track: PoseTrack) -> None:
    """Write ``track`` to ``path`` (``.npz``) atomically."""
    arrays = {key: getattr(track, key) for key in _KEYS}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_pose_track(run_dir: str | Path) -> PoseTrack:
    """Read ``RUN_DIR/pose_track.npz`` (``run_dir`` may also be the file itself).

    Raises
    ------
    InputError
        When the file is missing, unreadable, or its arrays disagree in shape.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / POSE_TRACK
    if not path.is_file():
        raise InputError("no pose track (pose_track.npz) here", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: np.array(z[key]) for key in _KEYS}
    except KeyError as exc:
        raise InputError(f"pose track lacks the array {exc.args[0]!r}", path) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the pose track ({exc})", path) from None
    k, e = arrays["indices"].shape[0], arrays["epochs"].shape[0]
    m = arrays["head_losses"].shape[-1] if arrays["head_losses"].ndim == 3 else -1
    expected = {"rotations": (e, k, 3, 3), "shifts_px": (e, k, 2),
                "head_rotations": (e, k, m, 3, 3), "head_losses": (e, k, m)}
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise InputError(f"pose track array {key} has shape {arrays[key].shape}, "
                             f"expected {shape}", path)
    return PoseTrack(
        indices=arrays["indices"].astype(np.int64),
        epochs=arrays["epochs"].astype(np.int64),
        rotations=arrays["rotations"].astype(np.float32),
        shifts_px=arrays["shifts_px"].astype(np.float32),
        head_rotations=arrays["head_rotations"].astype(np.float32),
        head_losses=arrays["head_losses"].astype(np.float32),
    )


def truncate_pose_track(run_dir: str | Path, last_epoch: int) -> None:
    """Keep only the entries of epochs ``<= last_epoch`` (used on resume; no file: nothing)."""
    path = Path(run_dir) / POSE_TRACK
    if not path.is_file():
        return
    save_pose_track(path, load_pose_track(path).up_to(last_epoch))


class PoseTracker:
    """Accumulates the track in memory and rewrites ``RUN_DIR/pose_track.npz`` per epoch.

    Build it with :meth:`start`; call :meth:`record` at the end of every epoch.
    """

    def __init__(self, path: Path, track: PoseTrack) -> None:
        self.path = Path(path)
        self.track = track

    @classmethod
    def start(
        cls,
        run_dir: str | Path,
        *,
        num_particles: int,
        num_heads: int,
        count: int,
        seed: int,
        last_epoch: int = 0,
    ) -> PoseTracker | None:
        """The tracker of a run (None when ``count == 0``).

        With ``last_epoch > 0`` (resume) an existing track is read and its entries of epochs
        after ``last_epoch`` are dropped (the file is rewritten at once, like
        ``metrics.jsonl``); a missing or unusable old track starts afresh.
        """
        if count == 0:
            return None
        path = Path(run_dir) / POSE_TRACK
        indices = select_track_indices(num_particles, count, seed)
        track = PoseTrack.empty(indices, num_heads)
        if last_epoch > 0 and path.is_file():
            try:
                old = load_pose_track(path)
            except InputError:
                old = None
            if (old is not None and np.array_equal(old.indices, indices)
                    and old.num_heads == num_heads):
                track = old.up_to(last_epoch)
                save_pose_track(path, track)
        return cls(path, track)

    @property
    def indices(self) -> np.ndarray:
        """`(K,)` int64 tracked particle indices."""
        return self.track.indices

    def record(
        self,
        epoch: int,
        *,
        encoder: nn.Module | None,
        volume: nn.Module,
        data: TrainingData,
        pose_table: PoseTable | None,
        batch_size: int = 256,
        loss_radius_px: float | None = None,
        lowpass_input: bool = False,
    ) -> None:
        """Append epoch ``epoch`` and rewrite the file.

        Stage 2 when ``pose_table`` is given (its rows are the poses), else stage 1 (the
        encoder's heads, see :func:`head_predictions`).
        """
        t = self.track
        k, m = t.indices.shape[0], t.num_heads
        idx = torch.from_numpy(t.indices)
        heads_rot = np.full((k, m, 3, 3), np.nan, np.float32)
        heads_loss = np.full((k, m), np.nan, np.float32)
        if pose_table is not None:
            table_rot, table_sh = pose_table.gather(idx.to(pose_table.rotations.device))
            rotations = table_rot.detach().float().cpu().numpy()
            shifts = table_sh.detach().float().cpu().numpy()
        else:
            if encoder is None:
                raise ValueError("record needs the encoder (stage 1) or the pose table")
            nll, rot, sh = head_predictions(encoder, volume, data, idx, batch_size=batch_size,
                                            loss_radius_px=loss_radius_px,
                                            lowpass_input=lowpass_input)
            if nll.shape[1] != m:  # the encoder's hypotheses per image, not config's heads
                if t.epochs.size:
                    raise ValueError(f"the encoder gives {nll.shape[1]} poses per image but "
                                     f"the track holds {m}")
                t = PoseTrack.empty(t.indices, int(nll.shape[1]))
            best = nll.argmin(dim=1)  # (K,)
            rows = torch.arange(k)
            rotations = rot[rows, best].numpy()
            shifts = (np.zeros((k, 2), np.float32) if sh is None
                      else sh[rows, best].numpy())
            heads_rot, heads_loss = rot.numpy(), nll.numpy()
        keep = t.epochs < int(epoch)  # re-recording an epoch replaces it
        self.track = PoseTrack(
            indices=t.indices,
            epochs=np.concatenate([t.epochs[keep], np.array([epoch], np.int64)]),
            rotations=np.concatenate([t.rotations[keep], rotations[None].astype(np.float32)]),
            shifts_px=np.concatenate([t.shifts_px[keep], shifts[None].astype(np.float32)]),
            head_rotations=np.concatenate([t.head_rotations[keep], heads_rot[None]]),
            head_losses=np.concatenate([t.head_losses[keep], heads_loss[None]]),
        )
        save_pose_track(self.path, self.track)
