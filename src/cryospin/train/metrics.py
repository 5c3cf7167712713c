"""Training metrics: a running mean and the guards against a non-finite loss or gradient.

The run's ``metrics.jsonl`` (:class:`cryospin.rundir.EpochMetrics`, its readers and writers)
belongs to the run folder's contract, :mod:`cryospin.rundir`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, NotRequired, TypedDict

import torch
from torch import Tensor

from cryospin.errors import CryospinError

__all__ = [
    "SwitchRecord",
    "SearchStopRecord",
    "SearchStopRule",
    "search_stop_record",
    "search_stop_message",
    "search_stop_reason",
    "SymmetryRecord",
    "RelaxRecord",
    "RebackprojectRecord",
    "ConsensusRecord",
    "EpochExtra",
    "HypothesesRecord",
    "RunningMean",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "check_finite_loss",
    "check_finite_gradients",
]


class HypothesesRecord(TypedDict):
    """``extra["switch"]["hypotheses"]`` (:mod:`cryospin.train.hypotheses`): hypotheses per
    particle, Adam steps on each, their disc (cycles per box; None: the training disc), the
    fraction of particles that kept another hypothesis than the encoder's winner, and the
    refinement's wall time."""

    count: int
    steps: int
    radius_px: float | None
    other_than_winner_fraction: float
    wall_time_s: float


class SwitchRecord(TypedDict):
    """``extra["switch"]`` of the switch's epoch: the best heads' usage (fraction per head;
    with hypotheses, of the heads kept), their mean loss, the switch's wall time and where the
    poses came from (``"inference"``, ``"last_epoch"``, or ``"random"`` for a search-only run
    with no encoder: no usage, loss None); ``hypotheses`` when the switch refined several per
    particle."""

    head_usage: list[float]
    mean_loss: float | None
    wall_time_s: float
    poses: str
    hypotheses: NotRequired[HypothesesRecord]


#: which rule ended the global search early (:func:`cryospin.train.schedule.search_stops`)
SearchStopRule = Literal["few", "plateau", "settled"]


class SearchStopRecord(TypedDict):
    """``extra["search_stop"]``: the epoch after which the global search stopped early, the
    fraction of particles that jumped (and in the search epoch before), the thresholds, the
    local epochs that follow and the rule that stopped it (``few``: below ``stop_fraction``;
    ``plateau``: ``schedule.search_plateau_fraction``; ``settled``: the mean loss fell by
    ``loss_drop_nats`` < ``settled_nats`` per image; absent in cryospin <= 0.2's records)."""

    after_epoch: int
    jump_fraction: float
    threshold_deg: float
    stop_fraction: float
    local_epochs: int
    rule: NotRequired[SearchStopRule]
    previous_jump_fraction: NotRequired[float]
    loss_drop_nats: NotRequired[float]
    settled_nats: NotRequired[float]


def search_stop_record(epoch: int, jump_fraction: float, previous: float | None, *,
                       rule: SearchStopRule, threshold_deg: float,
                       stop_fraction: float, local_epochs: int,
                       loss_drop_nats: float | None = None,
                       settled_nats: float | None = None) -> SearchStopRecord:
    """The record of the global search's early stop by ``rule``
    (:func:`cryospin.train.schedule.search_stops`) after ``epoch``, in which a fraction
    ``jump_fraction`` of the particles moved by more than ``threshold_deg`` (``previous``: the
    search epoch before's; None: none; ``loss_drop_nats``: the fall of the mean loss since
    that epoch, nats per image, recorded with ``settled_nats`` for the settled rule)."""
    record: SearchStopRecord = {
        "after_epoch": epoch, "jump_fraction": jump_fraction, "threshold_deg": threshold_deg,
        "stop_fraction": stop_fraction, "local_epochs": local_epochs, "rule": rule}
    if previous is not None:
        record["previous_jump_fraction"] = float(previous)
    if loss_drop_nats is not None:
        record["loss_drop_nats"] = float(loss_drop_nats)
    if settled_nats is not None:
        record["settled_nats"] = float(settled_nats)
    return record


def search_stop_reason(record: SearchStopRecord) -> str:
    """Why the search stopped, in words, for a :func:`search_stop_record` (the rule and its
    figures, e.g. ``< 2 %``)."""
    if record.get("rule") == "plateau":
        return (f"no longer falling: {100 * record.get('previous_jump_fraction', 0.0):.1f} % "
                "in the search epoch before")
    if record.get("rule") == "settled":
        drop, bar = record.get("loss_drop_nats", 0.0), record.get("settled_nats", 0.0)
        change = (f"fell by {drop:.2g} < {bar:g}" if drop >= 0 else
                  f"rose by {-drop:.2g} (a fall of {bar:g} needed)")
        return f"the fit no longer improves: the mean loss {change} nats per image"
    return f"< {100 * record['stop_fraction']:g} %"


def search_stop_message(record: SearchStopRecord) -> str:
    """One log line for a :func:`search_stop_record`."""
    return (f"global search done after epoch {record['after_epoch']}: "
            f"{100 * record['jump_fraction']:.1f} % of particles jumped > "
            f"{record['threshold_deg']:g} deg ({search_stop_reason(record)}); "
            f"{record['local_epochs']} local epochs follow")


class SymmetryRecord(TypedDict):
    """``extra["symmetry"]`` of the epoch that began with the impose-symmetry step
    (:mod:`cryospin.train.impose`): the group imposed (``C1``: none found), its score, the
    frame ``M`` (row-major `(3, 3)`) and the centre ``c`` (xyz px of the training box)."""

    group: str
    score: float
    rotation: list[list[float]]
    centre_px: list[float]


class RelaxRecord(TypedDict):
    """``extra["relax"]`` of a stage-2 epoch with ``model.relax_symmetry``
    (:mod:`cryospin.train.relax`): the group relaxed (``C1``: none, as when ``auto`` found no
    group or a non-cyclic one), the group placed in (or detected on) the epoch's starting map
    and its score there, the fraction of particles moved to another copy and the centre ``c``
    (xyz px)."""

    group: str
    detected: str
    score: float
    moved_fraction: float
    centre_px: list[float]


class RebackprojectRecord(TypedDict):
    """``extra["rebackproject"]`` of the epoch that began with the volume re-made from the
    poses (``optim.rebackproject_after_search`` or ``_during_search``,
    :mod:`cryospin.train.rebackproject`): how many images, with which group, in how many
    seconds, whether a search epoch began with it (absent in runs made before
    2026-12-06: after the search) and up to which shell it was re-made (``radius_px``,
    cycles per box; None: every frequency; absent before 2026-12-07: every frequency)."""

    images: int
    group: str
    seconds: float
    during_search: bool
    radius_px: int | None


class ConsensusRecord(TypedDict):
    """``extra["consensus"]`` of the epoch after the search with ``optim.copy_consensus``
    (:mod:`cryospin.train.consensus`): the pseudo-symmetry worked with (``C1``: none),
    whether it was given (``optim.copy_consensus`` a group, not ``auto``), the point group the
    map showed (``C1``: none; a given group: that group), the score (of the pseudo-symmetry,
    else of the group shown, else of the best cyclic group), the rounds and each round's
    fraction of particles moved, the mean NLL of the images under the map from the old and
    from the new poses (None when nothing was done), whether the new poses were kept, and
    the wall time."""

    group: str
    given: bool
    detected: str
    score: float
    rounds: int
    moved_fractions: list[float]
    nll_before: float | None
    nll_after: float | None
    kept: bool
    seconds: float


class EpochExtra(TypedDict, total=False):
    """:attr:`cryospin.rundir.EpochMetrics.extra` as training writes it."""

    switch: SwitchRecord
    search_stop: SearchStopRecord
    symmetry: SymmetryRecord
    relax: RelaxRecord
    rebackproject: RebackprojectRecord
    consensus: ConsensusRecord


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
    One host synchronisation per call. Each tensor is first reduced to its sum: a NaN or Inf
    element makes the sum NaN or Inf, so finite sums prove finite tensors (one pass over the
    memory; ``isfinite().all()`` on every tensor took ~17x longer on the encoder's 8.3 M
    gradients). A non-finite sum can also come from finite elements that overflow when added,
    so only then are that name's tensors checked element by element.
    """
    names, tensor_lists = [], []
    for name, tensors in gradients.items():
        present = [g for g in tensors if g is not None]
        if present:
            names.append(name)
            tensor_lists.append(present)
    if not names:
        return
    sums = [torch.stack([g.detach().sum().float() for g in group]) for group in tensor_lists]
    sums_ok = torch.stack([s.isfinite().all() for s in sums]).cpu()  # (G,) bool, one sync
    for name, group, ok in zip(names, tensor_lists, sums_ok.tolist(), strict=True):
        if not ok and not all(bool(torch.isfinite(g).all()) for g in group):
            raise NonFiniteGradientError(name, stage, epoch, batch)
