"""Flag helpers shared by the subcommands: one spelling of the output flag (``-o/--out``).

Older spellings (``--outdir``, ``--output``) keep working as hidden aliases: they parse into
the same destination but :class:`HelpFormatter` leaves them out of ``--help``.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

__all__ = ["HelpFormatter", "add_out_argument"]

#: attribute of an argparse action listing option strings that --help does not show
_HIDDEN = "cryospin_hidden_option_strings"


def add_out_argument(
    parser: argparse.ArgumentParser | Any, *, dest: str, aliases: tuple[str, ...] = (),
    **kwargs: Any,
) -> argparse.Action:
    """Add ``-o/--out`` (stored in ``dest``), with ``aliases`` accepted but hidden."""
    action = parser.add_argument("-o", "--out", *aliases, dest=dest, **kwargs)
    setattr(action, _HIDDEN, tuple(aliases))
    return action


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The subcommands' help: the description as written, hidden aliases left out."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, _HIDDEN, ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)
