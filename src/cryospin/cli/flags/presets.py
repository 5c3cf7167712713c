"""List the configuration presets of `cryospin reconstruct`, or show one in full.

``cryospin presets`` lists each preset with its one-line description; ``cryospin presets show
NAME`` prints every value of its resolved configuration (built-in defaults < preset) as YAML,
in the layout of a run's ``config.yaml``. Flags of ``reconstruct`` override these values.

Example::

    cryospin presets
    cryospin presets show paper-real > paper-real.yaml
"""

from __future__ import annotations

import argparse

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the actions of ``cryospin presets``."""
    actions = parser.add_subparsers(dest="presets_action", metavar="ACTION")
    actions.add_parser("list", help="each preset and its one-line description (the default)")
    show = actions.add_parser("show", help="every value of a preset's configuration, as YAML")
    show.add_argument("name", metavar="NAME", help="preset name (see `cryospin presets`)")
