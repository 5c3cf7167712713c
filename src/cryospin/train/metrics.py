"""Per-epoch training metrics and the run's ``metrics.jsonl`` (one JSON object per epoch).

Fields of a line (all stages): ``epoch`` (from 1), ``stage`` (``"autoencode"`` |
``"autodecode"``), ``loss`` (mean per-image NLL of the epoch, winner head in stage 1),
``num_images``, ``wall_time_s`` (the epoch's training time), ``images_per_s``, ``head_usage``
(fraction of images won by each head: stage 1 over the epoch; at the switch, over the inference
pass; otherwise None), ``mean_pose_change_deg`` (stage 2: mean geodesic change of the pose of
each visited particle during the epoch; None in stage 1), ``mean_shift_change_px`` (stage 2 with
shifts), ``decoder_lr`` and ``elapsed_s`` (since the start of the run, including resumed parts).
"""

from __future__ import annotations

import json
import math
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
    "check_finite_loss",
    "append_metrics",
    "read_metrics",
    "truncate_metrics",
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
    mean_pose_change_deg: float | None = None
    mean_shift_change_px: float | None = None
    decoder_lr: float | None = None
    elapsed_s: float | None = None
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


def truncate_metrics(path: str | Path, last_epoch: int) -> None:
    """Keep only the lines with ``epoch <= last_epoch`` (used on resume)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if int(r.get("epoch", 0)) <= last_epoch]
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
