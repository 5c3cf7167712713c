"""Choosing among runs that differ only in their seed (``cryospin choose-run``).

Ab initio reconstruction is not convex: a run can settle on a wrong structure, and whether it
does can depend on its seed alone (benchmarks/RESULTS.md, "A search that stops when the fit
stops improving": the demo test's seed 6 fails, the same data with four other run seeds
converge). Runs of the same particles under the same configuration fit the same images with
the same model, loss and noise variance (estimated deterministically from the data,
:mod:`cryospin.train.data`), so their **final loss** — the last epoch's mean Gaussian negative
log-likelihood, nats per image (docs/conventions.md, "When the global search stops") — says
which fits the images best: the difference of two runs' final losses is a mean
log-likelihood ratio per image. :func:`choose_run` keeps the lowest.

Comparable runs (:func:`comparison_problems`): finished plain runs (``map.mrc`` written; a
``--halves`` or ``--starts`` folder is refused), made by the same cryospin version, of the same
particle set (``particle_set.json``, :mod:`cryospin.io.identity`; the data may have moved),
whose configurations are equal except the seed and :data:`FREE_FIELDS` (how and where the run
was computed, not what it fits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryospin.errors import InputError
from cryospin.io.identity import ParticleSetIdentity, identity_differences, load_identity
from cryospin.rundir import HALVES_MARKER, STARTS_MARKER, RunData, load_run, search_stop_of

__all__ = ["CRITERION", "FREE_FIELDS", "RunOutcome", "run_outcome", "comparison_problems",
           "choose_run"]

#: The criterion of :func:`choose_run`, as tables and ``choice.json`` state it.
CRITERION = ("the lowest final loss: the last epoch's mean negative log-likelihood of the "
             "images, nats per image")

#: Configuration fields that may differ between runs to choose from (besides ``run.seed``):
#: where and how fast the run was computed, what it displayed, and which final map it wrote.
#: ``schedule.epochs`` is not among them: a longer run fits better by construction.
FREE_FIELDS: frozenset[str] = frozenset({
    "run.seed", "run.device", "run.num_threads", "run.progress", "run.progress_interval_s",
    "run.final_map", "run.keep_epoch_maps", "run.inference_batch_size", "run.track_particles",
    "model.precision", "data.max_preload_gb", "data.max_memory_gb", "data.cache_dir",
})

#: ``config.yaml`` sections compared field by field (``input`` names files, which may move:
#: the particle set's identity is compared instead; ``resolved`` and ``argv`` describe the
#: machine and the command line).
_COMPARED_SECTIONS = ("model", "optim", "schedule", "data", "run")


class _Absent:
    """A field one ``config.yaml`` lacks (an older cryospin's, say)."""

    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


@dataclass(frozen=True)
class RunOutcome:
    """A finished run, as :func:`choose_run` compares it.

    Attributes
    ----------
    run : RunData
        The run folder as read (:func:`cryospin.rundir.load_run`).
    identity : ParticleSetIdentity
        Its particles (``particle_set.json``).
    seed : int or None
        ``run.seed`` of its ``config.yaml``.
    epochs : int
        The last epoch completed.
    final_loss_nats : float
        The last epoch's mean loss, nats per image (finite).
    search_stop_rule : str or None
        The rule that ended the global search early (``few``, ``plateau``, ``settled``), or
        None when it ran all its epochs (or the run had none).
    search_stopped_after : int or None
        The epoch after which the search stopped early.
    """

    run: RunData
    identity: ParticleSetIdentity
    seed: int | None
    epochs: int
    final_loss_nats: float
    search_stop_rule: str | None
    search_stopped_after: int | None

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return self.run.run_dir


def run_outcome(run_dir: str | Path) -> RunOutcome:
    """Read a finished plain run folder.

    Raises
    ------
    InputError
        Naming the folder: not a run folder, a ``--halves`` or ``--starts`` run, not finished, no
        ``particle_set.json`` (a run older than the record), no or a non-finite final loss.
    """
    folder = Path(run_dir)
    if (folder / HALVES_MARKER).is_file():
        raise InputError("a --halves run: choose-run compares plain runs (their FSC between "
                         "halves, fsc.json, is what tells --halves runs apart)", folder)
    if (folder / STARTS_MARKER).is_file():
        raise InputError("a --starts run: its choice is in choice.json; give its start_* "
                         "folders to compare them with other runs", folder)
    run = load_run(folder)
    if not run.finished:
        last = int(run.metrics[-1]["epoch"]) if run.metrics else 0
        raise InputError(f"the run has not finished (last epoch {last}, no map.mrc): "
                         f"finish it first with cryospin reconstruct --resume {folder}", folder)
    identity = load_identity(run.files.particle_set)
    if identity is None:
        raise InputError("no particle_set.json (a run made before cryospin recorded its "
                         "particles): cannot tell whether it fits the same images", folder)
    if not run.metrics:
        raise InputError("no metrics.jsonl: no final loss to compare", folder)
    last_row = run.metrics[-1]
    loss = last_row.get("loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise InputError(f"the last epoch's loss is {loss!r}, not a finite number",
                         run.files.metrics)
    stop = search_stop_of(run.metrics)
    seed = _section(run.config, "run").get("seed")
    return RunOutcome(
        run=run, identity=identity, seed=int(seed) if isinstance(seed, int) else None,
        epochs=int(last_row["epoch"]), final_loss_nats=float(loss),
        search_stop_rule=None if stop is None else str(stop.get("rule") or "few"),
        search_stopped_after=None if stop is None else int(stop["after_epoch"]),
    )


def comparison_problems(reference: RunOutcome, other: RunOutcome) -> list[str]:
    """What keeps ``other``'s final loss from being compared with ``reference``'s:
    ``["cryospin 0.2.0 vs 0.1.0", "particles: count 900 vs 1000", "schedule.epochs 20 vs
    16", ...]`` ([] when comparable; the configuration's fields other than
    :data:`FREE_FIELDS`, ``other``'s value first)."""
    out = []
    mine = reference.run.config.get("cryospin_version")
    theirs = other.run.config.get("cryospin_version")
    if mine != theirs:
        out.append(f"cryospin {theirs} vs {mine}")
    out += [f"particles: {d}" for d in identity_differences(reference.identity, other.identity)]
    a, b = _flat(reference.run.config), _flat(other.run.config)
    for name in sorted(set(a) | set(b)):
        mine_value, their_value = a.get(name, _ABSENT), b.get(name, _ABSENT)
        if name in FREE_FIELDS or mine_value == their_value:
            continue
        out.append(f"{name} {their_value} vs {mine_value}")
    return out


def choose_run(outcomes: Sequence[RunOutcome]) -> int:
    """The index of the run with the lowest final loss (the first of equals; 0 of one run: a
    ``--starts`` folder of one start, a half of ``--halves`` before it gets another).

    Raises
    ------
    InputError
        No run, a folder given twice, or runs that are not comparable with the first (naming
        the run and every difference).
    """
    if not outcomes:
        raise InputError("no run to choose from")
    seen: set[Path] = set()
    for o in outcomes:
        key = o.run_dir.resolve()
        if key in seen:
            raise InputError("the same run folder given twice", o.run_dir)
        seen.add(key)
    first = outcomes[0]
    for o in outcomes[1:]:
        problems = comparison_problems(first, o)
        if problems:
            raise InputError(f"not comparable with {first.run_dir}: {'; '.join(problems)} "
                             "(runs to choose from differ only in their seed)", o.run_dir)
    return min(range(len(outcomes)), key=lambda i: (outcomes[i].final_loss_nats, i))


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"schedule.epochs": 16, ...}`` of the compared sections."""
    return {f"{s}.{k}": v for s in _COMPARED_SECTIONS for k, v in _section(config, s).items()}


