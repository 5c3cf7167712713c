"""The run folder's contract: file names, stage names, the checkpoint, ``metrics.jsonl``.

The one home of what a run folder holds; every other module asks this one instead of spelling
a name. A low layer: it imports :mod:`cryospin.errors` and :mod:`cryospin.atomic` only (never
train, evaluate, report or cli), and torch only to save or load a checkpoint, so that the CLI
can ask it for names at start-up without importing torch.

Public names (kept stable):

* file names (``CONFIG``, ``CHECKPOINT``, ``METRICS``, ``MAP``, ..., a halves run's
  ``HALVES_MARKER``, ``HALF_SET``, ``HALF_NAMES``, ...), the epoch maps ``map.NNN.mrc``
  (:func:`epoch_map_name`, :data:`EPOCH_MAP_PATTERN`); :class:`RunFiles` and
  :class:`HalvesFiles`, the paths of one folder; :func:`prepare_run_dir`;
* :class:`Stage` — the training stages, a ``str`` enum whose values (``"autoencode"``,
  ``"autodecode"``) are what ``metrics.jsonl`` and checkpoints hold;
* :class:`Checkpoint` — the typed checkpoint (``to_dict`` / ``from_dict`` give the on-disk
  dict, format :data:`CHECKPOINT_FORMAT`, unchanged since cryospin 0.1), with
  :func:`save_checkpoint` / :func:`load_checkpoint` for the raw dict;
* :data:`RESUMABLE_OPTIONS` and :func:`resume_conflicts` — the one allow-list of the
  configuration fields that may change on ``--resume``, used by the CLI and the trainer;
* :class:`EpochMetrics` and its readers and writers — ``metrics.jsonl``;
* :class:`RunData` and :func:`load_run` — what a report or the posterior reads from a run.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cryospin import __version__
from cryospin.atomic import atomic_path, atomic_write_text
from cryospin.errors import InputError, OutputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG", "CHECKPOINT", "METRICS", "POSE_TRACK", "RUN_LOG", "PARTICLE_SET", "MAP",
    "MAP_DECODER", "CONVERGENCE", "POSES_STAR", "POSES_PKL", "POSES_CS", "SELECTED", "REPORT_HTML",
    "FSC_JSON", "NOISE_SPECTRUM",
    "EPOCH_MAP_PATTERN", "epoch_map_name", "marker_count", "HALVES_MARKER", "HALF_SET",
    "HALF_NAMES", "HALF_MAPS", "POSTPROCESS_MAP", "PostprocessFiles",
    "HALF_INDICES", "STARTS_MARKER", "STARTS_CHOICE", "CHOSEN_LINK", "RunFiles", "StartsFiles",
    "HalvesFiles", "prepare_run_dir", "Stage", "CHECKPOINT_FORMAT",
    "Checkpoint", "save_checkpoint", "load_checkpoint", "RESUMABLE_OPTIONS", "RELOCATABLE_SECTION",
    "resume_conflicts", "EpochMetrics", "append_metrics", "read_metrics", "truncate_metrics",
    "search_stop_of", "search_stopped_after", "RunData", "load_run",
]

# ----------------------------------------------------------------------------- file names
#: The configuration as given, with version and command lines (:mod:`cryospin.train.config`).
CONFIG = "config.yaml"
#: The last complete epoch's :class:`Checkpoint`.
CHECKPOINT = "checkpoint.pt"
#: One :class:`EpochMetrics` JSON line per epoch.
METRICS = "metrics.jsonl"
#: The tracked particles' poses per epoch (:mod:`cryospin.train.track`).
POSE_TRACK = "pose_track.npz"
#: What the run logged (:mod:`cryospin.train.runlog`).
RUN_LOG = "run.log"
#: The particles' identity that ``--resume`` checks (:mod:`cryospin.io.identity`).
PARTICLE_SET = "particle_set.json"
#: The final map (plain run: the backprojection or the trained volume; halves: the average).
MAP = "map.mrc"
#: The trained volume when ``map.mrc`` is the backprojection.
MAP_DECODER = "map_decoder.mrc"
#: FSC of ``map.mrc`` and ``map_decoder.mrc`` (:mod:`cryospin.train.convergence`).
CONVERGENCE = "convergence_fsc.json"
#: Final poses: RELION 3.1, cryoDRGN, cryoSPARC (only for a ``.cs`` input).
POSES_STAR = "poses.star"
POSES_PKL = "poses.pkl"
POSES_CS = "poses.cs"
#: 0-based indices of the particles the map explains better than an empty image
#: (:mod:`cryospin.train.scores`), a cryoDRGN ``--ind`` pickle.
SELECTED = "selected.pkl"
#: The run report (:mod:`cryospin.report`).
REPORT_HTML = "report.html"
#: The noise spectrum the run whitened with (:mod:`cryospin.train.noise_record`).
NOISE_SPECTRUM = "noise_spectrum.json"
#: An FSC curve with its crossings (:func:`cryospin.evaluate.fsc.write_fsc_json`).
FSC_JSON = "fsc.json"
#: ``map.NNN.mrc``, the map after epoch ``NNN`` (group 1: the epoch).
EPOCH_MAP_PATTERN = re.compile(r"^map\.(\d+)\.mrc$")

#: A halves run (``reconstruct --halves``, :mod:`cryospin.train.halves`): its marker, the
#: split, the two half runs' folders and their maps (half B aligned into A's frame), and the
#: 0-based particle indices each half run trains on (in its own folder).
HALVES_MARKER = "halves.json"
HALF_SET = "half_set.npy"
HALF_NAMES = ("half_A", "half_B")
HALF_MAPS = ("half_A.mrc", "half_B.mrc")
#: A halves run's sharpened, low-passed map (RELION ``postprocess``'s name).
POSTPROCESS_MAP = "postprocess.mrc"
HALF_INDICES = "particles.ind.npy"

#: A several-starts run (``reconstruct --starts K``, :mod:`cryospin.train.starts`): its marker,
#: the choice among the starts (``cryospin.train.choice_record``), the link to the chosen
#: start's folder, and the starts' folders (``start_1`` ...).
STARTS_MARKER = "starts.json"
STARTS_CHOICE = "choice.json"
CHOSEN_LINK = "chosen"


def marker_count(marker: Path, key: str, *, kind: str, default: int | None = None,
                 minimum: int = 1) -> int:
    """The whole number ``key`` of a workflow folder's marker (``halves.json``,
    ``starts.json``); ``default`` when the marker lacks it (None: it must have it).

    Raises
    ------
    InputError
        No marker (``kind`` names the workflow: ``--starts``), an unreadable one, or a count
        below ``minimum``.
    """
    if not marker.is_file():
        raise InputError(f"not a {kind} run (no {marker.name} here)", marker.parent)
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        count = int(record[key] if default is None else record.get(key, default))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{marker.name} is unreadable", marker) from None
    if count < minimum:
        raise InputError(f"{marker.name} names {count} {key} (at least {minimum})", marker)
    return count


def epoch_map_name(epoch: int) -> str:
    """``map.NNN.mrc``: the map after ``epoch`` (from 1), at least three digits."""
    return f"map.{epoch:03d}.mrc"


class RunFiles:
    """Paths of the files in a (plain) run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.config = self.dir / CONFIG
        self.checkpoint = self.dir / CHECKPOINT
        self.metrics = self.dir / METRICS
        self.track = self.dir / POSE_TRACK
        self.map = self.dir / MAP
        self.map_decoder = self.dir / MAP_DECODER
        self.star = self.dir / POSES_STAR
        self.pkl = self.dir / POSES_PKL
        self.cs = self.dir / POSES_CS  # only for .cs inputs
        self.selected = self.dir / SELECTED
        self.log = self.dir / RUN_LOG
        self.particle_set = self.dir / PARTICLE_SET
        self.convergence = self.dir / CONVERGENCE
        self.noise_spectrum = self.dir / NOISE_SPECTRUM
        self.report = self.dir / REPORT_HTML

    def epoch_map(self, epoch: int) -> Path:
        """``map.NNN.mrc`` of ``epoch``."""
        return self.dir / epoch_map_name(epoch)

    def epoch_maps(self) -> dict[int, Path]:
        """The epoch maps present, by epoch, in epoch order."""
        found: dict[int, Path] = {}
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                m = EPOCH_MAP_PATTERN.match(p.name)
                if m and p.is_file():
                    found[int(m.group(1))] = p
        return dict(sorted(found.items()))


class StartsFiles:
    """Paths of the files in a several-starts run folder (``reconstruct --starts K``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.marker = self.dir / STARTS_MARKER
        self.config = self.dir / CONFIG
        self.particle_set = self.dir / PARTICLE_SET
        self.log = self.dir / RUN_LOG
        self.choice = self.dir / STARTS_CHOICE
        self.chosen = self.dir / CHOSEN_LINK

    def start_dir(self, k: int) -> Path:
        """Run folder of start ``k`` (from 1)."""
        return self.dir / f"start_{k}"


class PostprocessFiles:
    """Paths of the post-processing outputs (:mod:`cryospin.evaluate.postprocess`) in a folder:
    a ``--halves`` run's, or ``cryospin postprocess -o``'s."""

    def __init__(self, folder: str | Path) -> None:
        self.dir = Path(folder)
        self.map = self.dir / MAP  # FSC-weighted average
        self.mask = self.dir / "mask.mrc"
        self.masked_map = self.dir / "map_masked.mrc"
        self.postprocess = self.dir / "postprocess.star"
        self.postprocessed = self.dir / POSTPROCESS_MAP  # sharpened, low-passed
        self.postprocessed_masked = self.dir / "postprocess_masked.mrc"
        self.fsc_json = self.dir / FSC_JSON
        self.fsc_png = self.dir / "fsc.png"
        self.guinier_png = self.dir / "guinier.png"
        self.local_resolution = self.dir / "locres.mrc"
        self.local_resolution_png = self.dir / "locres.png"


class HalvesFiles(PostprocessFiles):
    """Paths of the files in a halves run folder (``reconstruct --halves``)."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(run_dir)
        self.marker = self.dir / HALVES_MARKER
        self.config = self.dir / CONFIG
        self.half_set = self.dir / HALF_SET
        self.half_maps = (self.dir / HALF_MAPS[0], self.dir / HALF_MAPS[1])
        self.star = self.dir / POSES_STAR
        self.pkl = self.dir / POSES_PKL
        self.log = self.dir / RUN_LOG
        self.cs = self.dir / POSES_CS  # only for .cs inputs
        self.selected = self.dir / SELECTED
        self.particle_set = self.dir / PARTICLE_SET
        self.report = self.dir / REPORT_HTML

    def half_dir(self, which: int) -> Path:
        """Folder of half set ``which`` (1 or 2): a ``--starts`` folder (its starts and the
        choice among them), or a run folder (``--max-starts 1``, and runs of one start per
        half from before ``--max-starts``)."""
        return self.dir / HALF_NAMES[which - 1]

    def half_run(self, which: int) -> Path:
        """The run folder holding half ``which``'s result: the ``chosen`` start of
        :meth:`half_dir` when it is a ``--starts`` folder (its ``starts.json``), else
        :meth:`half_dir` itself.

        Raises
        ------
        InputError
            A half of several starts without its choice (not every start has finished).
        """
        half = self.half_dir(which)
        if not (half / STARTS_MARKER).is_file():
            return half
        if not (half / CHOSEN_LINK).is_dir():
            raise InputError("the half has no chosen start (not every start has finished)",
                             half)
        return half / CHOSEN_LINK


def prepare_run_dir(run_dir: str | Path, *, resume: bool) -> RunFiles:
    """Create/check the run folder before any work is done.

    Raises
    ------
    OutputError
        When the folder cannot be created or written, or (without ``resume``) already holds a
        run (a plain one, or a ``--halves`` or ``--starts`` one).
    InputError
        When ``resume`` and there is neither a checkpoint nor a ``config.yaml`` (a run killed
        before its first checkpoint, with ``config.yaml`` written, resumes from epoch 1).
    """
    files = RunFiles(run_dir)
    if resume:
        if not files.checkpoint.is_file() and not files.config.is_file():
            raise InputError(f"no {CHECKPOINT} here to resume from", files.dir)
    else:
        if (files.checkpoint.exists() or files.metrics.exists()
                or (files.dir / HALVES_MARKER).exists() or (files.dir / STARTS_MARKER).exists()):
            raise OutputError(
                "already holds a run (use --resume to continue it, or choose another -o)",
                files.dir,
            )
        try:
            files.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder ({exc.strerror})",
                              files.dir) from None
    try:
        with tempfile.TemporaryFile(dir=files.dir):
            pass
    except OSError as exc:
        raise OutputError(f"output folder is not writable ({exc.strerror})", files.dir) from None
    return files


# ----------------------------------------------------------------------------- stages
class Stage(StrEnum):
    """The training stages; the values are what ``metrics.jsonl`` and checkpoints hold."""

    #: Stage 1: the encoder and the volume (winner-take-all over heads).
    AUTOENCODE = "autoencode"
    #: Stage 2: the pose table and the volume (after the switch).
    AUTODECODE = "autodecode"


# ----------------------------------------------------------------------------- checkpoint
#: Version of the checkpoint layout; bumped when keys change incompatibly.
CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly where it stopped (one epoch's commit).

    Saved as a dict (:meth:`to_dict`, keys ``format``, ``cryospin_version``, ``config``,
    ``stage``, ``epoch``, ``volume``, ``encoder``, ``pose_table``, ``optimizers``, ``rng``,
    ``data``, ``extra`` = ``{"elapsed_s", "search_stopped_after", "last_jump_fraction",
    "last_search_loss", "volume_symmetry", "last_junk_fraction"}``,
    ``switch_record``) with :func:`torch.save` through :func:`cryospin.atomic.atomic_path`;
    only tensors, numbers, strings, lists, tuples and dicts (``weights_only=True`` loads it).

    Attributes
    ----------
    config : dict
        The configuration as given (:func:`cryospin.train.config.config_to_dict`).
    stage : Stage
        Stage of the last completed epoch.
    epoch : int
        Last completed epoch (from 1).
    volume : dict
        The volume's ``state_dict``.
    encoder, pose_table : dict or None
        The encoder's ``state_dict`` (None after the switch) and the pose table's (None before).
    optimizers : dict
        Optimiser name (``"decoder"``, ``"encoder"``, ``"grad_scaler"``) -> state dict.
    rng : dict
        The generators' states (:func:`cryospin.train.state.capture_rng_state`).
    data : dict
        Normalisation facts (``TrainingData.summary()``; empty in very old checkpoints).
    elapsed_s : float
        Training time since the run started, resumed parts included.
    search_stopped_after : int or None
        The epoch after which the global search stopped early (:mod:`cryospin.train.schedule`).
    last_jump_fraction : float or None
        The last search epoch's ``jump_fraction`` (the plateau rule of the early stop compares
        the next with it); None before any search epoch and in older checkpoints.
    last_search_loss : float or None
        The last search epoch's mean loss, nats per image (the settled rule of the early stop
        compares the next with it); None before any search epoch and in older checkpoints.
    switch_record : dict or None
        The last stage-1 epoch's winners when stopped at the switch
        (``schedule.switch_poses = last_epoch``).
    volume_symmetry : str or None
        The volume's group (C1 before :mod:`cryospin.train.impose`); None: model.symmetry.
    last_junk_fraction : float or None
        The last stage-2 epoch's ``junk_fraction`` (``model.junk_class``; the next epoch's
        gate, :func:`cryospin.train.scores.junk_takes_effect`); None before and without.
    """

    config: dict[str, Any]
    stage: Stage
    epoch: int
    volume: dict[str, Any]
    encoder: dict[str, Any] | None = None
    pose_table: dict[str, Any] | None = None
    optimizers: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    search_stopped_after: int | None = None
    last_jump_fraction: float | None = None
    last_search_loss: float | None = None
    switch_record: dict[str, Any] | None = None
    volume_symmetry: str | None = None
    last_junk_fraction: float | None = None
    cryospin_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (format :data:`CHECKPOINT_FORMAT`; plain ``str`` stage)."""
        return {  # the key order of cryospin <= 0.2's writer
            "cryospin_version": self.cryospin_version,
            "config": self.config,
            "stage": str(self.stage.value),
            "epoch": int(self.epoch),
            "volume": self.volume,
            "encoder": self.encoder,
            "pose_table": self.pose_table,
            "optimizers": self.optimizers,
            "rng": self.rng,
            "data": self.data,
            "extra": {"elapsed_s": self.elapsed_s,
                      "search_stopped_after": self.search_stopped_after}
                     | ({"last_jump_fraction": self.last_jump_fraction}
                        if self.last_jump_fraction is not None else {})
                     | ({"last_search_loss": self.last_search_loss}
                        if self.last_search_loss is not None else {})
                     | ({"volume_symmetry": self.volume_symmetry} if self.volume_symmetry else {})
                     | ({"last_junk_fraction": self.last_junk_fraction}
                        if self.last_junk_fraction is not None else {}),
            "switch_record": self.switch_record,
            "format": CHECKPOINT_FORMAT,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], *, where: str | Path = "checkpoint",
                  ) -> Checkpoint:
        """Inverse of :meth:`to_dict`; also reads older checkpoints of the same format
        (no ``data``, ``extra``, ``search_stopped_after`` or ``switch_record``: defaults).

        Raises :class:`~cryospin.errors.InputError` naming ``where`` for an unknown stage or a
        missing key."""
        try:
            stage = Stage(state["stage"])
            extra = state.get("extra") or {}
            stopped = extra.get("search_stopped_after")
            jumps = extra.get("last_jump_fraction")
            search_loss = extra.get("last_search_loss")
            junk = extra.get("last_junk_fraction")
            return cls(
                config=state["config"], stage=stage, epoch=int(state["epoch"]),
                volume=state["volume"], encoder=state.get("encoder"),
                pose_table=state.get("pose_table"),
                optimizers=dict(state.get("optimizers") or {}), rng=state.get("rng") or {},
                data=state.get("data") or {},
                elapsed_s=float(extra.get("elapsed_s", 0.0)),
                search_stopped_after=None if stopped is None else int(stopped),
                last_jump_fraction=None if jumps is None else float(jumps),
                last_search_loss=None if search_loss is None else float(search_loss),
                switch_record=state.get("switch_record"),
                volume_symmetry=extra.get("volume_symmetry"),
                last_junk_fraction=None if junk is None else float(junk),
                cryospin_version=str(state.get("cryospin_version", "")),
            )
        except KeyError as exc:
            raise InputError(f"the checkpoint has no {exc.args[0]!r}", where) from None
        except ValueError:
            raise InputError(f"unknown stage {state.get('stage')!r} in the checkpoint",
                             where) from None

    def save(self, path: str | Path) -> None:
        """:func:`save_checkpoint` of :meth:`to_dict`."""
        save_checkpoint(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
        """:meth:`from_dict` of :func:`load_checkpoint`."""
        return cls.from_dict(load_checkpoint(path, map_location=map_location), where=path)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write the checkpoint dict ``state`` to ``path`` atomically (the old file survives any
    failure; a crash or Ctrl-C during the write leaves the last good one usable).

    ``format`` is added when missing. Raises :class:`cryospin.errors.OutputError` (one line
    naming ``path`` and the reason) if the folder is not writable, the disk is full or the
    file-size limit is reached; the temporary file is removed and the previous checkpoint is
    left as it was.
    """
    import torch  # here: the CLI imports this module at start-up, without torch

    state = dict(state)
    state.setdefault("format", CHECKPOINT_FORMAT)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # through a Python file object, so that a failed write (ENOSPC, EFBIG) raises an
        # OSError that atomic_path reports, not only torch's opaque "unexpected pos" error
        torch.save(state, fh)


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read the dict written by :func:`save_checkpoint` (:meth:`Checkpoint.load`: typed).

    Raises
    ------
    InputError
        When the file is missing, unreadable, not a checkpoint, or of an unknown format.
    """
    import torch  # here: the CLI imports this module at start-up, without torch

    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found (nothing to resume)", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"not a readable cryospin checkpoint ({first})", path) from None
    if not isinstance(state, dict) or "format" not in state:
        raise InputError("not a cryospin checkpoint", path)
    if state["format"] != CHECKPOINT_FORMAT:
        raise InputError(
            f"checkpoint format {state['format']} is not supported "
            f"(this cryospin reads format {CHECKPOINT_FORMAT})",
            path,
        )
    return state


# ----------------------------------------------------------------------------- resume
#: The configuration fields (``section.field``) that may differ from the run's checkpoint on
#: ``--resume``: none of them changes what an epoch computes. ``schedule.epochs`` trains
#: longer (or stops sooner); ``run.device``, ``run.num_threads``, ``model.precision`` move the
#: run to another machine; ``run.progress*`` only change the display; ``run.final_map`` only
#: chooses what the end writes as ``map.mrc``. Used by ``cryospin reconstruct --resume`` (its
#: flags) and by the trainer (:func:`resume_conflicts`), so both accept the same changes.
RESUMABLE_OPTIONS: frozenset[str] = frozenset({
    "schedule.epochs", "run.device", "run.num_threads", "run.progress",
    "run.progress_interval_s", "run.final_map", "model.precision",
})
#: The configuration section that names where the data lives: it may change on resume (the
#: data may have moved); the particles' identity is checked instead (:data:`PARTICLE_SET`).
RELOCATABLE_SECTION = "input"


def resume_conflicts(given: Mapping[str, Mapping[str, Any]],
                     saved: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ``section.field`` names where the configuration ``given`` for a resume differs from
    the run's ``saved`` one outside :data:`RESUMABLE_OPTIONS` and :data:`RELOCATABLE_SECTION`
    (both as :func:`cryospin.train.config.config_to_dict` gives them); empty: resumable."""
    out = []
    for section in dict.fromkeys([*given, *saved]):
        if section == RELOCATABLE_SECTION:
            continue
        mine, theirs = given.get(section) or {}, saved.get(section) or {}
        for key in dict.fromkeys([*mine, *theirs]):
            name = f"{section}.{key}"
            if name not in RESUMABLE_OPTIONS and mine.get(key) != theirs.get(key):
                out.append(name)
    return out


# ----------------------------------------------------------------------------- metrics.jsonl
@dataclass
class EpochMetrics:
    """One line of ``metrics.jsonl``.

    Fields (all stages): ``epoch`` (from 1), ``stage`` (a :class:`Stage` value), ``loss`` (mean
    per-image NLL of the epoch, winner head in stage 1), ``num_images``, ``wall_time_s`` (the
    epoch's training time), ``images_per_s``, ``head_usage`` (fraction of images won by each
    head: stage 1 over the epoch; at the switch, over the inference pass; otherwise None),
    ``head_spread_deg`` (stage 1: per head, how much its rotation varies from image to image,
    :func:`cryospin.losses.head_spread_deg` averaged over the epoch's batches; 0 = one rotation
    for every image, ≈ 132 = uniformly random; absent from older files),
    ``mean_pose_change_deg`` (stage 2: mean geodesic change of the pose of each visited particle
    during the epoch; None in stage 1), ``mean_shift_change_px`` (stage 2 with shifts),
    ``decoder_lr``, ``pose_lr`` (stage 2's rotation learning rate), ``elapsed_s`` (since the
    start of the run, including resumed parts) and ``jump_fraction`` (stage 2: fraction of the
    visited particles whose rotation moved by more than
    ``cryospin.train.autodecode.JUMP_THRESHOLD_DEG`` during the epoch; absent from files
    written before it existed; with ``model.empty_class``, of the images more likely particle
    than empty), ``encoder_lr`` (stage 1: the encoder's learning rate at the epoch's last step;
    absent from older files), ``empty_fraction`` (stage 2 with ``model.empty_class`` or
    ``model.junk_class``: the fraction of images likeliest empty; otherwise None),
    ``junk_fraction`` (stage 2 with ``model.junk_class``: the fraction of images likeliest
    junk; otherwise None, absent from older files), ``junk_weighted`` (stage 2 with
    ``model.junk_class``: whether the junk class weighed in,
    :func:`cryospin.train.scores.junk_takes_effect`). ``extra`` holds ``"switch"`` (the
    switch's epoch), ``"search_stop"`` (the global search's early stop;
    :func:`search_stopped_after`) and
    ``"symmetry"`` (the impose-symmetry step, :mod:`cryospin.train.impose`).
    """

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
    encoder_lr: float | None = None
    empty_fraction: float | None = None
    junk_fraction: float | None = None
    junk_weighted: bool | None = None
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


def search_stop_of(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The record of the global search's early stop, from :func:`read_metrics` rows (the
    ``extra["search_stop"]`` of that epoch's line: ``after_epoch``, ``rule``, ...), or None
    when it did not stop early (or the file predates early stopping)."""
    for row in rows:
        stop = (row.get("extra") or {}).get("search_stop")
        if isinstance(stop, dict) and stop.get("after_epoch") is not None:
            return stop
    return None


def search_stopped_after(rows: Iterable[Mapping[str, Any]]) -> int | None:
    """The epoch after which the global search stopped early (:func:`search_stop_of`), or
    None when it did not."""
    stop = search_stop_of(rows)
    return None if stop is None else int(stop["after_epoch"])


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


# ----------------------------------------------------------------------------- load_run
@dataclass(frozen=True)
class RunData:
    """What a report reads from a run folder (maps and poses are read on demand).

    Attributes
    ----------
    run_dir : Path
    metrics : list of dict
        Lines of ``metrics.jsonl`` in epoch order (:class:`EpochMetrics`).
    config : dict
        ``config.yaml`` parsed (empty when absent).
    config_text : str or None
        ``config.yaml`` verbatim.
    map_path : Path or None
        ``map.mrc``, else the last epoch's map (unfinished run), else None.
    epoch_maps : dict[int, Path]
        ``map.NNN.mrc`` by epoch.
    poses_path : Path or None
        ``poses.star`` when the run finished.
    finished : bool
        ``map.mrc`` exists.
    """

    run_dir: Path
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    config_text: str | None
    map_path: Path | None
    epoch_maps: dict[int, Path]
    poses_path: Path | None
    finished: bool

    @property
    def files(self) -> RunFiles:
        """The run folder's paths."""
        return RunFiles(self.run_dir)


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder's metrics and config and find its maps and poses.

    Raises
    ------
    InputError
        The folder does not exist or holds neither ``metrics.jsonl`` nor a map, or its
        ``config.yaml`` is not YAML.
    """
    files = RunFiles(run_dir)
    if not files.dir.is_dir():
        raise InputError("run folder not found" if not files.dir.exists() else "not a folder",
                         files.dir)
    metrics = sorted(read_metrics(files.metrics), key=lambda r: int(r.get("epoch", 0)))
    config_text = files.config.read_text(encoding="utf-8") if files.config.is_file() else None
    config: dict[str, Any] = {}
    if config_text:
        try:
            loaded = yaml.safe_load(config_text)
        except yaml.YAMLError as exc:
            raise InputError(f"cannot parse YAML ({exc.__class__.__name__})",
                             files.config) from None
        config = loaded if isinstance(loaded, dict) else {}
    epoch_maps = files.epoch_maps()
    finished = files.map.is_file()
    map_path = files.map if finished else (epoch_maps[max(epoch_maps)] if epoch_maps else None)
    if not metrics and map_path is None:
        raise InputError("no metrics.jsonl and no map: not a cryospin run folder", files.dir)
    return RunData(
        run_dir=files.dir,
        metrics=metrics,
        config=config,
        config_text=config_text,
        map_path=map_path,
        epoch_maps=epoch_maps,
        poses_path=files.star if files.star.is_file() else None,
        finished=finished,
    )
