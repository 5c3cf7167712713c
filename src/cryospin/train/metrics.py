"""Per-epoch training metrics and the run's ``metrics.jsonl`` (one JSON object per epoch).

Fields of a line (all stages): ``epoch`` (from 1), ``stage`` (``"autoencode"`` |
``"autodecode"``), ``loss`` (mean per-image NLL of the epoch, winner head in stage 1),
``num_images``, ``wall_time_s`` (the epoch's training time), ``images_per_s``, ``head_usage``
(fraction of images won by each head: stage 1 over the epoch; at the switch, over the inference
pass; otherwise None), ``head_spread_deg`` (stage 1: per head, how much its rotation varies
from image to image, :func:`cryospin.losses.head_spread_deg` averaged over the epoch's batches;
0 = one rotation for every image, ≈ 132 = uniformly random; absent from older files),
``mean_pose_change_deg`` (stage 2: mean geodesic change of the pose of
each visited particle during the epoch; None in stage 1), ``mean_shift_change_px`` (stage 2 with
shifts), ``decoder_lr``, ``pose_lr`` (stage 2's rotation learning rate), ``elapsed_s``
(since the start of the run, including resumed parts) and ``jump_fraction`` (stage 2: fraction
of the visited particles whose rotation moved by more than
``cryospin.train.autodecode.JUMP_THRESHOLD_DEG`` during the epoch; absent from files written
before it existed). ``extra`` holds ``"switch"`` (the switch's epoch) and ``"search_stop"`` (the
epoch after which the global search stopped early; :func:`search_stopped_after`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cryospin.atomic import atomic_write_text
from cryospin.errors import CryospinError, InputError

__all__ = [
    "EpochMetrics",
    "RunningMean",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "check_finite_loss",
    "check_finite_gradients",
    "append_metrics",
    "read_metrics",
    "truncate_metrics",
    "search_stopped_after",
]


@dataclass
class EpochMetrics:
    """One line of ``metrics.jsonl`` (see the module docstring)."""

    epoch: int
    stage: str
    loss: float
    num_images: int
    wall_time_s: float
    images_per_s: float
    head_usage: list[float] | None = None
    head_spread_deg: list[float] | None = None
    mean_pose_change_deg: float | None = None
    mean_shift_change_px: float | None = None
    decoder_lr: float | None = None
    pose_lr: float | None = None
    elapsed_s: float | None = None
    jump_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """One JSON line; non-finite floats become ``null``."""
        return json.dumps(_finite(asdict(self)), sort_keys=False)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


class RunningMean:
    """Weighted running mean of a scalar (e.g. a per-image loss over batches)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0

    def add(self, value: float, weight: float = 1.0) -> None:
        self.total += float(value) * weight
        self.weight += weight

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight > 0 else float("nan")


def append_metrics(path: str | Path, metrics: EpochMetrics) -> None:
    """Append one line to ``metrics.jsonl`` (rewritten atomically; files stay small)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + metrics.to_json() + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All lines of a ``metrics.jsonl`` as dicts (missing file: empty list)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise InputError(f"line {number} is not JSON", path) from None
    return rows


def search_stopped_after(rows: Iterable[Mapping[str, Any]]) -> int | None:
    """The epoch after which the global search stopped early, from :func:`read_metrics` rows
    (the ``extra["search_stop"]`` of that epoch's line), or None when it did not (or the file
    predates early stopping)."""
    for row in rows:
        stop = (row.get("extra") or {}).get("search_stop")
        if isinstance(stop, dict) and stop.get("after_epoch") is not None:
            return int(stop["after_epoch"])
    return None


def truncate_metrics(path: str | Path, last_epoch: int) -> None:
    """Keep only the lines with ``epoch <= last_epoch`` (used on resume).

    A last line that is not JSON (cut short by a writer that was not atomic, e.g. a copy
    interrupted midway) is dropped too; a bad line before the last still raises
    :class:`~cryospin.errors.InputError`.
    """
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").rstrip().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a half-written last line: its epoch is not in the checkpoint
            raise InputError(f"line {number} is not JSON", path) from None
    rows = [r for r in rows if int(r.get("epoch", 0)) <= last_epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class NonFiniteLossError(CryospinError):
    """The loss became NaN or Inf; the message names the stage, epoch and batch."""

    def __init__(self, stage: str, epoch: int, batch: int) -> None:
        self.stage, self.epoch, self.batch = stage, epoch, batch
        super().__init__(
            f"non-finite loss in {stage} epoch {epoch}, batch {batch} "
            "(the last complete checkpoint is kept; try lower learning rates or check the data)"
        )


def check_finite_loss(loss: Tensor, stage: str, epoch: int, batch: int) -> None:
    """Raise :class:`NonFiniteLossError` unless every element of ``loss`` is finite."""
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteLossError(stage, epoch, batch)


class NonFiniteGradientError(NonFiniteLossError):
    """A gradient became NaN or Inf (the loss was finite); raised before any parameter is
    updated with it. The message names what the gradient is of, the stage, epoch and batch."""

    def __init__(self, what: str, stage: str, epoch: int, batch: int) -> None:
        self.what = what
        CryospinError.__init__(
            self,
            f"non-finite gradient of the {what} in {stage} epoch {epoch}, batch {batch} "
            "(the last complete checkpoint is kept; try lower learning rates or check the data)",
        )
        self.stage, self.epoch, self.batch = stage, epoch, batch


def check_finite_gradients(
    gradients: Mapping[str, Iterable[Tensor | None]], stage: str, epoch: int, batch: int
) -> None:
    """Raise :class:`NonFiniteGradientError` unless every gradient is finite.

    Parameters
    ----------
    gradients : mapping of name -> iterable of tensors (or None, skipped)
        E.g. ``{"encoder": (p.grad for p in encoder.parameters()), "poses": (g_omega,)}``;
        the first name with a NaN/Inf element is reported.
    stage : str
    epoch, batch : int
        1-based, for the message.

    Notes
    -----
    One host synchronisation per call (the per-tensor checks are stacked first).
    """
    names, flags = [], []
    for name, tensors in gradients.items():
        checks = [torch.isfinite(g).all() for g in tensors if g is not None]
        if checks:
            names.append(name)
            flags.append(torch.stack(checks).all())
    if not flags:
        return
    ok = torch.stack(flags).cpu()  # (G,) bool, one sync
    if not bool(ok.all()):
        raise NonFiniteGradientError(names[int((~ok).nonzero()[0])], stage, epoch, batch)
