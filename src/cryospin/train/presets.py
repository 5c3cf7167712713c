"""The shipped presets: ``cryospin/presets/<name>.yaml``, their names and descriptions.

Text only: :func:`cryospin.train.config.load_preset` reads a preset into overrides and checks
them. No torch: the CLI's start-up imports this module.
"""

from __future__ import annotations

import importlib.resources

from cryospin.errors import InputError

__all__ = ["PRESETS", "preset_names", "preset_text", "preset_description"]

#: Preset names shipped as ``cryospin/presets/<name>.yaml``.
PRESETS: tuple[str, ...] = ("default", "paper-synthetic", "paper-real")


def preset_names() -> tuple[str, ...]:
    """Names accepted by :func:`cryospin.train.config.load_preset`."""
    return PRESETS


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``; :class:`InputError` naming the presets when unknown."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    resource = importlib.resources.files("cryospin") / "presets" / f"{name}.yaml"
    return resource.read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    """The one-line description of preset ``name``: its file's first line reads
    ``# cryospin preset "NAME": DESCRIPTION.`` ("" when it does not)."""
    first = (preset_text(name).splitlines() or [""])[0]
    head = f'# cryospin preset "{name}":'
    return first[len(head):].strip().rstrip(".") if first.startswith(head) else ""
