"""Entry point of the ``cryospin`` command: dispatches to one module per subcommand.

Each subcommand has two modules: :mod:`cryospin.cli.flags.<command>`, whose docstring is its
``--help`` and whose ``add_args(parser)`` registers its flags, and :mod:`cryospin.cli.<command>`,
whose ``main(args)`` runs it. The parser is built from the flag modules alone (no torch:
``cryospin --help`` stays fast); only the chosen command's run module is imported.

User errors (:class:`cryospin.errors.CryospinError`) and I/O failures (``OSError``: disk full,
permissions) print one line on stderr and exit with status 2, without a traceback (``-v`` logs
the traceback of an ``OSError``). Ctrl-C exits with status 130; SIGTERM (a batch scheduler's
time limit, ``kill``) is handled the same way (:class:`cryospin.errors.Terminated`, a
``KeyboardInterrupt``) and exits with status 143. When stdout's reader goes away
(``cryospin fsc A B | head -1``) it exits quietly with status 141, as a tool ended by SIGPIPE
does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

from cryospin import __version__
from cryospin.atomic import describe_os_error
from cryospin.cli._args import HelpFormatter
from cryospin.errors import CryospinError, Terminated


@dataclass(frozen=True)
class Command:
    """A subcommand: the module (under :mod:`cryospin.cli`) with its help and flags, imported
    to build the parser, and the module that runs it, imported only when it runs."""

    flags_module: str
    run_module: str

    def main(self, args: argparse.Namespace) -> int | None:
        """Import the run module and run the command."""
        return importlib.import_module(f"cryospin.cli.{self.run_module}").main(args)


SUBCOMMANDS: dict[str, Command] = {
    "simulate": Command("flags.simulate", "simulate"),
    "downsample": Command("flags.downsample", "downsample"),
    "reconstruct": Command("flags.reconstruct", "reconstruct"),
    "presets": Command("flags.presets", "presets"),
    "backproject": Command("flags.backproject", "backproject"),
    "fsc": Command("flags.fsc", "fsc"),
    "postprocess": Command("flags.postprocess", "postprocess"),
    "pose-error": Command("flags.pose_error", "pose_error"),
    "symmetry-expand": Command("flags.symmetry_expand", "symmetry_expand"),
    "symmetry": Command("flags.symmetry", "symmetry"),
    "demo": Command("flags.demo", "demo"),
    "report": Command("flags.report", "report"),
    "flip-hand": Command("flags.flip_hand", "flip_hand"),
    "posterior": Command("flags.posterior", "posterior"),
    "choose-run": Command("flags.choose_run", "choose_run"),
}

#: exit status after stdout's reader went away: 128 + SIGPIPE, what a shell reports for
#: ``yes | head -1``'s ``yes``
_BROKEN_PIPE_STATUS = 141


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="cryospin",
        description="Ab initio cryo-EM reconstruction with semi-amortized pose inference.",
    )
    parser.add_argument("--version", action="version", version=f"cryospin {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        module = importlib.import_module(f"cryospin.cli.{command.flags_module}")
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(
            name,
            help=summary,
            description=doc,
            formatter_class=HelpFormatter,
        )
        module.add_args(p)
    return parser, SUBCOMMANDS


def _os_error_line(exc: OSError) -> str:
    """``FILE: reason`` for an OSError (the file when known; see ``describe_os_error``)."""
    reason = describe_os_error(exc)
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has exited (``cryospin fsc A B | head -1``).

    Where ``poll`` cannot tell (no ``select.poll``, stdout without a file descriptor), assume
    so: a BrokenPipeError in a command nearly always comes from printing.
    """
    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno(), select.POLLOUT)  # type: ignore[union-attr]
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):
        return True
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


def _quiet_after_closed_stdout() -> int:
    """Exit status 141 (128 + SIGPIPE, as a shell reports a tool ended by a closed pipe),
    without a message. stdout is pointed at /dev/null first, so that Python's flush of what
    is still buffered at exit does not fail again ("Exception ignored ... BrokenPipeError")."""
    if sys.__stdout__ is not None and sys.stdout is sys.__stdout__:  # not when replaced
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    return _BROKEN_PIPE_STATUS


@contextlib.contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """Inside: SIGTERM raises :class:`~cryospin.errors.Terminated` in the main thread.

    Only the first SIGTERM raises; later ones are ignored while that one unwinds (under Slurm
    with torchrun a rank gets the signal twice: from Slurm and forwarded by torchrun). The
    previous handler is restored on exit. Outside the main thread (where Python cannot install
    handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = False

    def handler(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        nonlocal received
        if not received:
            received = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cryospin`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser, commands = _build_parser()
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")  # under torchrun only rank 0 logs progress
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if rank in ("0", "")
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if rank in ("0", "")
        else f"%(asctime)s rank {rank} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 1
    args.argv = ["cryospin", *(sys.argv[1:] if argv is None else list(argv))]
    with sigterm_raises_terminated():
        try:
            status = commands[args.command].main(args)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        except CryospinError as exc:
            print(f"cryospin {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # an I/O failure no module wrapped (disk full, permissions, ...)
            if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
                return _quiet_after_closed_stdout()  # `cryospin fsc A B | head -1`
            logging.getLogger(__name__).debug("I/O error", exc_info=True)
            print(f"cryospin {args.command}: error: {_os_error_line(exc)}", file=sys.stderr)
            return 2
        except Terminated as exc:
            print(f"cryospin {args.command}: {exc}", file=sys.stderr)
            return Terminated.exit_status
        except KeyboardInterrupt:
            print(f"cryospin {args.command}: interrupted", file=sys.stderr)
            return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
