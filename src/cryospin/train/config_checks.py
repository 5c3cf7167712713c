"""Whether a run configuration is valid: the checks :class:`cryospin.train.config.Config` runs
when it is made, and those of a nested dict read from YAML or the command line (its sections,
renamed fields, the type of each value).

Pure functions; every failure is an :class:`InputError` whose message names the field
(``section.field``) and the value. No torch: the CLI's start-up imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection
from typing import TYPE_CHECKING, Literal

from cryospin.errors import InputError
from cryospin.point_group import parse_point_group

if TYPE_CHECKING:
    from cryospin.train.config import Config

__all__ = ["validate", "coerce", "check_sections", "migrate_renamed"]


def validate(c: Config) -> None:
    """Raise :class:`InputError` ("invalid configuration: ...") for the first field of ``c``
    out of its range, in a fixed order of the checks."""
    _check_finite(c)
    _check_model_sizes(c)
    _check_optim(c)
    _check_search(c)
    _check_schedule(c)
    _check_choices(c)
    _check_data(c)
    _check_run(c)


def _bad(msg: str) -> InputError:
    return InputError(f"invalid configuration: {msg}")


def _check_finite(c: Config) -> None:
    """Every float finite (NaN/inf learning rates, radii, ... rejected); memory budgets
    (``*_gb``) may be inf ("no limit"). ``optim.batch_size`` an integer."""
    for section in dataclasses.fields(c):
        values = getattr(c, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if (isinstance(value, float) and not f.name.endswith("_gb")
                    and not -math.inf < value < math.inf):
                raise _bad(f"{section.name}.{f.name} must be a finite number, got {value}")
    for name in ("batch_size",):
        value = getattr(c.optim, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"optim.{name} must be an integer, got {value!r}")


def _check_model_sizes(c: Config) -> None:
    m = c.model
    if m.num_heads < 1:
        raise _bad(f"model.num_heads must be >= 1, got {m.num_heads}")
    if m.width_multiplier <= 0:
        raise _bad(f"model.width_multiplier must be > 0, got {m.width_multiplier}")
    if m.head_hidden < 1:
        raise _bad(f"model.head_hidden must be >= 1, got {m.head_hidden}")
    _check_choice("model", m, "precision")
    box = m.encoder_box_px
    if box is not None and (box < 8 or box % 2):
        raise _bad(f"model.encoder_box_px must be even and >= 8, got {box}")
    if m.max_shift_px < 0:
        raise _bad(f"model.max_shift_px must be >= 0, got {m.max_shift_px}")


def _check_optim(c: Config) -> None:
    o = c.optim
    if o.batch_size < 1:
        raise _bad(f"optim.batch_size must be >= 1, got {o.batch_size}")
    for name in ("encoder_lr", "decoder_lr", "decoder_lr_after_switch", "pose_lr", "shift_lr"):
        if not getattr(o, name) > 0:
            raise _bad(f"optim.{name} must be > 0, got {getattr(o, name)}")
    if not 0.0 <= o.encoder_lr_decay_start < 1.0:
        raise _bad(f"optim.encoder_lr_decay_start must be in [0, 1), got "
                   f"{o.encoder_lr_decay_start}")
    for name in ("encoder_lr_final", "decoder_lr_final", "pose_lr_final"):
        value = getattr(o, name)
        if value is not None and not value > 0:
            raise _bad(f"optim.{name} must be > 0, got {value}")
    if o.search_rotations < 1:
        raise _bad(f"optim.search_rotations must be >= 1, got {o.search_rotations}")
    if o.search_candidates < 1:
        raise _bad(f"optim.search_candidates must be >= 1, got {o.search_candidates}")
    if o.search_polish_sweeps < 1:
        raise _bad(f"optim.search_polish_sweeps must be >= 1, got {o.search_polish_sweeps}")
    if not o.search_radius_px >= 1:
        raise _bad(f"optim.search_radius_px must be >= 1, got {o.search_radius_px}")
    for name in ("search_radius_end_px", "search_radius_symmetric_px",
                 "search_refine_radius_px"):
        value = getattr(o, name)
        if value is not None and not value >= 1:
            raise _bad(f"optim.{name} must be >= 1, got {value}")
    if o.local_refine_resolution_angstrom is not None and \
            not o.local_refine_resolution_angstrom > 0:
        raise _bad("optim.local_refine_resolution_angstrom must be > 0, got "
                   f"{o.local_refine_resolution_angstrom}")
    step = o.search_shift_step_px
    if step is not None and not step > 0:
        raise _bad(f"optim.search_shift_step_px must be > 0, got {step}")


def _check_search(c: Config) -> None:
    """The global search's epochs and early stop; the local refinement's pose steps."""
    s = c.schedule
    if s.search_epochs < 0:
        raise _bad(f"schedule.search_epochs must be >= 0, got {s.search_epochs}")
    low = s.search_min_epochs
    if low is not None and not 1 <= low <= s.search_epochs:
        raise _bad(f"schedule.search_min_epochs must be between 1 and schedule.search_epochs "
                   f"({s.search_epochs}), got {low}")
    for name in ("search_stop_fraction", "search_plateau_fraction"):
        value = getattr(s, name)
        if not 0.0 <= value <= 1.0:
            raise _bad(f"schedule.{name} must be in [0, 1], got {value}")
    if s.search_settled_nats < 0.0:
        raise _bad(f"schedule.search_settled_nats must be >= 0, got {s.search_settled_nats}")
    if c.optim.pose_steps_per_batch < 0:
        raise _bad(f"optim.pose_steps_per_batch must be >= 0, got {c.optim.pose_steps_per_batch}")
    _check_hypotheses(c)


def _check_hypotheses(c: Config) -> None:
    """The switch's multi-hypothesis refinement (:mod:`cryospin.train.hypotheses`)."""
    o = c.optim
    if o.switch_hypotheses < 1:
        raise _bad(f"optim.switch_hypotheses must be >= 1, got {o.switch_hypotheses}")
    if o.switch_refine_steps < 1:
        raise _bad(f"optim.switch_refine_steps must be >= 1, got {o.switch_refine_steps}")
    radius = o.switch_refine_radius_px
    if radius is not None and not radius >= 1:
        raise _bad(f"optim.switch_refine_radius_px must be >= 1, got {radius}")
    if min(o.switch_hypotheses, c.model.num_heads) > 1 and c.schedule.switch_poses != "inference":
        raise _bad("optim.switch_hypotheses > 1 needs the switch's inference pass "
                   f"(schedule.switch_poses inference), got {c.schedule.switch_poses}")


def _check_schedule(c: Config) -> None:
    s = c.schedule
    if s.epochs < 1:
        raise _bad(f"schedule.epochs must be >= 1, got {s.epochs}")
    if s.switch_epoch < 0:
        raise _bad(f"schedule.switch_epoch must be >= 0, got {s.switch_epoch}")
    if s.switch_steps is not None:
        if s.switch_steps < 1:
            raise _bad(f"schedule.switch_steps must be >= 1, got {s.switch_steps}")
        if s.method != "semi-amortized":
            raise _bad(f"schedule.switch_steps: method {s.method} never switches")


def _check_symmetry(c: Config) -> None:
    """``model.symmetry``: a point group or ``auto`` (detected after the global search, so
    not with ``schedule.impose_symmetry = start`` nor a method that never switches)."""
    _check_choice("schedule", c.schedule, "impose_symmetry")
    if c.model.symmetry.lower() == "auto":
        if c.schedule.impose_symmetry == "start":
            raise _bad("model.symmetry auto is detected after the global search; it cannot "
                       "be imposed from the start (schedule.impose_symmetry start)")
        if c.schedule.method != "semi-amortized":
            raise _bad(f"model.symmetry auto: method {c.schedule.method} never switches, so "
                       "there is no point to detect it at; give the group")
    else:
        try:
            parse_point_group(c.model.symmetry)
        except InputError as err:
            raise _bad(f"model.symmetry: {err}") from None
    _check_relax(c)
    _check_consensus(c)


def _check_consensus(c: Config) -> None:
    """``optim.copy_consensus``: ``off``, ``auto`` or a cyclic group of order >= 2."""
    value = c.optim.copy_consensus
    if value.lower() in ("off", "auto"):
        return
    try:
        group = parse_point_group(value)
    except InputError as err:
        raise _bad(f"optim.copy_consensus: {err}") from None
    if group.kind != "C" or group.order < 2:
        raise _bad(f"optim.copy_consensus {value}: a cyclic group (C2, C3, ...), auto or off")


def _check_relax(c: Config) -> None:
    """``model.relax_symmetry``: a point group, relaxed in stage 2 of a C1 run only, or
    ``auto`` (whatever the run: it relaxes only where it applies, :mod:`cryospin.train.relax`)."""
    if c.model.relax_symmetry.lower() == "auto":
        return
    try:
        relax = parse_point_group(c.model.relax_symmetry)
    except InputError as err:
        raise _bad(f"model.relax_symmetry: {err}") from None
    if relax.order == 1:
        return
    if c.model.symmetry.upper() != "C1":
        raise _bad(f"model.relax_symmetry {c.model.relax_symmetry} relaxes a pseudo-symmetry "
                   f"of a C1 run; model.symmetry is {c.model.symmetry}: give one of them")
    if c.schedule.method != "semi-amortized":
        raise _bad(f"model.relax_symmetry: method {c.schedule.method} never switches, and the "
                   "copies are chosen in stage 2")


def _check_choices(c: Config) -> None:
    """The encoder's head, input and pooling, the switch's poses and the method: one of the
    values their ``Literal`` types name."""
    for field in ("head", "encoder_input", "pooling"):
        _check_choice("model", c.model, field)
    _check_symmetry(c)
    _check_choice("schedule", c.schedule, "switch_poses")
    methods = _choices(c.schedule, "method")
    if c.schedule.method not in methods:
        raise _bad(f"schedule.method {c.schedule.method!r} is not one of {', '.join(methods)}")
    if c.schedule.method == "cryoai" and c.model.num_heads != 1:
        raise _bad(f"schedule.method cryoai uses one pose head (model.num_heads = 1), "
                   f"got {c.model.num_heads}")


def _check_data(c: Config) -> None:
    """The loss and mask radii, the noise variance, memory budgets, box, normalisation."""
    for name in ("loss_radius_start_px", "loss_radius_end_px"):
        value = getattr(c.schedule, name)
        if value is not None and not value >= 1:
            raise _bad(f"schedule.{name} must be >= 1, got {value}")
    if c.schedule.loss_radius_end_px is not None and c.schedule.loss_radius_start_px is None:
        raise _bad("schedule.loss_radius_end_px needs schedule.loss_radius_start_px (frequency "
                   "marching from a start radius; the same value for a fixed stage-1 disc)")
    d = c.data
    if d.loss_radius_px is not None and d.loss_radius_px < 1:
        raise _bad(f"data.loss_radius_px must be >= 1, got {d.loss_radius_px}")
    if d.noise_variance is not None and not d.noise_variance > 0:
        raise _bad(f"data.noise_variance must be > 0, got {d.noise_variance}")
    if d.max_preload_gb < 0:
        raise _bad(f"data.max_preload_gb must be >= 0, got {d.max_preload_gb}")
    if d.max_memory_gb is not None and not d.max_memory_gb > 0:
        raise _bad(f"data.max_memory_gb must be > 0, got {d.max_memory_gb}")
    if d.box_px is not None and (d.box_px < 8 or d.box_px % 2):
        raise _bad(f"data.box_px must be even and >= 8, got {d.box_px}")
    _check_choice("data", d, "normalize")
    frac = d.mask_radius_fraction
    if frac is not None and not 0 < frac <= 1:
        raise _bad(f"data.mask_radius_fraction must be in (0, 1], got {frac}")
    if not d.mask_edge_px >= 0:
        raise _bad(f"data.mask_edge_px must be >= 0, got {d.mask_edge_px}")


def _check_run(c: Config) -> None:
    r = c.run
    _check_choice("run", r, "device")
    if r.num_threads is not None and r.num_threads < 1:
        raise _bad(f"run.num_threads must be >= 1, got {r.num_threads}")
    if r.inference_batch_size < 1:
        raise _bad(f"run.inference_batch_size must be >= 1, got {r.inference_batch_size}")
    if not r.progress_interval_s >= 0:
        raise _bad(f"run.progress_interval_s must be >= 0, got {r.progress_interval_s}")
    if r.track_particles < 0:
        raise _bad(f"run.track_particles must be >= 0, got {r.track_particles}")


def _choices(section: object, field: str) -> tuple[str, ...]:
    """The values the ``Literal`` type of ``section.field`` names, in its order."""
    return typing.get_args(typing.get_type_hints(type(section))[field])


def _check_choice(name: str, section: object, field: str) -> None:
    """``section.field`` one of its ``Literal`` values ("must be a, b or c, got 'x'")."""
    value = getattr(section, field)
    choices = _choices(section, field)
    if value not in choices:
        either = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise _bad(f"{name}.{field} must be {either}, got {value!r}")


def coerce(value: object, annotation: object, where: str) -> object:
    """``value`` checked against a (simple) annotation: bool, int, float, str, a ``Literal``
    or a union of those with None; ints are accepted (and converted) for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(annotation):
            choices = ", ".join(map(str, typing.get_args(annotation)))
            raise InputError(f"{where}: {value!r} is not one of {choices}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r}")  # programming error


def check_sections(data: object, sections: Collection[str], where: str
                   ) -> dict[str, dict[str, object]]:
    """``data`` itself, checked to be a dict of known section names to dicts."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in sections:
            raise InputError(
                f"{where}: unknown section {section!r} (expected one of {', '.join(sections)})"
            )
        if not isinstance(values, dict):
            raise InputError(f"{where}: section {section!r} must be a mapping")
    return data


def migrate_renamed(data: dict[str, dict[str, object]], where: str
                    ) -> dict[str, dict[str, object]]:
    """Fields renamed since a ``config.yaml`` or checkpoint was written: ``model.use_bf16``
    (cryospin <= 0.1.0) is ``model.precision`` bf16 / fp32 (None: not given)."""
    model = data.get("model")
    if model is None or "use_bf16" not in model:
        return data
    model = dict(model)
    use_bf16 = model.pop("use_bf16")
    if use_bf16 is not None and "precision" not in model:
        if not isinstance(use_bf16, bool):
            raise InputError(f"{where}: model.use_bf16: expected true/false, got {use_bf16!r}")
        model["precision"] = "bf16" if use_bf16 else "fp32"
    return {**data, "model": model}
