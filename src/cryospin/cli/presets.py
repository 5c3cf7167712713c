"""``cryospin presets``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.presets`."""

from __future__ import annotations

import argparse

import yaml

from cryospin import __version__
from cryospin.train.config import build_config, config_to_dict
from cryospin.train.presets import PRESETS, preset_description


def main(args: argparse.Namespace) -> int:
    """Print the list of presets, or one preset's resolved configuration."""
    if args.presets_action == "show":
        config = config_to_dict(build_config(args.name))  # InputError for an unknown name
        print(f"# cryospin {__version__}, preset {args.name}: built-in defaults < preset")
        print(yaml.safe_dump(config, sort_keys=False, default_flow_style=False), end="")
        return 0
    width = max(len(name) for name in PRESETS)
    for name in PRESETS:
        print(f"{name:<{width}}  {preset_description(name)}")
    return 0
