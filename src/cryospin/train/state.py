"""The training state: what an epoch changes and a checkpoint keeps.

:class:`TrainState` owns the volume, the stage-1 encoder and its optimiser (and grad scaler),
the stage-2 pose table, the volume's optimiser, the stage and the epoch; it is built fresh
(:meth:`TrainState.start`), saved (:meth:`TrainState.to_checkpoint`) and restored
(:meth:`TrainState.restore`) symmetrically through :class:`cryospin.rundir.Checkpoint`, and
moves to stage 2 at the switch (:meth:`TrainState.switch`). The random generators' states are
captured and restored with it (:func:`capture_rng_state`, :func:`restore_rng_state`), so a
resumed run equals the uninterrupted one with the same seed.

Also here: how the encoder, the pose table and the optimisers are built from the
configuration, and the choice of the encoder's arithmetic (:func:`choose_precision`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, cast

import numpy as np
import torch
from torch import nn

from cryospin.encoder import InPlaneFlipEncoder, MultiHeadPoseEncoder
from cryospin.errors import InputError
from cryospin.pose import PoseTable
from cryospin.rundir import Checkpoint, Stage
from cryospin.train.autoencode import BestPoses
from cryospin.train.config import Config
from cryospin.train.distributed import Shard
from cryospin.train.optimizer import adam
from cryospin.train.precision import (
    PrecisionChoice,
    StepTimes,
    cpu_model_name,
    measure_encoder_step,
    resolve_precision,
)
from cryospin.volume import HartleyVolume

__all__ = [
    "TrainState",
    "RngState",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
    "build_encoder",
    "build_pose_table",
    "choose_precision",
    "describe_execution",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- random state
def seed_everything(seed: int) -> torch.Generator:
    """Seed the global generators; return the CPU generator of the batch order."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (global state, for third-party code)
    random.seed(seed)
    return torch.Generator(device="cpu").manual_seed(seed)


class NumpyRngState(TypedDict):
    """NumPy's global (legacy) generator: the fields of ``np.random.get_state()``."""

    kind: str
    keys: torch.Tensor  # (624,) int64 (uint32 values)
    pos: int
    has_gauss: int
    cached_gaussian: float


class PythonRngState(TypedDict):
    """Python's ``random`` generator: the fields of ``random.getstate()``."""

    version: int
    state: list[int]
    gauss_next: float | None


class RngState(TypedDict):
    """The checkpoint's ``rng``: every generator's state (:func:`capture_rng_state`).
    ``generator`` and ``cuda`` may be absent from an old checkpoint."""

    torch: torch.Tensor  # uint8 byte state
    numpy: NumpyRngState
    python: PythonRngState
    generator: NotRequired[torch.Tensor | None]
    cuda: NotRequired[list[torch.Tensor] | None]


def capture_rng_state(generator: torch.Generator | None = None) -> RngState:
    """States of the torch (CPU and CUDA), NumPy and Python generators, and of ``generator``
    (the checkpoint's ``rng``; tensors, numbers and lists only)."""
    # (the legacy tuple: kind, keys, pos, has_gauss, cached_gaussian)
    np_state = cast(tuple[Any, ...], np.random.get_state())  # noqa: NPY002 (the global state)
    py_state = random.getstate()
    state: RngState = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": list(py_state[1]),
            "gauss_next": py_state[2],
        },
        "generator": None if generator is None else generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: RngState, generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (sets the global generators and ``generator``)."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (restores the global state captured above)
        (
            npst["kind"],
            npst["keys"].cpu().numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    saved_generator = state.get("generator")
    if generator is not None and saved_generator is not None:
        generator.set_state(saved_generator.cpu())
    saved_cuda = state.get("cuda")
    if saved_cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in saved_cuda])


# ----------------------------------------------------------------------------- builders
def build_encoder(
    config: Config, box_px: int, device: torch.device, dtype: torch.dtype | None
) -> nn.Module:
    """The stage-1 encoder (trunk in ``dtype`` autocast, None: float32); for
    ``method = cryoai`` each head's pose comes with its 180° in-plane partner, so the trainer
    sees ``2 · num_heads`` hypotheses."""
    m = config.model
    base = MultiHeadPoseEncoder(
        box_px,
        m.num_heads,
        width_multiplier=m.width_multiplier,
        predict_shifts=m.predict_shifts,
        max_shift_px=m.max_shift_px,
        head_hidden=m.head_hidden,
        autocast_dtype=dtype,
        input_box_px=m.encoder_input_box(box_px),
        head=m.head,
        input_channels=m.encoder_input,
        pooling=m.pooling,
    )
    encoder: nn.Module = (InPlaneFlipEncoder(base) if config.schedule.method == "cryoai"
                          else base)
    return encoder.to(device)


def build_pose_table(
    config: Config, rotations: torch.Tensor, shifts_px: torch.Tensor | None
) -> PoseTable:
    """The stage-2 pose table from the switch's poses, `(N, 3, 3)` and `(N, 2)` px."""
    m, o = config.model, config.optim
    return PoseTable(
        rotations,
        shifts_px if m.predict_shifts else None,
        lr_rot=o.pose_lr,
        lr_shift=o.shift_lr,
        max_shift_px=m.max_shift_px if m.predict_shifts else None,
    )


def choose_precision(
    config: Config, box_px: int, device: torch.device, shard: Shard | None
) -> PrecisionChoice:
    """Resolve ``model.precision`` (micro-benchmark of this run's encoder step on CPU); under
    torchrun every rank takes the same choice (a split vote falls back to fp32)."""
    m = config.model
    shape: dict[str, object] = {"box_px": box_px, "encoder_box_px": m.encoder_input_box(box_px),
             "width": m.width_multiplier, "heads": m.num_heads, "hidden": m.head_hidden,
             "shifts": m.predict_shifts}
    if (m.head, m.encoder_input, m.pooling) != ("spread", "image", "vgg16"):
        # another trunk or head: another measurement (bf16 with 2x2 deep maps measured 8x
        # slower than fp32 on an AVX512-BF16 CPU, with 1x1 maps 1.5x faster)
        shape.update(head=m.head, input=m.encoder_input, pooling=m.pooling)

    def measure() -> StepTimes:
        logger.info("timing the encoder step in fp32 and bf16 (once per machine)")
        return measure_encoder_step(
            lambda dtype: build_encoder(config, box_px, torch.device("cpu"), dtype), box_px)

    choice = resolve_precision(m.precision, device, measure=measure, shape=shape)
    if shard is not None:
        names = ("fp32", "bf16", "fp16")
        votes = shard.all_sum(torch.tensor([float(choice.name == n) for n in names]))
        agreed = [n for n, v in zip(names, votes.tolist(), strict=True)
                  if v == shard.world_size]
        if not agreed:
            choice = PrecisionChoice("fp32", "the ranks chose differently; fp32 on all",
                                     m.precision)
    return choice


def describe_execution(device: torch.device, choice: PrecisionChoice | None) -> str:
    """One line: device (CPU model and kernel capability, or GPU name), precision and why
    (None: no encoder to run, a run resumed after the switch), threads."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        where = (f"cpu ({cpu_model_name()}, capability "
                 f"{torch.backends.cpu.get_cpu_capability()})")
    else:
        where = device.type
    precision = ("precision: no encoder (after the switch, or search only)" if choice is None
                 else f"precision {choice.name} ({choice.reason})")
    return f"device {where}, {precision}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- the state
@dataclass
class TrainState:
    """What training changes, epoch after epoch.

    Attributes
    ----------
    stage : Stage
        The stage of the last completed epoch (stage 1 before the first).
    epoch : int
        The last committed epoch (0: none).
    volume : HartleyVolume
    decoder_opt : torch.optim.Optimizer
        The volume's optimiser (a new one, at the lower learning rate, after the switch).
    encoder, encoder_opt, grad_scaler :
        Stage 1's encoder, its optimiser and (fp16) grad scaler; None after the switch.
    pose_table : PoseTable or None
        Stage 2's poses; None before the switch.
    switch_record : BestPoses or None
        The winners of the last stage-1 epoch (``schedule.switch_poses = last_epoch``), kept
        from that epoch to the switch.
    elapsed_before_s : float
        Training time of the earlier sessions of a resumed run (0 for a new run).
    search_stopped_after : int or None
        The epoch after which the global search stopped early (:mod:`cryospin.train.schedule`).
    last_jump_fraction : float or None
        The last search epoch's ``jump_fraction`` (the early stop's plateau rule).
    last_search_loss : float or None
        The last search epoch's mean loss, nats per image (the early stop's settled rule).
    last_junk_fraction : float or None
        The last stage-2 epoch's ``junk_fraction`` (``model.junk_class``: the gate of the
        next epoch and of the final scores, :func:`cryospin.train.scores.junk_takes_effect`).
    """

    stage: Stage
    epoch: int
    volume: HartleyVolume
    decoder_opt: torch.optim.Optimizer
    encoder: nn.Module | None = None
    encoder_opt: torch.optim.Optimizer | None = None
    grad_scaler: torch.amp.GradScaler | None = None
    pose_table: PoseTable | None = None
    switch_record: BestPoses | None = None
    elapsed_before_s: float = 0.0
    search_stopped_after: int | None = None
    last_jump_fraction: float | None = None
    last_search_loss: float | None = None
    last_junk_fraction: float | None = None

    @classmethod
    def start(cls, config: Config, volume: HartleyVolume, stage: Stage, device: torch.device,
              precision: PrecisionChoice | None, box_px: int) -> TrainState:
        """A state at epoch 0 of ``stage``: ``volume`` with its optimiser and, with a
        ``precision`` (stage 1), a new encoder for ``box_px`` images, its optimiser and grad
        scaler."""
        state = cls(stage, 0, volume, adam(volume.parameters(), config.optim.decoder_lr))
        if precision is not None:
            state.encoder = build_encoder(config, box_px, device, precision.dtype)
            state.encoder_opt = adam(state.encoder.parameters(), config.optim.encoder_lr)
            if precision.needs_grad_scaler:
                state.grad_scaler = torch.amp.GradScaler(device.type)
        return state

    def restore(self, ckpt: Checkpoint, config: Config, device: torch.device,
                generator: torch.Generator) -> None:
        """Take every value of ``ckpt`` (inverse of :meth:`to_checkpoint`; ``self`` from
        :meth:`start` with the checkpoint's stage); restores the generators too."""
        self.stage, self.epoch = ckpt.stage, ckpt.epoch
        self.volume.load_state_dict(ckpt.volume)
        if self.stage == Stage.AUTOENCODE:
            if self.encoder is None or self.encoder_opt is None or ckpt.encoder is None:
                raise InputError("a stage-1 checkpoint without an encoder")
            self.encoder.load_state_dict(ckpt.encoder)
            self.encoder_opt.load_state_dict(ckpt.optimizers["encoder"])
            if self.grad_scaler is not None and "grad_scaler" in ckpt.optimizers:
                self.grad_scaler.load_state_dict(ckpt.optimizers["grad_scaler"])
        else:
            if ckpt.pose_table is None:
                raise InputError("a stage-2 checkpoint without a pose table")
            self.encoder = self.encoder_opt = self.grad_scaler = None
            self.pose_table = PoseTable.from_state_dict(ckpt.pose_table).to(device)
            self.decoder_opt = adam(self.volume.parameters(),
                                    config.optim.decoder_lr_after_switch)
        self.decoder_opt.load_state_dict(ckpt.optimizers["decoder"])
        restore_rng_state(cast(RngState, ckpt.rng), generator)  # stored as a plain dict
        self.elapsed_before_s = ckpt.elapsed_s
        self.search_stopped_after = ckpt.search_stopped_after
        self.last_jump_fraction = ckpt.last_jump_fraction
        self.last_search_loss = ckpt.last_search_loss
        self.last_junk_fraction = ckpt.last_junk_fraction
        if ckpt.switch_record is not None:  # stopped at the switch: its poses
            self.switch_record = BestPoses.from_state_dict(ckpt.switch_record, device)

    def to_checkpoint(self, *, epoch: int, config: dict[str, dict[str, object]],
                      data: dict[str, object], generator: torch.Generator, elapsed_s: float,
                      pose_table: PoseTable | None,
                      switch_record: BestPoses | None) -> Checkpoint:
        """The checkpoint of the state after ``epoch`` (committed, it becomes :attr:`epoch`;
        ``config``: the configuration as given, ``data``: the data's summary, ``elapsed_s``:
        the run's training time so far).
        ``pose_table`` and ``switch_record`` hold every particle's row (distributed: gathered
        to rank 0; one process: :attr:`pose_table` and :attr:`switch_record`)."""
        optimizers = {"decoder": self.decoder_opt.state_dict()}
        if self.encoder_opt is not None:
            optimizers["encoder"] = self.encoder_opt.state_dict()
        if self.grad_scaler is not None:
            optimizers["grad_scaler"] = self.grad_scaler.state_dict()
        return Checkpoint(
            config=config, stage=self.stage, epoch=epoch,
            volume=self.volume.state_dict(),
            encoder=None if self.encoder is None else self.encoder.state_dict(),
            pose_table=None if pose_table is None else pose_table.state_dict(),
            optimizers=optimizers, rng=dict(capture_rng_state(generator)), data=data,
            elapsed_s=elapsed_s, search_stopped_after=self.search_stopped_after,
            last_jump_fraction=self.last_jump_fraction,
            last_search_loss=self.last_search_loss,
            last_junk_fraction=self.last_junk_fraction,
            switch_record=None if switch_record is None else switch_record.state_dict(),
            volume_symmetry=self.volume.point_group,
        )

    def replace_volume(self, config: Config, volume: HartleyVolume) -> None:
        """Stage 2 goes on with ``volume`` (the impose-symmetry step,
        :mod:`cryospin.train.impose`) and a new optimiser for it (no moments of the old one)."""
        self.volume = volume
        self.decoder_opt = adam(volume.parameters(), config.optim.decoder_lr_after_switch)

    def switch(self, config: Config, pose_table: PoseTable) -> None:
        """To stage 2: ``pose_table`` replaces the encoder (dropped with its optimiser) and a
        new volume optimiser runs at ``optim.decoder_lr_after_switch``."""
        self.pose_table = pose_table
        self.switch_record = None
        self.encoder = self.encoder_opt = self.grad_scaler = None
        self.decoder_opt = adam(self.volume.parameters(), config.optim.decoder_lr_after_switch)
        self.stage = Stage.AUTODECODE
