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


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the actions of ``cryospin presets``."""
    actions = parser.add_subparsers(dest="presets_action", metavar="ACTION")
    actions.add_parser("list", help="each preset and its one-line description (the default)")
    show = actions.add_parser("show", help="every value of a preset's configuration, as YAML")
    show.add_argument("name", metavar="NAME", help="preset name (see `cryospin presets`)")


def main(args: argparse.Namespace) -> int:
    """Print the list of presets, or one preset's resolved configuration."""
    import yaml  # imported here: `cryospin --help` stays fast

    from cryospin import __version__
    from cryospin.train.config import (
        PRESETS,
        build_config,
        config_to_dict,
        preset_description,
    )

    if args.presets_action == "show":
        config = config_to_dict(build_config(args.name))  # InputError for an unknown name
        print(f"# cryospin {__version__}, preset {args.name}: built-in defaults < preset")
        print(yaml.safe_dump(config, sort_keys=False, default_flow_style=False), end="")
        return 0
    width = max(len(name) for name in PRESETS)
    for name in PRESETS:
        print(f"{name:<{width}}  {preset_description(name)}")
    return 0
