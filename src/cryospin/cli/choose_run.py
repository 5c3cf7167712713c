"""``cryospin choose-run``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.choose_run`."""

from __future__ import annotations

import argparse
import json

from cryospin.atomic import atomic_write_text
from cryospin.cli._choice import format_table
from cryospin.errors import InputError
from cryospin.train.choice_record import agreements, choice_record
from cryospin.train.choose import choose_run, run_outcome

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """Read the runs, choose, print the table (and write the JSON)."""
    if len(args.runs) < 2:
        raise InputError("give at least two run folders to choose from")
    outcomes = [run_outcome(path) for path in args.runs]
    chosen = choose_run(outcomes)
    agreement = agreements(outcomes, chosen) if args.maps else None
    print(format_table(outcomes, chosen, agreement))
    if args.output is not None:
        atomic_write_text(args.output, json.dumps(choice_record(outcomes, chosen, agreement),
                                                  indent=2) + "\n")
    return 0
