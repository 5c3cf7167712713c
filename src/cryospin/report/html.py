"""The report's page: a self-contained HTML file (inline CSS, no scripts, no network) with a
summary table, notes, the figures (PNGs next to it, by relative path), further tables and the
run's ``config.yaml``; and the text of its summary rows and tables, from the numbers of
:mod:`cryospin.report.analysis` and :mod:`cryospin.report.ground_truth`.

:class:`FigureSet` names and collects a page's figures; :func:`write_page` writes the page and
its ``summary.json`` and returns a :class:`ReportResult`.
"""

from __future__ import annotations

import html
import json
import math
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryospin.atomic import atomic_write_text
from cryospin.errors import OutputError
from cryospin.evaluate.gold_standard import GoldStandardFSC
from cryospin.report.analysis import (
    RANDOM_SPREAD_DEG,
    MetricsLine,
    copy_consensus,
    json_ready,
    rebackprojection,
    relaxations,
    search_rebackprojections,
    search_stop,
    switch_hypotheses,
)
from cryospin.report.ground_truth import EpochResolution
from cryospin.report.summary import HalvesSummary, RunSummary
from cryospin.report.symmetry_check import DrawnAxes, SymmetryCheck, symmetry_advice
from cryospin.rundir import MAP, POSTPROCESS_MAP, RunData, Stage
from cryospin.train.halves import more_starts_advice
from cryospin.train.metrics import search_stop_reason

__all__ = [
    "HAND_NOTE",
    "MIRROR_NOTE",
    "ReportResult",
    "Section",
    "FigureSet",
    "build_html",
    "write_page",
    "format_resolution",
    "format_duration",
    "run_summary_rows",
    "gt_summary_rows",
    "epoch_table",
    "halves_summary_rows",
    "gold_standard_table",
    "symmetry_section",
]

#: The handedness paragraph of every report.
HAND_NOTE = (
    "Ab initio reconstruction cannot distinguish a map from its mirror image: the mirrored map "
    "with mirrored poses explains the images equally well. If the hand is wrong (e.g. "
    "left-handed α-helices), run <code>cryospin flip-hand map.mrc -o map_flipped.mrc</code> "
    "(add <code>--poses poses.star --out-poses poses_flipped.star</code> to convert the poses)."
)

#: Note on a page whose map matched the ground truth's mirror image.
MIRROR_NOTE = ("The map matches the <b>mirror image</b> of the ground truth: the hand is "
               "inverted. Use <code>cryospin flip-hand</code> as described below.")

#: A further table of the page: (title, header, rows), plain-text cells.
Table = tuple[str, Sequence[str], Sequence[Sequence[str]]]


@dataclass(frozen=True)
class Section:
    """A section of the page between the notes and the figures: a title, paragraphs of
    trusted HTML and a table of plain-text cells (none when ``rows`` is empty)."""

    title: str
    paragraphs: Sequence[str]
    header: Sequence[str] = ()
    rows: Sequence[Sequence[str]] = ()

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1000px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 0.25em 0.8em; text-align: left;
        border-bottom: 1px solid #eee; vertical-align: top; }
th { font-weight: 600; color: #444; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6em 1em; }
"""


# ---------------------------------------------------------------------------- page
def build_html(
    *,
    title: str,
    summary: Sequence[tuple[str, str]],
    figures: Sequence[tuple[str, str, str]],
    notes: Sequence[str] = (),
    tables: Sequence[Table] = (),
    config_text: str | None = None,
    sections: Sequence[Section] = (),
) -> str:
    """A self-contained HTML page (inline CSS, no scripts, no network).

    Parameters
    ----------
    title : str
        Plain text (escaped).
    summary : sequence of (name, value)
        Rows of the summary table; plain text (escaped).
    figures : sequence of (title, src, caption)
        ``src`` is a relative URL of a PNG (already URL-quoted); title and caption plain text.
    notes : sequence of str
        Paragraphs of trusted HTML (e.g. :data:`HAND_NOTE`).
    tables : sequence of (title, header, rows)
        Further tables after the figures; plain text cells (escaped).
    config_text : str, optional
        ``config.yaml`` shown verbatim.
    sections : sequence of Section
        After the notes, before the figures.
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Summary</h2>",
        "<table>",
    ]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary]
    parts.append("</table>")
    for note in notes:
        parts.append(f'<p class="note">{note}</p>')
    for sec in sections:
        parts.append(f"<h2>{esc(sec.title)}</h2>")
        parts += [f"<p>{p}</p>" for p in sec.paragraphs]
        if sec.rows:
            parts += ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in sec.header)
                      + "</tr>"]
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                      for row in sec.rows]
            parts.append("</table>")
    for fig_title, src, caption in figures:
        parts += [
            f"<h2>{esc(fig_title)}</h2>",
            "<figure>",
            f'<img src="{esc(src, quote=True)}" alt="{esc(fig_title, quote=True)}">',
            f"<figcaption>{esc(caption)}</figcaption>",
            "</figure>",
        ]
    for table_title, header, rows in tables:
        parts += [f"<h2>{esc(table_title)}</h2>", "<table>",
                  "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    if config_text is not None:
        parts += ["<h2>Configuration (config.yaml)</h2>", f"<pre>{esc(config_text)}</pre>"]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


class FigureSet:
    """The figures of one page: PNGs in the folder named after the HTML file, in page order.

    Attributes
    ----------
    dir : Path
        ``<html folder>/<html stem>/``.
    figures : list of (title, src, caption)
        For :func:`build_html`; ``src`` relative to the page, URL-quoted.
    paths : list of Path
        The PNGs, in page order.
    """

    def __init__(self, html_path: Path) -> None:
        self.html_path = html_path
        self.dir = html_path.parent / html_path.stem
        self.figures: list[tuple[str, str, str]] = []
        self.paths: list[Path] = []

    def create(self) -> None:
        """Create :attr:`dir` (OutputError naming it when that fails)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create folder ({exc.strerror})", self.dir) from None

    def link(self, target: Path) -> str:
        """URL-quoted path of ``target`` relative to the page."""
        return urllib.parse.quote(
            Path(os.path.relpath(target, self.html_path.parent)).as_posix())

    def add(self, name: str, title: str, caption: str) -> Path:
        """Register figure ``name`` (a file in :attr:`dir`); returns the path to write."""
        p = self.dir / name
        self.paths.append(p)
        self.figures.append((title, self.link(p), caption))
        return p


@dataclass(frozen=True)
class ReportResult:
    """Outcome of a report page (:func:`~cryospin.report.write_report`,
    :func:`~cryospin.report.write_halves_report`).

    Attributes
    ----------
    html_path : Path
    figure_paths : list of Path
        PNGs written (in page order).
    summary : RunSummary or HalvesSummary
        Numbers of the summary table, also written as ``<figures>/summary.json``.
    """

    html_path: Path
    figure_paths: list[Path]
    summary: RunSummary | HalvesSummary


def write_page(figs: FigureSet, summary: RunSummary | HalvesSummary, page: str) -> ReportResult:
    """Write ``summary`` as ``<figures>/summary.json`` (non-finite numbers as null), then the
    page at ``figs.html_path``."""
    atomic_write_text(figs.dir / "summary.json",
                      json.dumps(json_ready(summary), indent=2) + "\n")
    atomic_write_text(figs.html_path, page)
    return ReportResult(html_path=figs.html_path, figure_paths=figs.paths, summary=summary)


# ---------------------------------------------------------------------------- text
def format_resolution(r: float) -> str:
    """``"12.34 Å"``, or ``"–"`` for an infinite (never crossed) resolution."""
    return f"{r:.2f} Å" if math.isfinite(r) else "–"


def format_duration(s: float) -> str:
    """Seconds as ``"12.3 s"``, ``"4.5 min"`` or ``"1.25 h"``."""
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _epoch_rows(s: RunSummary, run: RunData) -> list[tuple[str, str]]:
    """Epochs (of those planned, or the early stop), the switch, the final loss, wall time."""
    rows: list[tuple[str, str]] = []
    planned = (run.config.get("schedule") or {}).get("epochs")
    stopped = s.get("search_stopped_after")
    if stopped is not None:  # a shorter run by design, not an unfinished one
        record = search_stop(run.metrics)
        why = ("" if record is None else
               f": {100 * record['jump_fraction']:.1f} % of the particles jumped > "
               f"{record['threshold_deg']:g}° ({search_stop_reason(record)})")
        rows.append(("epochs", f"{s['epochs_completed']} (of up to {planned}: the global "
                               f"search stopped early after epoch {stopped}{why})"))
    else:
        rows.append(("epochs", f"{s['epochs_completed']}" + (
            f" of {planned}" if planned and planned != s["epochs_completed"] else "")))
    k = s.get("switch_epoch")
    rows.append(("switch", "never (auto-encoding only)" if k is None else
                 f"after epoch {k - 1}; first auto-decoding epoch {k}"))
    hyp = switch_hypotheses(run.metrics)
    if hyp is not None:
        radius = hyp.get("radius_px")
        disc = "the full disc" if radius is None else f"a {radius:g} cycles/box disc"
        share, wall = hyp.get("other_than_winner_fraction") or 0.0, hyp.get("wall_time_s") or 0.0
        rows.append(("switch hypotheses", (
            f"{hyp['count']:.0f} best heads per particle, {hyp['steps']:.0f} local steps each on "
            f"{disc}; {100 * share:.1f} % of the particles kept another than the winning head "
            f"({format_duration(wall)})")))
    relaxed = relaxations(run.metrics)
    if relaxed:
        moved = ", ".join(f"{100 * f:.1f}" for _, _, _, f in relaxed)
        groups = "/".join(dict.fromkeys(g for _, g, _, _ in relaxed))
        rows.append(("pseudo-symmetry relaxed", (
            f"{groups} (scored copies of each pose in epochs {relaxed[0][0]}–"
            f"{relaxed[-1][0]}); % of the particles moved to another copy: {moved}; the "
            f"group's score in the last epoch's starting map {relaxed[-1][2]:.3f}")))
    during = search_rebackprojections(run.metrics)
    if during:
        epochs = (f"epoch {during[0][0]}" if len(during) == 1
                  else f"epochs {during[0][0]}–{during[-1][0]}")
        radii = {r for _, _, r in during}
        part = ("" if radii == {None} else
                f" up to {'/'.join(str(r) for r in sorted(x for x in radii if x is not None))}"
                " cycles/box (the shells the search reads; beyond, the volume as trained)")
        rows.append(("volume re-made during the search", (
            f"at the start of {epochs} (each search epoch from the second): the Wiener "
            "backprojection from the poses of the epoch before replaced the trained volume"
            f"{part} ({'once' if len(during) == 1 else f'{len(during)} times'}, "
            f"{format_duration(sum(t for _, t, _ in during))} in all)")))
    remade = rebackprojection(run.metrics)
    if remade is not None:
        epoch, images, group, seconds = remade
        how = ("" if group.upper() == "C1" else
               f" (symmetry {group}: each image inserted once, the sums averaged over the group)")
        rows.append(("volume re-made after the search", (
            f"at the start of epoch {epoch}: the Wiener backprojection of {images:,} images "
            f"from the poses{how} replaced the trained volume for the local epochs "
            f"({format_duration(seconds)})")))
    consensus = copy_consensus(run.metrics)
    if consensus is not None:
        rows.append(("copy consensus after the search", _consensus_row(*consensus)))
    loss = s.get("final_loss")
    rows.append(("final loss", "–" if loss is None else f"{loss:.6g} ({s.get('final_stage')})"))
    rows.append(("wall time", format_duration(s["wall_time_s"])))
    return rows


def _consensus_row(epoch: int, record: dict[str, Any]) -> str:
    """The summary row of the copy consensus (:mod:`cryospin.train.consensus`) that began
    epoch ``epoch``."""
    took = format_duration(float(record["seconds"]))
    score, shown = float(record["score"]), str(record.get("detected", "C1"))
    if str(record["group"]).upper() == "C1":
        why = (f"the map showed {shown} (score {score:.3f}): its copies agree"
               if shown.upper() != "C1" else
               f"the map showed no point group and no cyclic pseudo-symmetry (best {score:.3f})")
        return f"at the start of epoch {epoch}: {why}; nothing to do ({took})"
    moved = ", ".join(f"{100 * f:.1f}" for f in record["moved_fractions"])
    verdict = ("the images fit the new poses better: they and their map were kept"
               if record["kept"] else "the images fit the old poses better: they were kept")
    found = (f"{record['group']} given (score {score:.3f} in the map)" if record.get("given")
             else f"the map showed no point group but a pseudo-{record['group']} (score "
                  f"{score:.3f})")
    return (f"at the start of epoch {epoch}: {found}; each particle moved to a random "
            f"copy, then {record['rounds']} rounds of each to its best copy under the map from "
            f"the poses (% moved: {moved}); mean NLL {float(record['nll_after']):.2f} against "
            f"{float(record['nll_before']):.2f}: {verdict} ({took})")


def run_summary_rows(s: RunSummary, run: RunData) -> list[tuple[str, str]]:
    """The summary table of one run, from its summary ``s``
    (:func:`~cryospin.report.analysis.run_summary` and the ground-truth fields)."""
    rows: list[tuple[str, str]] = [("run folder", str(run.run_dir))]
    version = run.config.get("cryospin_version")
    if version:
        rows.append(("cryospin version", str(version)))
    if s.get("particles"):
        rows.append(("particles", f"{s['particles']:,}"))
    if s.get("box_px"):
        rows.append(("box", f"{s['box_px']} px"))
    if s.get("pixel_size_angstrom"):
        rows.append(("pixel size", f"{s['pixel_size_angstrom']:.4g} Å"))
    if "epochs_completed" in s:
        rows += _epoch_rows(s, run)
    rows += _stage1_summary_rows(s)
    rows += _score_summary_rows(s)
    rows += _noise_summary_rows(s)
    rows += gt_summary_rows(s)
    rows += _tracked_summary_rows(s)
    if not run.finished:
        rows.append(("status", "unfinished"))
    return rows


def _score_summary_rows(s: RunSummary | HalvesSummary) -> list[tuple[str, str]]:
    """How many particles fit the map no better than the alternative (an empty image; with
    the junk class, an empty image or junk)."""
    sc = s.get("particle_scores")
    if sc is None:
        return []
    median = sc["median_score_of_others"]
    return [(f"particles no better than {sc.get('against', 'an empty image')}",
             f"{sc['no_better_than_empty']:,} of {sc['scored']:,} "
             f"({100.0 * sc['fraction_no_better_than_empty']:.1f} %; score <= "
             f"{sc['empty_score']:g} nats"
             + ("" if median is None else f"; the others' median score {median:.3g}") + ")")]


def _noise_summary_rows(s: RunSummary) -> list[tuple[str, str]]:
    """The whitened noise's spectrum on the training disc (runs that whitened)."""
    n = s.get("noise")
    if n is None:
        return []
    return [("noise (whitened)",
             f"background power {n['relative_power_min']:.2f}-{n['relative_power_max']:.2f}x "
             f"its mean on the training disc (shell 1: {n['relative_power_shell_1']:.2f}x, "
             f"at {n['disc_edge_angstrom']:.3g} Å: {n['relative_power_disc_edge']:.2f}x); "
             "each frequency weighted by the inverse")]


def _stage1_summary_rows(s: RunSummary) -> list[tuple[str, str]]:
    """The head spread of the last stage-1 epoch that has one."""
    with_spread = [r for r in s.get("stage1_heads") or () if r.get("head_spread_deg")]
    if not with_spread:
        return []
    last = with_spread[-1]
    values = ", ".join("–" if v is None or not math.isfinite(v) else
                       f"{v:.1f}°" if v < 9.95 else f"{v:.0f}°"
                       for v in last["head_spread_deg"] or ())
    return [(f"head spread across images (epoch {last['epoch']})",
             f"{values} (0° = one rotation for every image, ≈ {RANDOM_SPREAD_DEG:.0f}° = "
             "random)")]


def _tracked_summary_rows(s: RunSummary) -> list[tuple[str, str]]:
    """The tracked particles' errors at the last stage-1 epoch (the switch's poses)."""
    stage1 = [r for r in s.get("tracked_rotation_error") or ()
              if r.get("stage") == Stage.AUTOENCODE]
    if not stage1:
        return []
    r = stage1[-1]
    best = r.get("best_head_median_deg")
    return [(f"tracked particles, last auto-encoding epoch ({r['epoch']})",
             f"median error: winning head {r['median_deg']:.1f}°, best of heads "
             + ("–" if best is None else f"{best:.1f}°")
             + f"; view direction {r['view_median_deg']:.1f}°, in-plane "
               f"{r['in_plane_median_deg']:.1f}°")]


def gt_summary_rows(s: RunSummary | HalvesSummary) -> list[tuple[str, str]]:
    """Summary-table rows of the ground-truth comparisons present in ``s``."""
    rows: list[tuple[str, str]] = []
    if "resolution_05_angstrom" in s:
        rows.append(("resolution vs ground truth",
                     f"{format_resolution(s['resolution_05_angstrom'])} (FSC 0.5), "
                     f"{format_resolution(s['resolution_0143_angstrom'])} (FSC 0.143)"))
        rows.append(("hand vs ground truth",
                     "mirrored" if s["hand_flipped_vs_gt"] else "same"))
    if "median_rotation_error_deg" in s:
        rows.append(("rotation error vs ground truth",
                     f"median {s['median_rotation_error_deg']:.2f}°, mean "
                     f"{s['mean_rotation_error_deg']:.2f}°, "
                     f"{100 * s['fraction_rotation_error_below_10_deg']:.1f} % below 10°"))
    return rows


def epoch_table(
    metrics: Sequence[MetricsLine], elapsed: np.ndarray,
    resolutions: Sequence[EpochResolution],
) -> Table:
    """The per-epoch table: epoch, stage, loss, times, throughput, pose change, the share of
    images likeliest empty (runs with ``model.empty_class``) and junk (``model.junk_class``),
    resolution."""
    res = {r.epoch: r for r in resolutions}

    def num(x: object, fmt: str) -> str:
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt % x

    empty = any(r.get("empty_fraction") is not None for r in metrics)
    junk = any(r.get("junk_fraction") is not None for r in metrics)
    header = ["epoch", "stage", "loss", "epoch time", "elapsed", "images/s",
              "mean pose change", *(["images more likely empty"] if empty else []),
              *(["images more likely junk"] if junk else []),
              "resolution vs GT (0.5 / 0.143)"]
    rows = []
    for r, t in zip(metrics, elapsed, strict=True):
        e = int(r["epoch"])
        rr = res.get(e)
        fraction, junk_share = r.get("empty_fraction"), r.get("junk_fraction")
        rows.append([
            str(e), str(r.get("stage", "")), num(r.get("loss"), "%.6g"),
            format_duration(float(r.get("wall_time_s") or 0.0)), format_duration(float(t)),
            num(r.get("images_per_s"), "%.1f"), num(r.get("mean_pose_change_deg"), "%.2f°"),
            *([num(None if fraction is None else 100.0 * fraction, "%.1f %%")] if empty
              else []),
            *([num(None if junk_share is None else 100.0 * junk_share, "%.1f %%")] if junk
              else []),
            "–" if rr is None else f"{format_resolution(rr.resolution_05_angstrom)} / "
                                   f"{format_resolution(rr.resolution_0143_angstrom)}",
        ])
    return "Epochs", header, rows


# ---------------------------------------------------------------------------- halves
def halves_summary_rows(run_dir: Path, s: HalvesSummary) -> list[tuple[str, str]]:
    """The summary table of a ``--halves`` run, from
    :func:`~cryospin.report.analysis.halves_summary` and the ground-truth fields."""
    a, b = s["half_sizes"]
    rows: list[tuple[str, str]] = [("run folder", str(run_dir))]
    if s["particles"]:
        rows.append(("particles", f"{s['particles']:,} (half A {a:,}, half B {b:,}; split by "
                                  f"{s['split_source']})"))
    rows.append(("box", f"{s['box_px']} px"))
    if s["pixel_size_angstrom"]:
        rows.append(("pixel size", f"{s['pixel_size_angstrom']:.4g} Å"))
    ea, eb = s["epochs_completed"]
    wa, wb = s["wall_time_s"]
    rows.append(("epochs", f"half A {ea}, half B {eb}"))
    na, nb = s["starts_per_half"]
    if max(na, nb) > 1:
        ca, cb = s["chosen_starts"]
        first = s["starts_at_first"]
        added = [f"{n - first} to half {w}" for w, n in (("A", na), ("B", nb)) if n > first]
        why = (f" ({first} each at first; added for fitting its images clearly worse than "
               f"the other half: {', '.join(added)})" if added else "")
        rows.append(("starts", f"half A {na}, half B {nb}{why}; each half's own lowest final "
                               f"loss kept: half A {ca}, half B {cb}"))
    every = "all starts: " if max(na, nb) > 1 else ""
    rows.append(("wall time", f"{format_duration(wa + wb)} ({every}half A "
                              f"{format_duration(wa)}, half B {format_duration(wb)})"))
    if s["half_alignment_correlation"] is not None:
        rows.append(("half B onto half A", ("mirrored, " if s["half_b_mirrored"] else "")
                     + f"correlation {s['half_alignment_correlation']:.3f}"))
    rows.append(("resolution (gold standard)",
                 f"{format_resolution(s['resolution_0143_corrected'])} (corrected FSC 0.143; "
                 f"unmasked "
                 f"{format_resolution(s['resolution_0143_unmasked'])}, masked "
                 f"{format_resolution(s['resolution_0143_masked'])})"))
    rows += _sharpening_rows(s)
    rows += _local_resolution_rows(s)
    rows += _half_fit_rows(s)
    rows += _score_summary_rows(s)
    rows += gt_summary_rows(s)
    return rows


def _sharpening_rows(s: HalvesSummary) -> list[tuple[str, str]]:
    """The B-factor of ``postprocess.mrc`` and its Guinier fit, or why there is none
    (``fsc.json``'s ``sharpening``; no row for runs from before it)."""
    bfactor, fit = s["sharpening_bfactor_a2"], s["sharpening_guinier_fit"]
    if bfactor is None:
        return []
    at = s["sharpening_lowpass_resolution"]
    low_passed = f"low-passed at {format_resolution(at)}" if at is not None else "not low-passed"
    if fit is None:
        return [("sharpening", f"none ({s['sharpening_no_fit_reason']}): {POSTPROCESS_MAP} is "
                               f"{MAP} {low_passed}")]
    return [("sharpening", f"B-factor {bfactor:.0f} Å² from the Guinier plot of the "
                           f"FSC-weighted map, {fit['low_angstrom']:g} to "
                           f"{fit['high_angstrom']:.2f} Å ({fit['shells']} shells, correlation "
                           f"{fit['correlation']:.3f}): {POSTPROCESS_MAP}, {low_passed}")]


def _local_resolution_rows(s: HalvesSummary) -> list[tuple[str, str]]:
    """The local resolution's median and spread (``fsc.json``'s; none before it existed)."""
    local = s["local_resolution"]
    if not local or not local.get("points"):
        return []
    text = (f"median {format_resolution(local['median'])}, 5-95 %: "
            f"{format_resolution(local['percentile_5'])} to "
            f"{format_resolution(local['percentile_95'])} (FSC {local['fsc_threshold']:g} in "
            f"{local['window_px']}-voxel windows at {local['points']} points within the mask, "
            "whose edge reaches into the solvent; locres.mrc)")
    if local.get("density_median") is not None:
        text += (f"; windows centred on density ({local['density_points']} points): median "
                 f"{format_resolution(local['density_median'])}, 5-95 %: "
                 f"{format_resolution(local['density_percentile_5'])} to "
                 f"{format_resolution(local['density_percentile_95'])}")
    return [("local resolution", text)]


def _half_fit_rows(s: HalvesSummary) -> list[tuple[str, str]]:
    """How well each half explains its own images (``fsc.json``'s ``half_fit``, as the run
    judged it)."""
    scores, gap = s["half_fit_scores_nats"], s["half_fit_gap"]
    if not scores or gap is None:
        return []
    a, b = scores
    text = (f"mean particle score half A {a:.4g}, half B {b:.4g} nats: {100 * gap:.1f} % "
            "apart")
    threshold = s["half_fit_threshold"]
    if s["half_fit_agree"] is False and threshold is not None:
        worse = 0 if a < b else 1
        advice = more_starts_advice(s["run_dir"], "AB"[worse], s["starts_per_half"][worse],
                                    not s["starts_folders"])
        text += (f" (over {100 * threshold:.0f} %: one half explains its images clearly "
                 "worse, so it has probably settled on another structure or placed part of "
                 "its particles wrong, which the gold-standard FSC may not show; compare "
                 f"half_A.mrc and half_B.mrc; {advice})")
    return [("halves' own fit", text)]


def gold_standard_table(gold: GoldStandardFSC) -> Table:
    """The resolutions (FSC 0.5 and 0.143) of the four gold-standard curves."""
    curves = (("unmasked", gold.unmasked), ("masked", gold.masked),
              ("phase-randomised masked", gold.phase_randomised), ("corrected", gold.corrected))
    return ("Gold-standard FSC resolutions", ["curve", "FSC 0.5", "FSC 0.143"],
            [[name, format_resolution(c.resolution(0.5)), format_resolution(c.resolution(0.143))]
             for name, c in curves])


def _axes_sentence(drawn: DrawnAxes | None) -> str:
    """What the map figure draws of the symmetry axes."""
    if drawn is None:
        return "The map figure draws no symmetry axes (C1 imposed, none detected)."
    counts: dict[int, int] = {}
    for n in drawn.orders.tolist():
        counts[n] = counts.get(n, 0) + 1
    kinds = ", ".join(f"{k} × {n}-fold" for n, k in counts.items())
    where = ("in RELION's orientation through the box centre" if drawn.source == "imposed"
             else "in the orientation and about the centre the detection found")
    return (f"The central sections of the map figure show the axes of the {drawn.source} "
            f"group {drawn.group} ({kinds}) {where}: a line where an axis lies within 10° of "
            "the section's plane, a circle where it pierces it, each labelled with its order.")


def symmetry_section(check: SymmetryCheck, drawn: DrawnAxes | None, *, map_name: str,
                     pose_errors_modulo: str | None, max_rows: int = 8) -> Section:
    """The page's "Symmetry" section: the imposed group, the detected ranking of the map
    ``map_name`` (the best ``max_rows`` candidates), the advice when they differ, the axes
    drawn and the group the pose errors were taken modulo."""
    esc = html.escape
    paragraphs = [f"Imposed by the run (model.symmetry; auto: the group found after the global "
                  f"search, metrics.jsonl): <b>{esc(check.imposed)}"
                  "</b>" + (" (none)." if check.imposed == "C1" else ".")]
    rows: list[list[str]] = []
    if check.search is None:
        paragraphs.append(f"Detected on {esc(map_name)}: – ({esc(check.problem or '')}).")
    else:
        sr = check.search
        paragraphs.append(
            f"Detected on {esc(map_name)}: <b>{esc(sr.chosen.group)}</b> (score "
            f"{sr.chosen.score:.3f}; a group needs {sr.threshold:g}; gap to the best rejected "
            f"group {sr.gap:.3f}; {check.seconds:.1f} s on a whitened 32 px copy, as "
            "<code>cryospin symmetry</code>). Score: mean correlation of the map with its "
            "copies turned by the group's rotations (1 = exact symmetry).")
        rows = [[f.group, str(f.order), f"{f.score:.3f}",
                 "chosen" if f is sr.chosen else ("accepted" if f.score >= sr.threshold
                                                  else "")]
                for f in sr.fits[:max_rows]]
    advice = symmetry_advice(check)
    if advice is not None:
        paragraphs.append(f"<b>{esc(advice)}</b>")
    paragraphs.append(esc(_axes_sentence(drawn)))
    if pose_errors_modulo is not None:
        paragraphs.append(
            f"Pose errors against the ground truth are taken modulo {esc(pose_errors_modulo)}"
            " (the run's group): each particle's error is to its nearest symmetry-equivalent "
            "ground-truth pose." if pose_errors_modulo != "C1" else
            "Pose errors against the ground truth: no symmetry reduction (C1 imposed).")
    return Section("Symmetry", paragraphs, ("group", "order", "score", ""), rows)
