"""What a run shows while it trains: a progress bar in a terminal, a log line every few seconds
otherwise.

Every pass over the images (a training epoch, the switch's inference pass, the final
backprojection) reports its progress through a :class:`PassProgress`, shown one of three ways
(:meth:`Feedback.choose`):

* ``"bar"`` — stderr is a terminal and bars are wanted (``run.progress``; ``--no-progress``
  turns them off): a tqdm bar per pass, whose own ETA is then the pass's (an epoch's images run
  at one speed), with the run's ETA beside it. While bars are on, console log records are
  written above the bar (:meth:`Feedback.console`), never onto its line.
* ``"lines"`` — no terminal (``nohup``, a batch scheduler, output redirected) or no bar wanted:
  every ``run.progress_interval_s`` seconds of a pass, one INFO log record: the pass, images
  done / total, images/s, the pass's ETA and the run's (:func:`cryospin.train.progress
  .progress_line`; while the global search can still stop early, also the ETA if it stopped
  at the earliest). Being log records they also reach ``RUN_DIR/run.log``
  (:mod:`cryospin.train.runlog`).
* ``"off"`` — ``progress_interval_s = 0`` without a bar, and every rank but 0 under torchrun.

The clock is :func:`time.monotonic`, read through this module's ``monotonic`` (tests replace
it); nothing here affects the numerics.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import monotonic
from types import TracebackType
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cryospin.train.progress import RunEstimate, format_run_eta, progress_line

__all__ = ["BAR", "LINES", "OFF", "Feedback", "PassProgress", "stderr_is_terminal"]

logger = logging.getLogger(__name__)

BAR = "bar"
LINES = "lines"
OFF = "off"

#: ``(images done in the pass, seconds since it started) ->`` the run's ETA.
RunEta = Callable[[float, float], RunEstimate]


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` is a terminal (False when it is closed or replaced)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _console_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write to the console (stdout or stderr)."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and h.stream in (sys.stdout, sys.stderr)]


class PassProgress:
    """Progress of one pass over ``total`` images, shown as ``display`` says.

    Parameters
    ----------
    label : str
        Names the pass (``"epoch 3/12 (stage 2, search)"``, ``"switch: inference pass"``).
    total : float
        Images of the pass.
    display : str
        ``"bar"``, ``"lines"`` or ``"off"`` (module docstring).
    interval_s : float
        Seconds between two lines (``"lines"``).
    what : str
        The pass in the ETA wording (``"epoch"``, ``"pass"``).
    run_eta : callable, optional
        ``(images done, seconds since the pass started) ->`` the run's ETA
        (:class:`~cryospin.train.progress.RunEstimate`); shown beside the pass's ETA.
    scale : float
        Images counted per image reported to :meth:`update` (under torchrun rank 0 reports its
        own share; scaled, the display counts every rank's).
    """

    def __init__(self, label: str, total: float, *, display: str = OFF,
                 interval_s: float = 30.0, what: str = "pass",
                 run_eta: RunEta | None = None, scale: float = 1.0) -> None:
        self.label, self.total, self.display = label, float(total), display
        self.interval_s, self.what, self.run_eta = float(interval_s), what, run_eta
        self.scale = float(scale)
        self.done = 0.0
        self.start = self.last_line = monotonic()
        self.bar: Any = None
        self._bar_n = 0
        if display == BAR:
            self.bar = tqdm(total=int(round(total)), unit="img", desc=label, leave=False,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, images: float, loss: float | None = None) -> None:
        """``images`` more done (``loss``: the batch's, shown on the bar); the signature of the
        trainers' ``progress`` callbacks."""
        self.done += images * self.scale
        now = monotonic()
        if self.bar is not None:
            n = int(round(self.done))
            self.bar.update(n - self._bar_n)
            self._bar_n = n
            postfix = {} if loss is None else {"loss": f"{loss:.4g}"}
            if self.run_eta is not None:
                postfix["run ETA"] = format_run_eta(self.run_eta(self.done, now - self.start))
            self.bar.set_postfix(postfix, refresh=False)
        elif (self.display == LINES and self.interval_s > 0
              and now - self.last_line >= self.interval_s):
            self.last_line = now
            logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """The progress line at clock time ``now``."""
        elapsed = now - self.start
        return progress_line(
            self.label, self.done, self.total, elapsed, what=self.what,
            run_eta=None if self.run_eta is None else self.run_eta(self.done, elapsed),
            with_run_eta=self.run_eta is not None,
        )

    def close(self) -> None:
        """Remove the bar (if any)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> PassProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class Feedback:
    """How a run shows progress: ``display`` (``"bar"``, ``"lines"``, ``"off"``) and the
    seconds between two lines."""

    display: str = OFF
    interval_s: float = 30.0

    @classmethod
    def choose(cls, *, main: bool, bar: bool, interval_s: float) -> Feedback:
        """A bar when ``bar`` and stderr is a terminal; else lines every ``interval_s``
        seconds (0: none); nothing on a rank other than 0 (``main`` False)."""
        if not main:
            return cls(OFF, interval_s)
        if bar and stderr_is_terminal():
            return cls(BAR, interval_s)
        return cls(LINES if interval_s > 0 else OFF, interval_s)

    def start(self, label: str, total: float, *, what: str = "pass",
              run_eta: RunEta | None = None, scale: float = 1.0) -> PassProgress:
        """A :class:`PassProgress` of this display (close it, or use it in ``with``)."""
        return PassProgress(label, total, display=self.display, interval_s=self.interval_s,
                            what=what, run_eta=run_eta, scale=scale)

    @contextlib.contextmanager
    def console(self) -> Iterator[None]:
        """Inside, with bars on: console log records go through ``tqdm.write`` (above the bar)
        instead of onto its line; files (``run.log``) are left as they are. Without bars, or
        when nothing logs to the console, nothing changes."""
        if self.display != BAR or not _console_handlers():
            yield
            return
        with logging_redirect_tqdm(tqdm_class=tqdm):
            yield
