"""The merge rules of :func:`cryospin.train.config.build_config` (defaults < preset <
overrides), applied in place to the merged nested dict before it becomes a ``Config``.

Kept apart from :mod:`cryospin.train.config` (the dataclasses and their files) so that each
rule reads on its own; the schedule's defaults come in as a plain mapping, so this module
imports nothing of the configuration.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryospin.errors import InputError

__all__ = ["AMORTIZED_METHODS", "apply_merge_rules"]

#: Methods that never switch to the pose table (the encoder gives the poses to the end).
AMORTIZED_METHODS: tuple[str, ...] = ("amortized", "cryoai")


def apply_merge_rules(merged: dict[str, dict[str, object]],
                      overrides: Mapping[str, Mapping[str, object]],
                      schedule_defaults: Mapping[str, object]) -> None:
    """In place on ``merged``: a ``switch_epoch`` override drops the preset's step budget; an
    amortized method's schedule (raises :class:`InputError` on a contradicting override); a
    preset's unreachable ``search_min_epochs`` dropped. ``schedule_defaults``: the
    ``ScheduleConfig`` defaults by field name."""
    _epoch_switch_replaces_step_budget(merged, overrides)
    _apply_method(merged, overrides, schedule_defaults)
    _drop_unreachable_search_minimum(merged, overrides, schedule_defaults)


def _epoch_switch_replaces_step_budget(merged: dict[str, dict[str, object]],
                                       overrides: Mapping[str, Mapping[str, object]]) -> None:
    """In place on ``merged``: a ``switch_epoch`` override without a ``switch_steps`` one drops
    the preset's step budget (``--switch-epoch 7`` with ``paper-synthetic`` switches at 7)."""
    given = overrides.get("schedule") or {}
    if given.get("switch_epoch") is not None and given.get("switch_steps") is None:
        merged.setdefault("schedule", {})["switch_steps"] = None


def _drop_unreachable_search_minimum(merged: dict[str, dict[str, object]],
                                     overrides: Mapping[str, Mapping[str, object]],
                                     defaults: Mapping[str, object]) -> None:
    """In place on ``merged``: a preset's ``search_min_epochs`` above the ``search_epochs`` in
    effect (``--search-epochs 1`` with the default preset's 4; an amortized method's 0) becomes
    None (no early stop before the search ends); an override is left to the validation."""
    schedule = merged.setdefault("schedule", {})
    low = schedule.get("search_min_epochs")
    if (overrides.get("schedule") or {}).get("search_min_epochs") is not None:
        return
    search = schedule.get("search_epochs", defaults["search_epochs"])
    if isinstance(low, int) and isinstance(search, int) and low > search:
        schedule["search_min_epochs"] = None


def _apply_method(merged: dict[str, dict[str, object]],
                  overrides: Mapping[str, Mapping[str, object]],
                  defaults: Mapping[str, object]) -> None:
    """In place on ``merged``: the schedule (and head count) implied by an amortized method."""
    schedule = merged.setdefault("schedule", {})
    method = schedule.get("method", defaults["method"])
    if method not in AMORTIZED_METHODS:
        return
    epochs = schedule.get("epochs", defaults["epochs"])
    given = overrides.get("schedule") or {}
    switch, search = given.get("switch_epoch"), given.get("search_epochs")
    if isinstance(switch, int) and isinstance(epochs, int) and switch < epochs:
        raise InputError(f"command line: method {method} never switches to per-particle "
                         f"poses; drop switch_epoch {switch}")
    if search:
        raise InputError(f"command line: method {method} never switches, so it has no "
                         f"search epochs; drop search_epochs {search}")
    schedule["switch_epoch"] = epochs
    schedule["search_epochs"] = 0
    if given.get("switch_steps") is None:  # a preset's step budget: there is no switch
        schedule["switch_steps"] = None
    if method == "cryoai" and (overrides.get("model") or {}).get("num_heads") is None:
        merged.setdefault("model", {})["num_heads"] = 1
