"""Flag helpers shared by the subcommands: one spelling of the output flag (``-o/--out``).

Older spellings (``--outdir``, ``--output``) keep working as hidden aliases: they parse into
the same destination but :class:`HelpFormatter` leaves them out of ``--help``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

__all__ = ["HelpFormatter", "add_out_argument"]

#: attribute of an argparse action listing option strings that --help does not show
_HIDDEN = "cryospin_hidden_option_strings"


def add_out_argument(
    parser: argparse._ActionsContainer,  # a parser or an argument group (argparse's base class)
    *,
    dest: str,
    aliases: tuple[str, ...] = (),
    type: Callable[[str], object] = str,  # argparse's name
    required: bool = False,
    default: object = None,
    metavar: str | None = None,
    help: str | None = None,  # argparse's name
) -> argparse.Action:
    """Add ``-o/--out`` (stored in ``dest``), with ``aliases`` accepted but hidden; the other
    keywords as :meth:`argparse.ArgumentParser.add_argument` takes them."""
    action = parser.add_argument("-o", "--out", *aliases, dest=dest, type=type,
                                 required=required, default=default, metavar=metavar, help=help)
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
