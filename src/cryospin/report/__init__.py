"""Run report: figures (one PNG each) and a self-contained HTML page from a run folder.

The page needs no network and no JavaScript; figures are PNGs next to it, referenced by
relative paths, and the numbers of its summary table are written as ``summary.json``. The
package sits just below the CLI and may import every layer beneath it:

* :mod:`~cryospin.report.inputs` — read and check maps, poses, the pose track and a ground
  truth (the run folder itself: :func:`cryospin.rundir.load_run`);
* :mod:`~cryospin.report.summary` — the summary's schema (``summary.json``, typed dicts);
* :mod:`~cryospin.report.analysis` — numbers from the metrics and poses (the summary);
* :mod:`~cryospin.report.ground_truth` — numbers against a ground truth (FSC, pose errors,
  the tracked particles' errors per epoch and per head);
* :mod:`~cryospin.report.symmetry_check` — the imposed point group, the detected ranking of
  the map and where the symmetry axes meet its central sections;
* :mod:`~cryospin.report.figures` — every figure of the pages (shared plots such as the FSC
  curve live in :mod:`cryospin.plotting`); the map figure, with the symmetry axes, in
  :mod:`~cryospin.report.map_figure`;
* :mod:`~cryospin.report.html` — the page and the text of its tables;
* :mod:`~cryospin.report.run_page` and :mod:`~cryospin.report.halves_page` — the page of one
  run and of a ``--halves`` run, compositions of the above.
"""

from __future__ import annotations

from cryospin.report.halves_page import write_halves_report
from cryospin.report.html import ReportResult
from cryospin.report.run_page import write_report

__all__ = ["write_report", "write_halves_report", "ReportResult"]
